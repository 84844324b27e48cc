"""dpo_data.ingest on the shipped datasets and on the bad-input corpus: read = accepted + quarantined +
duplicates removed, quarantine entries with reasons, one-line errors, hash split, caps, fingerprint, Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from data_contracts.errors import DataError
from dpo_data.ingest import in_hashed_split, ingest, pair_set_id, read_pairs, report_rows, write_pairs
from data_contracts.pairs import PAIR_COLUMNS, validate_pairs
from dpo_data.quarantine import read_quarantine
from dpo_core.config import DataConfig, SourceConfig

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "bad_inputs"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())
TOLERANT = {"eval": None, "max_invalid_fraction": 1.0}


def _cfg(*paths: str, **kw) -> DataConfig:
    return DataConfig(train=[SourceConfig(path=p, format=kw.pop("format", "auto")) for p in paths],
                      **{**TOLERANT, **kw})


def _assert_accounted(report: dict) -> None:
    """The invariant, per split, per source and in total."""
    for split, rep in report["splits"].items():
        assert rep["read"] == rep["accepted"] + rep["quarantined"] + rep["duplicates_removed"], split
        for src in rep["sources"]:
            assert src["read"] == src["accepted"] + src["quarantined"] + src["duplicates_removed"], src
    assert report["read"] == report["accepted"] + report["quarantined"] + report["duplicates_removed"]
    kept = sum(report["pairs"].values()) + sum(report.get("unpaired", {}).values())  # unpaired records too
    assert report["accepted"] == kept + sum(report["left_out_by_max_pairs"].values())


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _pairs(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
            for i in range(start, start + n)]


# ---------------------------------------------------------------------------------------------- shipped data

SHIPPED = {
    # path: (format, read, accepted, duplicates, quarantined per check) — measured; the quirks are listed in data/README.md
    "data/ultrafeedback_binarized_sample/train.jsonl": (
        "trl", 1000, 994, 0, {"chosen_equals_rejected": 4, "blank_chosen": 1, "blank_rejected": 1}),
    "data/ultrafeedback_binarized_sample/test.jsonl": ("trl", 200, 199, 0, {"chosen_equals_rejected": 1}),
    "data/hh_rlhf_harmless_base_test/test.jsonl.gz": (
        "hh_rlhf", 2312, 2299, 0, {"hh_prompt_mismatch": 5, "blank_chosen": 4, "prompt_role_order": 4}),
    "data/llamafactory_dpo_en_demo/dpo_en_demo.json": ("sharegpt", 300, 295, 5, {}),
}


@pytest.mark.parametrize("path", sorted(SHIPPED))
def test_shipped_dataset_is_fully_accounted_for(path, tmp_path):
    fmt, read, accepted, dups, checks = SHIPPED[path]
    result = ingest(_cfg(path), root=REPO, quarantine_path=tmp_path / "q.jsonl")
    rep = result.report["splits"]["train"]
    _assert_accounted(result.report)
    assert (rep["read"], rep["accepted"], rep["duplicates_removed"]) == (read, accepted, dups)
    assert rep["quarantined_by_check"] == checks
    assert list(rep["sources"][0]["formats"].values()) == [fmt]
    entries = read_quarantine(tmp_path / "q.jsonl")
    assert len(entries) == rep["quarantined"]
    assert all(e["file"] == path and e["checks"] and e["record"] is not None for e in entries)
    validate_pairs(result.pairs)


def test_default_config_trains_on_ultrafeedback_and_evaluates_on_its_test_split(tmp_path):
    cfg = DataConfig(extra_eval={"hh_harmless": SourceConfig(path="data/hh_rlhf_harmless_base_test/test.jsonl.gz")})
    result = ingest(cfg, root=REPO, quarantine_path=tmp_path / "q.jsonl")
    _assert_accounted(result.report)
    assert result.report["pairs"] == {"train": 994, "eval": 199, "hh_harmless": 2299}
    assert result.report["eval_split"] == "sources"
    assert list(result.pairs.columns) == PAIR_COLUMNS
    assert result.pairs["pair_id"].is_unique
    assert set(result.pairs["split"]) == {"train", "eval", "hh_harmless"}
    assert len(read_quarantine(tmp_path / "q.jsonl")) == 6 + 1 + 13
    meta = json.loads(result.pairs.iloc[0]["meta"])
    assert set(meta) == {"metadata", "source_index"}  # extra fields kept, not lost


# ---------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTED.items() if "error" not in e))
def test_bad_input_is_quarantined_with_the_right_reason(name, tmp_path):
    exp = EXPECTED[name]
    result = ingest(_cfg(f"tests/bad_inputs/{name}", format=exp.get("format", "auto")), root=REPO,
                    quarantine_path=tmp_path / "q.jsonl")
    rep = result.report["splits"]["train"]
    _assert_accounted(result.report)
    assert (rep["read"], rep["accepted"], rep["duplicates_removed"]) == (exp["read"], exp["accepted"],
                                                                          exp["duplicates"])
    assert rep["quarantined_by_check"] == exp["checks"]
    entries = read_quarantine(tmp_path / "q.jsonl")
    assert len(entries) == rep["quarantined"]
    for e in entries:
        assert e["file"] == f"tests/bad_inputs/{name}" and e["checks"] and e["errors"]
        assert isinstance(e["row"], int) and (e["record"] is not None or e["raw"] is not None)
        assert e["line"] is not None or name.endswith(".json")


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTED.items() if "error" in e))
def test_unusable_input_gives_a_clear_one_line_error(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=EXPECTED[name]["error"]) as err:
        ingest(_cfg(f"tests/bad_inputs/{name}"), root=REPO, quarantine_path=tmp_path / "q.jsonl")
    assert "\n" not in str(err.value) and name in str(err.value)


def test_whole_corpus_as_one_folder_source(tmp_path):
    """Every readable corpus file through one folder source: the invariant holds over all of them together."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    names = [n for n, e in EXPECTED.items() if "error" not in e and "format" not in e]
    for n in names:
        (folder / n).write_bytes((CORPUS / n).read_bytes())
    result = ingest(_cfg("corpus"), root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    _assert_accounted(result.report)
    rep = result.report["splits"]["train"]
    assert rep["read"] == sum(EXPECTED[n]["read"] for n in names)
    assert len(rep["sources"][0]["formats"]) == len(names)
    assert len(read_quarantine(tmp_path / "q.jsonl")) == rep["quarantined"]


def test_hub_id_when_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="hub is offline"):
        ingest(_cfg("trl-lib/ultrafeedback_binarized"), root=tmp_path, quarantine_path=tmp_path / "q.jsonl")


# ---------------------------------------------------------------------------------------------- gates


def test_on_invalid_fail_names_checks_counts_and_the_quarantine_file(tmp_path):
    cfg = _cfg("tests/bad_inputs/blank_strings.jsonl", on_invalid="fail")
    with pytest.raises(DataError) as err:
        ingest(cfg, root=REPO, quarantine_path=tmp_path / "q.jsonl")
    msg = str(err.value)
    assert "4 of 5 rows" in msg and "blank_prompt 2" in msg and "blank_rejected 1" in msg
    assert str(tmp_path / "q.jsonl") in msg and len(read_quarantine(tmp_path / "q.jsonl")) == 4


def test_max_invalid_fraction_gate(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _pairs(19) + [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    ok = ingest(_cfg(str(path), max_invalid_fraction=0.05), root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    assert ok.report["quarantined"] == 1  # 1/20 = 5% is not above 5%
    _write_jsonl(path, _pairs(9) + [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match=r"1 of 10 rows \(10.0%\).*max_invalid_fraction=0.05.*chosen_equals_rejected 1"):
        ingest(_cfg(str(path), max_invalid_fraction=0.05), root=tmp_path, quarantine_path=tmp_path / "q.jsonl")


# ---------------------------------------------------------------------------------------------- splits


def test_hash_split_is_stable_when_data_is_appended(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _pairs(200))
    first = ingest(_cfg(str(path), eval_fraction=0.2), root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    assert first.report["eval_split"] == "hash"
    # pinned: the split is a sha256 of each pair_id, so these counts move only if the hash rule changes (which would
    # move users' pairs between splits)
    assert first.report["pairs"] == {"train": 175, "eval": 25}
    _write_jsonl(path, _pairs(300, start=200) + _pairs(200))  # new pairs appended *and* prepended
    second = ingest(_cfg(str(path), eval_fraction=0.2), root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    before = dict(zip(first.pairs["pair_id"], first.pairs["split"], strict=True))
    after = dict(zip(second.pairs["pair_id"], second.pairs["split"], strict=True))
    assert second.report["pairs"] == {"train": 428, "eval": 72}
    assert all(after[pid] == split for pid, split in before.items())
    assert all((s == "eval") == in_hashed_split(p, 0.2) for p, s in after.items())


def test_validation_split_is_carved_from_train_by_hash_and_stable(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _pairs(200))
    cfg = _cfg(str(path), eval_fraction=0.2, validation_fraction=0.25, max_train_pairs=50)
    first = ingest(cfg, root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    splits = dict(zip(first.pairs["pair_id"], first.pairs["split"], strict=True))
    n_val = first.report["pairs"]["validation"]
    assert 20 <= n_val <= 70 and first.report["pairs"]["train"] == 50
    # eval and validation are independent hashes of pair_id; no pair is in two splits
    assert all((s == "validation") == (not in_hashed_split(p, 0.2) and in_hashed_split(p, 0.25, "validation"))
               for p, s in splits.items())
    # the validation set does not depend on max_train_pairs, and appending data moves none of its pairs
    _write_jsonl(path, _pairs(300, start=200) + _pairs(200))
    second = ingest(_cfg(str(path), eval_fraction=0.2, validation_fraction=0.25, max_train_pairs=10),
                    root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    after = dict(zip(second.pairs["pair_id"], second.pairs["split"], strict=True))
    assert all(after[p] == "validation" for p, s in splits.items() if s == "validation")
    rows = {r["split"]: r for r in report_rows(second.report)}
    assert rows["validation"]["pairs"] == second.report["pairs"]["validation"]
    assert rows["validation"]["quarantined_by_check"] == "(hashed from train)"
    # the cap keeps the first N validation pairs in file order
    capped = ingest(_cfg(str(path), eval_fraction=0.2, validation_fraction=0.25, max_validation_pairs=5),
                    root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    val = capped.pairs.loc[capped.pairs["split"] == "validation", "pair_id"].tolist()
    assert val == [p for p, s in after.items() if s == "validation"][:5]
    assert capped.report["left_out_by_max_pairs"]["validation"] == second.report["pairs"]["validation"] - 5


def test_validation_is_a_reserved_split_name(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _pairs(10))
    cfg = _cfg(str(path), extra_eval={"validation": {"path": str(path)}})
    with pytest.raises(DataError, match="'validation' is reserved"):
        ingest(cfg, root=tmp_path, quarantine_path=tmp_path / "q.jsonl")


def test_report_rows_flatten_the_report_per_split(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _pairs(40) + [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    result = ingest(_cfg(str(path), max_train_pairs=10), root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    rows = {r["split"]: r for r in report_rows(result.report)}
    assert rows["train"]["read"] == 41 and rows["train"]["quarantined_by_check"] == "chosen_equals_rejected 1"
    assert rows["train"]["pairs"] == 10 and rows["train"]["left_out_by_max_pairs"] == 40 - 10 - rows["eval"]["pairs"]
    assert rows["train"]["pairs"] + rows["eval"]["pairs"] + rows["train"]["left_out_by_max_pairs"] == 40


def test_max_pairs_keep_the_first_n_and_report_the_rest(tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", _pairs(30))
    test = _write_jsonl(tmp_path / "e.jsonl", _pairs(10, start=100))
    cfg = DataConfig(train=[SourceConfig(path=str(train))], eval=[SourceConfig(path=str(test))],
                     max_train_pairs=12, max_eval_pairs=4)
    result = ingest(cfg, root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    _assert_accounted(result.report)
    assert result.report["pairs"] == {"train": 12, "eval": 4}
    assert result.report["left_out_by_max_pairs"] == {"train": 18, "eval": 6}
    train_prompts = [p[0]["content"] for p in result.pairs.loc[result.pairs["split"] == "train", "prompt"]]
    assert train_prompts == [f"Question {i}?" for i in range(12)]


def test_pairs_in_two_splits_are_kept_once(tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", _pairs(10))
    test = _write_jsonl(tmp_path / "e.jsonl", _pairs(5, start=8))  # 8, 9 also in train
    cfg = DataConfig(train=[SourceConfig(path=str(train))], eval=[SourceConfig(path=str(test))])
    result = ingest(cfg, root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    _assert_accounted(result.report)
    assert result.report["splits"]["eval"]["duplicates_across_splits"] == 2
    assert result.report["pairs"] == {"train": 10, "eval": 3}


def test_reserved_extra_eval_name_and_empty_eval_list(tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", _pairs(3))
    with pytest.raises(DataError, match="reserved"):
        ingest(DataConfig(train=[SourceConfig(path=str(train))], extra_eval={"train": SourceConfig(path=str(train))}),
               root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    with pytest.raises(DataError, match="empty list"):
        ingest(DataConfig(train=[SourceConfig(path=str(train))], eval=[]), root=tmp_path,
               quarantine_path=tmp_path / "q.jsonl")


def test_explicit_format_and_field_renames(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Q{i}", "good": f"a{i}", "bad": f"b{i}"}
                                               for i in range(3)])
    src = SourceConfig(path=str(path), format="trl", fields={"prompt": "instruction", "chosen": "good",
                                                             "rejected": "bad"})
    result = ingest(DataConfig(train=[src], eval=None), root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    assert result.report["accepted"] == 3
    with pytest.raises(DataError, match="does not have"):
        ingest(DataConfig(train=[SourceConfig(path=str(path), format="trl", fields={"question": "x"})]),
               root=tmp_path, quarantine_path=tmp_path / "q.jsonl")


# ---------------------------------------------------------------------------------------------- selection and gate


def _train_ids(result) -> list[str]:
    return result.pairs.loc[result.pairs["split"] == "train", "pair_id"].tolist()


def _ids(records: list[dict]) -> list[str]:
    from dpo_data.formats import make_pair_id

    return [make_pair_id([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in records]


def test_select_newest_takes_the_last_n_by_file_modification_time(tmp_path):
    import os

    folder = tmp_path / "incoming"
    folder.mkdir()
    old, new = _pairs(6), _pairs(4, start=50)
    # the newer file sorts first by name: arrival order, not file order, decides
    _write_jsonl(folder / "b-old.jsonl", old)
    _write_jsonl(folder / "a-new.jsonl", new)
    os.utime(folder / "b-old.jsonl", (1_000, 1_000))
    os.utime(folder / "a-new.jsonl", (2_000, 2_000))
    cfg = DataConfig(train=[SourceConfig(path=str(folder))], eval=None, eval_fraction=0.01, max_train_pairs=5,
                     select="newest")
    result = ingest(cfg, root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    _assert_accounted(result.report)
    assert _train_ids(result) == _ids(old)[-1:] + _ids(new)  # arrival order: the last old pair, then the new file
    assert result.report["select"]["newest_arrival"].startswith("1970-01-01T00:33:20")
    files = result.report["splits"]["train"]["sources"][0]["files"]
    assert files["incoming/a-new.jsonl"]["records"] == 4 and len(files["incoming/a-new.jsonl"]["sha256"]) == 64
    # the same files again: the same selection and fingerprint (the rule is stable across runs)
    again = ingest(cfg, root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    assert _train_ids(again) == _train_ids(result) and again.train_fingerprint == result.train_fingerprint
    first = ingest(cfg.model_copy(update={"select": "first"}), root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    assert _train_ids(first) == _ids(new) + _ids(old)[:1]  # file order
    every = ingest(cfg.model_copy(update={"select": "all", "max_train_pairs": None}), root=tmp_path,
                   quarantine_path=tmp_path / "q.jsonl")
    assert sorted(_train_ids(every)) == sorted(_ids(old) + _ids(new))


def test_added_at_overrides_the_file_time_and_bad_values_are_quarantined(tmp_path):
    records = _pairs(4)
    for rec, stamp in zip(records, ["2026-03-02T10:00:00Z", 1_700_000_000, "2026-03-01", "2026-03-02T09:00:00+01:00"]):
        rec["added_at"] = stamp
    bad = {**_pairs(1, start=9)[0], "added_at": "last tuesday"}
    path = _write_jsonl(tmp_path / "d.jsonl", records + [bad])
    cfg = DataConfig(train=[SourceConfig(path=str(path))], eval=None, eval_fraction=0.01, max_train_pairs=2,
                     select="newest", max_invalid_fraction=0.5)
    result = ingest(cfg, root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    _assert_accounted(result.report)
    ids = _ids(records)
    assert _train_ids(result) == [ids[3], ids[0]]  # 08:00 UTC, then 10:00 UTC on 2 March
    assert result.report["splits"]["train"]["quarantined_by_check"] == {"bad_added_at": 1}


def test_select_all_with_a_cap_is_a_config_error():
    with pytest.raises(ValueError, match="data.select=all trains on every pair"):
        DataConfig(select="all", max_train_pairs=10)


def test_a_gate_set_is_read_first_and_never_trains(tmp_path):
    gate_records = _pairs(4, start=100)
    gate = _write_jsonl(tmp_path / "gate.jsonl", gate_records)
    # two gate pairs reappear in the training data and one in the eval file
    train = _write_jsonl(tmp_path / "t.jsonl", _pairs(10) + gate_records[:2])
    test = _write_jsonl(tmp_path / "e.jsonl", _pairs(3, start=200) + gate_records[2:3])
    cfg = DataConfig(train=[SourceConfig(path=str(train))], eval=[SourceConfig(path=str(test))])
    result = ingest(cfg, root=tmp_path, quarantine_path=tmp_path / "q.jsonl", gate_source=SourceConfig(path=str(gate)))
    _assert_accounted(result.report)
    assert result.report["pairs"] == {"train": 10, "eval": 3, "gate": 4}
    assert result.report["splits"]["train"]["duplicates_across_splits"] == 2
    assert result.report["splits"]["eval"]["duplicates_across_splits"] == 1
    by_split = result.pairs.groupby("split")["pair_id"].apply(set)
    assert by_split["gate"] == set(_ids(gate_records)) and not by_split["gate"] & by_split["train"]
    assert result.report["gate_set_id"] == pair_set_id(_ids(gate_records))
    assert list(result.pairs["split"].unique()) == ["train", "eval", "gate"]


def test_a_pinned_eval_split_replaces_the_held_out_pairs_and_never_trains(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", _pairs(40))
    cfg = DataConfig(train=[SourceConfig(path=str(data))], eval=None, eval_fraction=0.25, max_eval_pairs=4)
    first = ingest(cfg, root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    eval_pairs = first.pairs[first.pairs["split"] == "eval"]
    # the pinned pairs from the first run: the same files give the same table
    same = ingest(cfg, root=tmp_path, quarantine_path=tmp_path / "q.jsonl", pinned_eval=eval_pairs,
                  pinned_origin="champion v1")
    _assert_accounted(same.report)
    assert same.fingerprint == first.fingerprint and same.report["eval_split"] == "pinned"
    assert same.report["splits"]["eval"]["sources"][0]["name"] == "champion v1"
    # new pairs written before the old ones: unpinned, the first held-out pairs (the eval split) change; pinned, the
    # eval split stays the pinned pairs and none of them trains
    _write_jsonl(data, _pairs(30, start=500) + _pairs(40))
    later = ingest(cfg, root=tmp_path, quarantine_path=tmp_path / "q.jsonl", pinned_eval=eval_pairs)
    _assert_accounted(later.report)
    later_eval = later.pairs[later.pairs["split"] == "eval"]
    assert later_eval["pair_id"].tolist() == eval_pairs["pair_id"].tolist()
    assert not set(eval_pairs["pair_id"]) & set(_train_ids(later))
    unpinned = ingest(cfg, root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    assert unpinned.pairs.loc[unpinned.pairs["split"] == "eval", "pair_id"].tolist() != eval_pairs["pair_id"].tolist()
    # explicit eval sources are replaced too
    test = _write_jsonl(tmp_path / "e.jsonl", _pairs(5, start=900))
    with_sources = ingest(cfg.model_copy(update={"eval": [SourceConfig(path=str(test))]}), root=tmp_path,
                          quarantine_path=tmp_path / "q.jsonl", pinned_eval=eval_pairs)
    _assert_accounted(with_sources.report)
    assert with_sources.pairs.loc[with_sources.pairs["split"] == "eval", "pair_id"].tolist() == \
        eval_pairs["pair_id"].tolist()


def test_reserved_gate_name(tmp_path):
    gate = _write_jsonl(tmp_path / "gate.jsonl", _pairs(2))
    train = _write_jsonl(tmp_path / "t.jsonl", _pairs(3, start=10))
    with pytest.raises(DataError, match="reserved"):
        ingest(DataConfig(train=[SourceConfig(path=str(train))], extra_eval={"gate": SourceConfig(path=str(gate))}),
               root=tmp_path, quarantine_path=tmp_path / "q.jsonl")


# ---------------------------------------------------------------------------------------------- fingerprint / parquet


def test_fingerprint_is_a_content_hash(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _pairs(20))
    a = ingest(_cfg(str(path)), root=tmp_path, quarantine_path=tmp_path / "q.jsonl").fingerprint
    b = ingest(_cfg(str(path)), root=tmp_path, quarantine_path=tmp_path / "q2.jsonl").fingerprint
    assert a == b and len(a) == 16
    records = _pairs(20)
    records[3]["chosen"] += "!"
    _write_jsonl(path, records)
    assert ingest(_cfg(str(path)), root=tmp_path, quarantine_path=tmp_path / "q.jsonl").fingerprint != a


def test_pairs_round_trip_through_parquet(tmp_path):
    result = ingest(_cfg("data/llamafactory_dpo_en_demo/dpo_en_demo.json"), root=REPO,
                    quarantine_path=tmp_path / "q.jsonl")
    path = write_pairs(result.pairs, tmp_path / "pairs.parquet")
    back = read_pairs(path)
    pd.testing.assert_frame_equal(back, result.pairs)
    assert isinstance(back["prompt"][0], list) and isinstance(back["prompt"][0][0], dict)
    assert not list(tmp_path.glob(".pairs.parquet.*"))  # no temporary file left behind
    validate_pairs(back)


def test_quarantine_to_a_device_is_written_through_not_replaced(tmp_path):
    """`quarantine_path=/dev/null` discards entries; the device itself must survive (no rename over it)."""
    import os
    import stat

    result = ingest(_cfg("tests/bad_inputs/blank_strings.jsonl"), root=REPO, quarantine_path=Path(os.devnull))
    assert result.report["quarantined"] == 4
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    with pytest.raises(DataError, match="not a regular file"):
        write_pairs(result.pairs, Path(os.devnull))
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


# ----------------------------------------------------------------------------------------- unpaired (KTO)


def _unpaired(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 2 == 0} for i in range(n)]


def test_trl_unpaired_files_in_both_forms_with_bad_rows_quarantined(tmp_path):
    from data_contracts.unpaired import UNPAIRED_COLUMNS

    standard = _unpaired(4) + [{"prompt": "Q?", "completion": "A.", "label": "yes"},  # not a boolean
                               {"prompt": "Q?", "completion": "   ", "label": True}]  # blank completion
    conversational = [{"prompt": [{"role": "user", "content": f"Chat {i}?"}],
                       "completion": [{"role": "assistant", "content": f"Reply {i}."}], "label": i == 0}
                      for i in range(3)]
    _write_jsonl(tmp_path / "standard.jsonl", standard)
    _write_jsonl(tmp_path / "chat.jsonl", conversational)
    result = ingest(_cfg("standard.jsonl", "chat.jsonl"), root=tmp_path, quarantine_path=tmp_path / "q.jsonl",
                    unpaired=True)
    _assert_accounted(result.report)
    rows = result.unpaired  # the hashed eval split may hold some of them
    assert list(rows.columns) == UNPAIRED_COLUMNS and len(rows) == 7 and result.pairs.empty
    assert set(zip(rows["completion"], rows["label"])) == {
        ("Answer 0.", True), ("Answer 1.", False), ("Answer 2.", True), ("Answer 3.", False),
        ("Reply 0.", True), ("Reply 1.", False), ("Reply 2.", False)}
    assert {e["checks"][0] for e in read_quarantine(tmp_path / "q.jsonl")} == {"bad_label", "blank_completion"}
    counts = result.report["unpaired"]
    assert counts["train"] + counts.get("eval", 0) == 7 and not any(result.report["pairs"].values())
    assert result.train_fingerprint == pair_set_id(rows.loc[rows["split"] == "train", "row_id"])


def test_paired_data_trains_an_unpaired_objective_as_two_rows_per_pair(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", _pairs(6))
    result = ingest(_cfg("train.jsonl", validation_fraction=0.3), root=tmp_path,
                    quarantine_path=tmp_path / "q.jsonl", unpaired=True)
    pairs, rows = result.pairs, result.unpaired
    # every pair of the training splits (train and validation) split in two; the hashed eval split stays pairs
    assert len(rows) == 2 * pairs["split"].isin(["train", "validation"]).sum() and "eval" in set(pairs["split"])
    for split in ("train", "validation"):
        held = pairs[pairs["split"] == split]
        mine = rows[rows["split"] == split]
        assert mine["completion"].tolist() == [t for p in held.itertuples() for t in (p.chosen, p.rejected)]
        assert mine["label"].tolist() == [True, False] * len(held)
    assert result.train_fingerprint == pair_set_id(rows.loc[rows["split"] == "train", "row_id"])
    used = {r["split"]: r["unpaired_rows"] for r in report_rows(result.report)}
    assert used == {split: (rows["split"] == split).sum() for split in used}  # eval (pairs) 0
    # the same data for a pairwise objective: no unpaired rows, the fingerprint of the pairs alone
    plain = ingest(_cfg("train.jsonl", validation_fraction=0.3), root=tmp_path, quarantine_path=tmp_path / "p.jsonl")
    assert plain.unpaired.empty and plain.pairs.equals(pairs) and plain.fingerprint != result.fingerprint


def test_unpaired_data_for_a_pairwise_objective_is_a_one_line_error(tmp_path):
    _write_jsonl(tmp_path / "thumbs.jsonl", _unpaired(3))
    with pytest.raises(DataError, match="holds unpaired rows .* only an unpaired objective trains on them"):
        ingest(_cfg("thumbs.jsonl"), root=tmp_path, quarantine_path=tmp_path / "q.jsonl")


def test_unpaired_rows_round_trip_through_parquet(tmp_path):
    from dpo_data.ingest import read_unpaired, write_unpaired

    _write_jsonl(tmp_path / "thumbs.jsonl", _unpaired(3))
    rows = ingest(_cfg("thumbs.jsonl"), root=tmp_path, quarantine_path=tmp_path / "q.jsonl", unpaired=True).unpaired
    back = read_unpaired(write_unpaired(rows, tmp_path / "u.parquet"))
    assert back.to_dict("records") == rows.to_dict("records") and back["label"].dtype == bool


def test_kto_rows_mismatch_each_completion_with_another_prompts_seeded():
    from dpo_data.unpaired import kto_rows, unpair

    pairs = pd.DataFrame([{"pair_id": f"{i:016x}", "prompt": [{"role": "user", "content": f"Q{i}?"}],
                           "chosen": f"good {i}", "rejected": f"bad {i}", "source": "s", "meta": "{}",
                           "split": "train"} for i in range(5)])
    rows = unpair(pairs)
    kto = kto_rows(rows, seed=3)
    assert kto["pair_id"].tolist() == rows["row_id"].tolist() and kto["chosen"].tolist() == rows["completion"].tolist()
    by_id = rows.set_index("row_id")
    for row in kto.itertuples():
        other = by_id.loc[row.kl_row_id]
        assert row.rejected == other["completion"] and other["prompt"] != row.prompt  # another prompt's completion
    assert kto.equals(kto_rows(rows, seed=3)) and not kto.equals(kto_rows(rows, seed=4))
    with pytest.raises(DataError, match="all share one prompt"):
        kto_rows(unpair(pairs.assign(prompt=[[{"role": "user", "content": "same"}]] * 5)), seed=0)
