"""dpo_data.lineage: the data profile of a train split, its drift from the champion's, the lineage report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_core.config import DataConfig, SourceConfig
from dpo_data.ingest import ingest
from dpo_data.lineage import data_profile, drift, lineage_markdown, lineage_record


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _ingest(folder: Path, tmp_path: Path):
    cfg = DataConfig(train=[SourceConfig(path=str(folder))], eval=None, eval_fraction=0.01)
    result = ingest(cfg, root=tmp_path, quarantine_path=tmp_path / "q.jsonl")
    return result.pairs[result.pairs["split"] == "train"], result.report


def test_profile_drift_and_report(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    # 10 pairs with prompts of 10..19 characters, answers of 3 / 7 characters, one exact duplicate
    records = [{"prompt": "q" * (10 + i), "chosen": "yes", "rejected": "nope no"} for i in range(10)]
    _write(folder / "a.jsonl", records + records[:1])
    train, report = _ingest(folder, tmp_path)
    profile = data_profile(train, report)
    assert profile["pairs"] == len(train) == 10
    assert profile["formats"] == {"trl": 1.0}
    assert profile["prompt_chars"]["p50"] == pytest.approx(14.5)
    assert profile["chosen_chars"] == {"p10": 3.0, "p50": 3.0, "p90": 3.0}
    assert profile["duplicate_rate"] == pytest.approx(1 / 11, abs=1e-4)
    assert drift(profile, None) is None

    # a second delivery in another format, longer answers
    _write(folder / "b.jsonl", [{"prompt": f"Q{i}?", "response_0": "a" * 40, "response_1": "b",
                                 "better_response_id": 0} for i in range(10)])
    train2, report2 = _ingest(folder, tmp_path)
    later = data_profile(train2, report2)
    assert set(later["formats"]) == {"trl", "pku_saferlhf"} and sum(later["formats"].values()) == pytest.approx(1.0)
    moved = drift(later, profile)
    assert moved["pairs"] == {"now": 20, "champion": 10, "change": 10}
    assert moved["formats"]["pku_saferlhf"] == {"now": later["formats"]["pku_saferlhf"], "champion": 0.0}
    assert moved["chosen_chars"]["p90"]["change"] == pytest.approx(later["chosen_chars"]["p90"] - 3.0)

    lineage = lineage_record(report2, later, champion_profile=profile, champion_version="1", new_pairs=10,
                             previous_version="1")
    assert lineage["train_fingerprint"] == report2["train_fingerprint"]
    assert {Path(f).name for f in lineage["files"]} == {"a.jsonl", "b.jsonl"}
    text = lineage_markdown(lineage)
    assert "10 new train pairs since v1" in text and "Drift against champion v1" in text
    assert "| pairs | 20 | 10 | 10 |" in text
    first = lineage_markdown(lineage_record(report, profile, champion_profile=None, champion_version=None,
                                            new_pairs=10, previous_version=None))
    assert "10 new train pairs (no earlier version)" in first and "## Profile" in first
