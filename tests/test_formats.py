"""dpo_data.formats: every file kind, every format adapter, auto-detection, field renames and one-line errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from dpo_data.formats import (
    FormatError,
    RecordError,
    check_fields,
    detect_file_format,
    detect_format,
    iter_file_records,
    json_safe,
    list_data_files,
    make_pair_id,
    parse_hh_transcript,
    read_records,
    to_canonical,
)

REPO = Path(__file__).resolve().parents[1]
TRL = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "score": 3}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------------------------- adapters


def test_trl_string_variant_keeps_extra_fields_as_meta():
    rec = to_canonical(TRL, "trl")
    assert rec.prompt == [{"role": "user", "content": "What is 2+2?"}]
    assert (rec.chosen, rec.rejected, rec.meta) == ("4", "5", {"score": 3})


def test_trl_conversational_variant():
    raw = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    rec = to_canonical(raw, detect_format(raw))
    assert [m["role"] for m in rec.prompt] == ["system", "user"]
    assert (rec.chosen, rec.rejected) == ("Hello!", "Go away.")


def test_trl_implicit_prompt_shares_prefix_or_fails():
    conv = [{"role": "user", "content": "Hi"}]
    raw = {"chosen": conv + [{"role": "assistant", "content": "Hello"}],
           "rejected": conv + [{"role": "assistant", "content": "No"}]}
    assert detect_format(raw) == "trl"
    rec = to_canonical(raw, "trl")
    assert rec.prompt == conv and rec.chosen == "Hello" and rec.rejected == "No"
    raw["rejected"] = [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "No"}]
    with pytest.raises(RecordError) as err:
        to_canonical(raw, "trl")
    assert err.value.reason == "prompt_mismatch"


def test_trl_multi_message_response_is_rejected_with_reason():
    raw = {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
           "rejected": "c"}
    with pytest.raises(RecordError) as err:
        to_canonical(raw, "trl")
    assert err.value.reason == "unsupported_response"


@pytest.mark.parametrize("label, chosen", [(1, "r1"), (2, "r2"), ("1", "r1"), ("2", "r2"), (2.0, "r2")])
def test_align_anything_label_picks_the_better_response(label, chosen):
    raw = {"question": "q", "response_1": "r1", "response_2": "r2", "overall_response": label, "extra": "x"}
    assert detect_format(raw) == "align_anything"
    rec = to_canonical(raw, "align_anything")
    assert rec.chosen == chosen and rec.rejected == ({"r1", "r2"} - {chosen}).pop()
    assert rec.meta == {"extra": "x"}


@pytest.mark.parametrize("label", [0, 3, "tie", "", True, 1.5, [1]])
def test_align_anything_label_outside_1_2_is_bad_label(label):
    raw = {"question": "q", "response_1": "r1", "response_2": "r2", "overall_response": label}
    with pytest.raises(RecordError) as err:
        to_canonical(raw, "align_anything")
    assert err.value.reason == "bad_label"


def test_pku_saferlhf_and_renamed_label_field():
    raw = {"prompt": "q", "response_0": "safe", "response_1": "unsafe", "better_response_id": 1,
           "safer_response_id": 0}
    assert detect_format(raw) == "pku_saferlhf"
    assert to_canonical(raw, "pku_saferlhf").chosen == "unsafe"
    rec = to_canonical(raw, "pku_saferlhf", {"better_response_id": "safer_response_id"})
    assert (rec.chosen, rec.rejected) == ("safe", "unsafe")
    assert rec.meta == {"better_response_id": 1}
    with pytest.raises(RecordError, match="bad_label"):
        to_canonical({**raw, "better_response_id": 2}, "pku_saferlhf")


def test_hh_transcript_parsing_and_shared_prompt():
    history = "\n\nHuman: Hi  Human: inline stays text\n\nAssistant: Hello\n\nHuman: How are you?"
    raw = {"chosen": history + "\n\nAssistant: Fine, thanks.", "rejected": history + "\n\nAssistant: Whatever."}
    assert detect_format(raw) == "hh_rlhf"
    rec = to_canonical(raw, "hh_rlhf")
    assert rec.prompt == [
        {"role": "user", "content": "Hi  Human: inline stays text"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "How are you?"},
    ]
    assert (rec.chosen, rec.rejected) == ("Fine, thanks.", "Whatever.")


def test_hh_sides_that_disagree_before_last_assistant_turn():
    raw = {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}
    with pytest.raises(RecordError) as err:
        to_canonical(raw, "hh_rlhf")
    assert err.value.reason == "hh_prompt_mismatch"


@pytest.mark.parametrize("text", ["no markers at all", "\n\nHuman: only a question", "lead\n\nHuman: a\n\nAssistant: b"])
def test_hh_malformed_transcripts(text):
    with pytest.raises(RecordError) as err:
        to_canonical({"chosen": text, "rejected": "\n\nHuman: a\n\nAssistant: b"}, "hh_rlhf")
    assert err.value.reason == "hh_malformed_transcript"
    assert parse_hh_transcript("\n\nHuman: a\n\nAssistant: b")[-1] == {"role": "assistant", "content": "b"}


def test_sharegpt_roles_system_and_response_objects():
    raw = {
        "conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q1"},
                          {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    assert detect_format(raw) == "sharegpt"
    rec = to_canonical(raw, "sharegpt")
    assert [m["role"] for m in rec.prompt] == ["system", "user", "assistant", "user"]
    assert (rec.chosen, rec.rejected) == ("good", "bad")
    # a separate `system` column (LLaMA-Factory) becomes the leading system message
    rec2 = to_canonical({**raw, "conversations": raw["conversations"][1:], "system": "S"}, "sharegpt")
    assert rec2.prompt[0] == {"role": "system", "content": "S"}
    with pytest.raises(RecordError) as err:
        to_canonical({**raw, "chosen": {"from": "human", "value": "x"}}, "sharegpt")
    assert err.value.reason == "bad_response_role"


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"prompt": "q", "chosen": "a"}, "missing_field"),
        ({"prompt": "q", "chosen": None, "rejected": "b"}, "missing_field"),
        ({"prompt": "q", "chosen": float("nan"), "rejected": "b"}, "missing_field"),
        ({"prompt": "q", "chosen": 42, "rejected": "b"}, "wrong_type"),
        ({"prompt": 7, "chosen": "a", "rejected": "b"}, "wrong_type"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "missing_field"),
        ({"prompt": ["just text"], "chosen": "a", "rejected": "b"}, "wrong_type"),
    ],
)
def test_missing_and_wrong_typed_fields(record, reason):
    with pytest.raises(RecordError) as err:
        to_canonical(record, "trl")
    assert err.value.reason == reason


def test_field_renames_and_unknown_renames():
    raw = {"instruction": "q", "good": "a", "bad": "b"}
    fields = {"prompt": "instruction", "chosen": "good", "rejected": "bad"}
    assert detect_format(raw) is None and detect_format(raw, fields) == "trl"
    rec = to_canonical(raw, "trl", fields)
    assert (rec.prompt[0]["content"], rec.chosen, rec.rejected, rec.meta) == ("q", "a", "b", {})
    check_fields("trl", fields)
    with pytest.raises(FormatError, match="does not have"):
        check_fields("trl", {"question": "q"})
    with pytest.raises(FormatError, match="unknown data format"):
        check_fields("csv_pairs", {})


def test_pair_id_is_a_stable_content_hash():
    p = [{"role": "user", "content": "q"}]
    a = make_pair_id(p, "a", "b")
    assert a == make_pair_id([{"content": "q", "role": "user"}], "a", "b")
    assert len(a) == 16 and all(c in "0123456789abcdef" for c in a)
    assert a != make_pair_id(p, "b", "a") and a != make_pair_id([{"role": "system", "content": "s"}, *p], "a", "b")
    assert a == "ab0e7b846524254b"  # pinned: changing the hash would move every pair between splits and caches


def test_json_safe_replaces_non_finite_and_numpy():
    import numpy as np

    assert json_safe({"a": float("nan"), "b": np.int64(3), "c": np.array([1.5, np.inf]), "d": (1, b"x")}) == {
        "a": None, "b": 3, "c": [1.5, None], "d": [1, "x"]}


# ----------------------------------------------------------------------------------------------- readers


def test_jsonl_gz_json_array_parquet_csv_read_the_same_records(tmp_path):
    records = [TRL, {**TRL, "prompt": "Second?", "score": 4}]
    _write_jsonl(tmp_path / "a.jsonl", records)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "c.json").write_text(json.dumps(records))
    with gzip.open(tmp_path / "d.json.gz", "wt") as fh:
        fh.write(json.dumps(records))
    pd.DataFrame(records).to_parquet(tmp_path / "e.parquet")
    pd.DataFrame(records).to_csv(tmp_path / "f.csv", index=False)
    for name in ["a.jsonl", "b.jsonl.gz", "c.json", "d.json.gz", "e.parquet"]:
        got = [r.record for r in iter_file_records(tmp_path / name)]
        assert got == records, name
    csv_rows = [r.record for r in iter_file_records(tmp_path / "f.csv")]
    assert [r["prompt"] for r in csv_rows] == ["What is 2+2?", "Second?"] and csv_rows[0]["score"] == "3"
    lines = [r.line for r in iter_file_records(tmp_path / "a.jsonl")]
    assert lines == [1, 2]


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    _write_jsonl(tmp_path / "x.json", [TRL, TRL])
    assert [r.line for r in iter_file_records(tmp_path / "x.json")] == [1, 2]


def test_unreadable_lines_are_yielded_with_a_reason_not_dropped(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(TRL).encode() + b"\n"
        + b'{"prompt": "q", "chosen": \n'
        + b"\n"
        + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
        + b"[1, 2]\n"
        + json.dumps(TRL).encode() + b"\n"
    )
    recs = list(iter_file_records(path))
    assert [r.line for r in recs] == [1, 2, 4, 5, 6]  # the blank line 3 is not a record
    assert [r.error for r in recs] == [None, "malformed_json", "invalid_utf8", "not_an_object", None]
    assert recs[0].record == TRL  # the BOM is stripped
    assert recs[2].raw is not None and "caf" in recs[2].raw


def test_csv_extra_cells_and_missing_cells(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('prompt,chosen,rejected\nq,a,b\nq,a,b,EXTRA\nq,a\n"multi\nline",a,b\n')
    recs = list(iter_file_records(path))
    assert [r.error for r in recs] == [None, "malformed_csv", None, None]
    assert recs[2].record["rejected"] is None
    assert [r.line for r in recs] == [2, 3, 4, 5]
    assert recs[3].record["prompt"] == "multi\nline"


def test_folder_reads_all_data_files_sorted_and_skips_others(tmp_path):
    (tmp_path / "sub").mkdir()
    _write_jsonl(tmp_path / "b.jsonl", [TRL])
    _write_jsonl(tmp_path / "a.jsonl", [TRL])
    _write_jsonl(tmp_path / "sub" / "c.jsonl", [TRL])
    (tmp_path / "LICENSE").write_text("MIT")
    (tmp_path / ".hidden.jsonl").write_text("not json")
    assert [p.name for p in list_data_files(tmp_path)] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert [Path(r.file).name for r in read_records(str(tmp_path), root=Path("/"))] == ["a.jsonl", "b.jsonl",
                                                                                           "c.jsonl"]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([TRL, TRL])
    ds.save_to_disk(str(tmp_path / "one"))
    assert [r.record for r in read_records("one", root=tmp_path)] == [TRL, TRL]
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(list(read_records("dd", root=tmp_path, split="test"))) == 1
    with pytest.raises(FormatError, match="set `split:`"):
        list(read_records("dd", root=tmp_path))


def test_whole_source_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.json").write_text('[{"prompt": "q"},')
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    cases = {
        "missing.jsonl": "data file not found",
        "notes.txt": "unsupported data file kind",
        "broken.json": "is not valid JSON",
        "empty_dir": "holds no data files",
        "bad.parquet": "not a readable Parquet file",
        "trl-lib/ultrafeedback_binarized": "hub is offline",
    }
    for path, message in cases.items():
        with pytest.raises(FormatError, match=message) as err:
            list(read_records(path, root=tmp_path))
        assert "\n" not in str(err.value)


def test_auto_detection_of_the_shipped_files(tmp_path):
    expected = {
        "data/ultrafeedback_binarized_sample/train.jsonl": "trl",
        "data/hh_rlhf_harmless_base_test/test.jsonl.gz": "hh_rlhf",
        "data/llamafactory_dpo_en_demo/dpo_en_demo.json": "sharegpt",
    }
    for path, fmt in expected.items():
        recs = list(read_records(path, root=REPO))
        assert detect_file_format(recs, {}, path) == fmt
    with pytest.raises(FormatError, match="cannot detect"):
        detect_file_format(list(iter_file_records(_write_jsonl(tmp_path / "u.jsonl",
                                                                [{"a": 1}]))), {}, "x")


def test_parquet_nulls_and_conversational_columns(tmp_path):
    df = pd.DataFrame({
        "prompt": [[{"role": "user", "content": "q"}], None],
        "chosen": [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "x"}]],
        "rejected": [[{"role": "assistant", "content": "b"}], [{"role": "assistant", "content": "y"}]],
    })
    df.to_parquet(tmp_path / "c.parquet")
    recs = list(iter_file_records(tmp_path / "c.parquet"))
    assert to_canonical(recs[0].record, detect_format(recs[0].record)).chosen == "a"
    with pytest.raises(RecordError, match="missing_field"):
        to_canonical(recs[1].record, "trl")


def test_truncated_gzip_is_a_one_line_error(tmp_path):
    data = gzip.compress(("".join(json.dumps(TRL) + "\n" for _ in range(200))).encode())
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "fake.jsonl.gz").write_bytes(b"plain text, not gzip")
    for name in ["t.jsonl.gz", "fake.jsonl.gz"]:
        with pytest.raises(FormatError, match="cannot read") as err:
            list(iter_file_records(tmp_path / name))
        assert "\n" not in str(err.value)


def test_a_single_json_object_document_is_a_clear_error(tmp_path):
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [TRL, TRL]}, indent=2))
    with pytest.raises(FormatError, match="holds one JSON object"):
        list(iter_file_records(tmp_path / "wrapped.json"))
    (tmp_path / "one_line.json").write_text(json.dumps(TRL) + "\n")  # one JSON Lines record is fine
    assert [r.record for r in iter_file_records(tmp_path / "one_line.json")] == [TRL]


def test_every_config_format_name_has_an_adapter():
    """config.FORMAT_NAMES (what a config may name) and FORMAT_FIELDS (what the readers adapt) list the same formats."""
    from dpo_core.config import FORMAT_NAMES
    from dpo_data.formats import FORMAT_FIELDS

    assert sorted(FORMAT_FIELDS) == sorted(FORMAT_NAMES)


# ----------------------------------------------------------------------------------------- unpaired (KTO)


def test_trl_unpaired_standard_conversational_and_implicit_prompt():
    from dpo_data.formats import UnpairedRecord

    standard = to_canonical({"prompt": "Sky?", "completion": "Blue.", "label": True, "id": 7}, "trl_unpaired")
    assert standard == UnpairedRecord([{"role": "user", "content": "Sky?"}], "Blue.", True, {"id": 7})
    chat = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}],
            "completion": [{"role": "assistant", "content": "Green."}], "label": False}
    conversational = to_canonical(chat, "trl_unpaired")
    assert (conversational.prompt[0]["role"], conversational.completion, conversational.label) == ("system", "Green.",
                                                                                                   False)
    implicit = to_canonical({"completion": [{"role": "user", "content": "Sky?"},
                                            {"role": "assistant", "content": "Blue."}], "label": True}, "trl_unpaired")
    assert (implicit.prompt, implicit.completion) == ([{"role": "user", "content": "Sky?"}], "Blue.")
    for record in ({"prompt": "a", "completion": "b", "label": True}, chat):
        assert detect_format(record) == "trl_unpaired"


@pytest.mark.parametrize("label", [1, 0, "true", None, [True]])
def test_an_unpaired_label_that_is_not_a_boolean_is_a_bad_label(label):
    with pytest.raises(RecordError) as err:
        to_canonical({"prompt": "Sky?", "completion": "Blue.", "label": label}, "trl_unpaired")
    assert err.value.reason == ("missing_field" if label is None else "bad_label")


def test_an_unpaired_completion_with_a_user_turn_is_refused():
    with pytest.raises(RecordError, match="expected assistant"):
        to_canonical({"prompt": "Sky?", "completion": [{"role": "user", "content": "x"}], "label": True},
                      "trl_unpaired")
