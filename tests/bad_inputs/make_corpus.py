"""Regenerate the bad-input corpus: `python tests/bad_inputs/make_corpus.py` (files are committed; this documents them).

Every file mixes good rows with the defect it is named after; `expected.json` says what ingest must make of it
(rows read / accepted / duplicates removed, rows quarantined per check) or which one-line error it must raise.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def good(i: int) -> dict:
    return {"prompt": f"Question {i}?", "chosen": f"A helpful answer {i}.", "rejected": f"A poor answer {i}."}


def line(obj: object) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def main() -> None:
    expected: dict[str, dict] = {}

    def put(name: str, data: bytes, **exp: object) -> None:
        (HERE / name).write_bytes(data)
        expected[name] = exp

    put("malformed_line.jsonl",
        line(good(1)) + line(good(2)) + b'{"prompt": "Broken?", "chosen": "yes", "rejected": \n' + line(good(3)),
        read=4, accepted=3, duplicates=0, checks={"malformed_json": 1})
    put("bom.jsonl", b"\xef\xbb\xbf" + line(good(1)) + line(good(2)), read=2, accepted=2, duplicates=0, checks={})
    put("invalid_utf8.jsonl",
        line(good(1)) + b'{"prompt": "caf\xe9 \xff?", "chosen": "a", "rejected": "b"}\n' + line(good(2)),
        read=3, accepted=2, duplicates=0, checks={"invalid_utf8": 1})
    put("bare_nan.jsonl",
        line(good(1))
        + b'{"prompt": "Score?", "chosen": NaN, "rejected": "b"}\n'
        + b'{"prompt": "Kept?", "chosen": "yes", "rejected": "no", "score": NaN}\n',
        read=3, accepted=2, duplicates=0, checks={"missing_field": 1})
    put("missing_fields.jsonl",
        line(good(1)) + line({"prompt": "q", "chosen": "a"}) + line({"prompt": "q2", "chosen": "a", "rejected": None})
        + line({"chosen": "a", "rejected": "b", "prompt": None}),
        read=4, accepted=1, duplicates=0, checks={"missing_field": 3})
    put("wrong_types.jsonl",
        line(good(1)) + line({"prompt": "q", "chosen": 42, "rejected": "b"})
        + line({"prompt": 3.5, "chosen": "a", "rejected": "b"}) + line({"prompt": "q", "chosen": "a", "rejected": True})
        + line({"prompt": "q", "chosen": {"text": "a"}, "rejected": "b"}) + b"[1, 2, 3]\n",
        read=6, accepted=1, duplicates=0, checks={"wrong_type": 4, "not_an_object": 1})
    put("blank_strings.jsonl",
        line(good(1)) + line({"prompt": "", "chosen": "a", "rejected": "b"})
        + line({"prompt": "q", "chosen": "   \n\t", "rejected": "b"}) + line({"prompt": "q", "chosen": "a", "rejected": ""})
        + line({"prompt": " ", "chosen": " ", "rejected": "b"}),
        read=5, accepted=1, duplicates=0,
        checks={"blank_prompt": 2, "blank_chosen": 2, "blank_rejected": 1})
    put("chosen_equals_rejected.jsonl",
        line(good(1)) + line({"prompt": "q", "chosen": "same", "rejected": "same"})
        + line({"prompt": "q", "chosen": "same ", "rejected": "same\n"}),
        read=3, accepted=1, duplicates=0, checks={"chosen_equals_rejected": 2})
    aa = lambda i, label: {"question": f"Q{i}", "response_1": f"one {i}", "response_2": f"two {i}",  # noqa: E731
                           "overall_response": label}
    put("align_anything_labels.jsonl",
        b"".join(line(aa(i, lab)) for i, lab in enumerate([1, 2, "1", "2", 0, 3, "tie", None, 1.5, -1])),
        read=10, accepted=4, duplicates=0, checks={"bad_label": 5, "missing_field": 1})
    pku = lambda i, label: {"prompt": f"P{i}", "response_0": f"zero {i}", "response_1": f"one {i}",  # noqa: E731
                            "better_response_id": label}
    put("pku_labels.jsonl", b"".join(line(pku(i, lab)) for i, lab in enumerate([0, 1, "0", 2, "x"])),
        read=5, accepted=3, duplicates=0, checks={"bad_label": 2})
    hh = "\n\nHuman: Hello\n\nAssistant: Hi there\n\nHuman: How are you?"
    put("hh_mismatch.jsonl",
        line({"chosen": hh + "\n\nAssistant: Fine.", "rejected": hh + "\n\nAssistant: Go away."})
        + line({"chosen": hh + "\n\nAssistant: Fine.", "rejected": "\n\nHuman: Other\n\nAssistant: Go away."})
        + line({"chosen": hh + "\n\nAssistant: Fine.", "rejected": "no transcript here"})
        + line({"chosen": hh + "\n\nAssistant:", "rejected": hh + "\n\nAssistant: Something."}),
        read=4, accepted=1, duplicates=0,
        checks={"hh_prompt_mismatch": 1, "hh_malformed_transcript": 1, "blank_chosen": 1}, format="hh_rlhf")
    put("sharegpt_roles.json",
        json.dumps([
            {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
             "rejected": {"from": "gpt", "value": "b"}},
            {"conversations": [{"from": "function_call", "value": "f()"}, {"from": "human", "value": "q"}],
             "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q again"}],
             "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
             "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
            {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "a"},
             "rejected": {"from": "gpt", "value": "b"}},
            "not an object",
        ]).encode(),
        read=6, accepted=1, duplicates=0,
        checks={"prompt_bad_role": 1, "prompt_role_order": 2, "bad_response_role": 1, "not_an_object": 1})
    put("duplicates.jsonl", line(good(1)) + line(good(1)) + line(good(2)) + line({**good(1), "extra": "meta differs"}),
        read=4, accepted=2, duplicates=2, checks={})
    put("extra_cells.csv", b"prompt,chosen,rejected\nq1,a,b\nq2,a,b,EXTRA\nq3,a\n\"multi\nline q4\",a,b\n",
        read=4, accepted=2, duplicates=0, checks={"malformed_csv": 1, "missing_field": 1})
    with gzip.GzipFile(HERE / "huge_response.jsonl.gz", "wb", mtime=0) as fh:
        fh.write(line(good(1)) + line({"prompt": "Say a lot.", "chosen": "word " * 210_000, "rejected": "short"}))
    expected["huge_response.jsonl.gz"] = dict(read=2, accepted=1, duplicates=0, checks={"chosen_too_long": 1})
    put("all_malformed.jsonl", b"{not json\n{\"also\": \n", read=2, accepted=0, duplicates=0,
        checks={"malformed_json": 2})
    put("empty.jsonl", b"", error="holds no records")
    put("blank_lines_only.jsonl", b"\n\n   \n", error="holds no records")
    put("unknown_extension.txt", line(good(1)), error="unsupported data file kind")
    put("not_an_array.json", b'[{"prompt": "q", "chosen": "a", "rejected": "b"},', error="is not valid JSON")
    put("unknown_format.jsonl", line({"text": "hello"}) + line({"text": "world"}), error="cannot detect")
    expected["does_not_exist.jsonl"] = {"error": "data file not found"}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
