"""Reference precompute: batched no-grad log-probs equal per-pair scoring, in input order, stored atomically."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from dpo_core.batching import collate_pairs
from dpo_core.logprobs import sequence_logps
from dpo_core.models import DeviceSpec
from dpo_core.reference import (
    REFERENCE_COLUMNS,
    ReferenceError,
    compute_reference_logps,
    read_reference_table,
    write_reference_table,
)
from dpo_core.scoring import ScoringError

CPU = DeviceSpec(torch.device("cpu"), torch.float32, None, "eager")


def _tokenized(n: int = 7) -> pd.DataFrame:
    rows = []
    for i in range(n):
        rows.append({"pair_id": f"p{i}", "split": "train", "prompt_ids": list(range(10, 13 + i)),
                     "chosen_ids": list(range(100, 102 + (i * 3) % 5)), "rejected_ids": list(range(200, 201 + i % 3))})
    return pd.DataFrame(rows)


def test_reference_table_matches_per_pair_scoring(tiny_model):
    df = _tokenized()
    calls = []
    table = compute_reference_logps(tiny_model.train(), df, batch_size=3, spec=CPU, chunk_size=4,
                                     progress=lambda d, t: calls.append((d, t)))
    assert list(table.columns) == REFERENCE_COLUMNS
    assert table["pair_id"].tolist() == df["pair_id"].tolist()
    assert table["chosen_logps"].dtype == "float64" and table["chosen_tokens"].dtype == "int64"
    assert calls[-1] == (7, 7) and len(calls) == 3
    assert tiny_model.training, "the model's train/eval mode is restored"
    with torch.no_grad():
        for row, ref in zip(df.to_dict("records"), table.itertuples()):
            logps, counts = sequence_logps(tiny_model.eval(), collate_pairs([row], 0))
            assert ref.chosen_logps == pytest.approx(float(logps[0]), abs=1e-5)
            assert ref.rejected_logps == pytest.approx(float(logps[1]), abs=1e-5)
            assert (ref.chosen_tokens, ref.rejected_tokens) == (len(row["chosen_ids"]), len(row["rejected_ids"]))
            # the shared-length part: the same sum over the first min(|y_w|, |y_l|) tokens of each response
            n = min(len(row["chosen_ids"]), len(row["rejected_ids"]))
            short = {**row, "chosen_ids": row["chosen_ids"][:n], "rejected_ids": row["rejected_ids"][:n]}
            shared, _ = sequence_logps(tiny_model, collate_pairs([short], 0))
            assert ref.chosen_shared_logps == pytest.approx(float(shared[0]), abs=1e-5)
            assert ref.rejected_shared_logps == pytest.approx(float(shared[1]), abs=1e-5)


def test_write_and_read_round_trip(tmp_path, tiny_model):
    table = compute_reference_logps(tiny_model, _tokenized(3), batch_size=2, spec=CPU)
    path = write_reference_table(table, tmp_path / "sub" / "reference.parquet")
    assert [p.name for p in path.parent.iterdir()] == ["reference.parquet"], "no temporary file left behind"
    pd.testing.assert_frame_equal(read_reference_table(path), table)


def test_bad_inputs_are_clear_errors(tmp_path, tiny_model):
    with pytest.raises(ReferenceError, match="missing column"):
        compute_reference_logps(tiny_model, _tokenized().drop(columns=["chosen_ids"]), batch_size=2, spec=CPU)
    with pytest.raises(ScoringError, match="batch_size"):
        compute_reference_logps(tiny_model, _tokenized(), batch_size=0, spec=CPU)
    with pytest.raises(ReferenceError, match="does not exist"):
        read_reference_table(tmp_path / "nope.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ReferenceError, match="cannot be read"):
        read_reference_table(tmp_path / "bad.parquet")
    with pytest.raises(ReferenceError, match="missing column"):
        write_reference_table(pd.DataFrame({"pair_id": ["a"]}), tmp_path / "x.parquet")
