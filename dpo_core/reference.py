"""The reference model's log-probs, computed once in a batched no-grad pass and stored as a Parquet table.

Training reads this table (``pair_id, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens``, and the sums over
the response length both answers share, ``chosen_shared_logps, rejected_shared_logps``, which LD-DPO reads) instead of
keeping a second, frozen model in memory and running it every step. The pairs are scored by
``dpo_core.scoring.score_pairs`` (length-sorted batches, no grad), and the table comes back in the order of the input
rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dpo_core.fileio import atomic_file
from dpo_core.models import DeviceSpec
from dpo_core.scoring import score_pairs

__all__ = ["REFERENCE_COLUMNS", "ReferenceError", "compute_reference_logps", "write_reference_table",
           "read_reference_table"]

# the columns of data_contracts.reference.ReferenceLogps, in order (tests/test_contracts.py holds them equal)
REFERENCE_COLUMNS = ["pair_id", "chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens",
                     "chosen_shared_logps", "rejected_shared_logps"]
_TOKENIZED_NEEDED = ("pair_id", "prompt_ids", "chosen_ids", "rejected_ids")


class ReferenceError(ValueError):
    """The reference pass cannot run or its table is unusable; the message says what is wrong."""


def compute_reference_logps(
    model: torch.nn.Module,
    tokenized_df: pd.DataFrame,
    *,
    batch_size: int,
    spec: DeviceSpec,
    chunk_size: int = 1024,
    layout: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Sequence log-probs of every pair's chosen and rejected response under ``model`` (``dpo_core.scoring.score_pairs``).

    Args:
        model: the frozen reference (for a peft model, disable the adapters around this call).
        tokenized_df: ``dpo_core.templating.tokenize_pairs`` output (any splits).
        batch_size: pairs per forward (2 * batch_size rows).
        spec: device and autocast settings.
        chunk_size: response positions per LM-head chunk.
        layout: batch layout (``dpo_core.batching``; ``auto`` picks the shared-prompt row where attention allows).
        progress: called as ``progress(done_pairs, total_pairs)`` after every batch.

    Returns:
        DataFrame with ``REFERENCE_COLUMNS`` in the row order of ``tokenized_df``: float64 sums, int64 counts.
    """
    missing = [c for c in _TOKENIZED_NEEDED if c not in tokenized_df.columns]
    if missing:
        raise ReferenceError(f"tokenized pairs are missing column(s) {missing}")
    rows = tokenized_df[list(_TOKENIZED_NEEDED)].to_dict("records")
    scores = score_pairs(model, rows, batch_size=batch_size, spec=spec, chunk_size=chunk_size, layout=layout,
                         progress=progress)
    bad = ~(np.isfinite(scores.chosen_logps) & np.isfinite(scores.rejected_logps))
    if bad.any():
        ids = [rows[i]["pair_id"] for i in np.flatnonzero(bad)[:3]]
        raise ReferenceError(f"the reference model gives non-finite log-probs for {int(bad.sum())} pairs (e.g. {ids})")
    columns = {name: getattr(scores, name) for name in REFERENCE_COLUMNS[1:]}
    return pd.DataFrame({"pair_id": [str(r["pair_id"]) for r in rows], **columns})[REFERENCE_COLUMNS]


def write_reference_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the table as Parquet atomically (temporary file in the same folder, then rename)."""
    missing = [c for c in REFERENCE_COLUMNS if c not in df.columns]
    if missing:
        raise ReferenceError(f"reference table is missing column(s) {missing}")
    path = Path(path)
    with atomic_file(path, "wb") as handle:
        df[REFERENCE_COLUMNS].to_parquet(handle, index=False)
    return path


def read_reference_table(path: str | Path) -> pd.DataFrame:
    """Read a table written by ``write_reference_table``; a clear error for a missing file or wrong columns."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceError(f"reference table {path} does not exist")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise ReferenceError(f"reference table {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    missing = [c for c in REFERENCE_COLUMNS if c not in df.columns]
    if missing:
        raise ReferenceError(f"reference table {path} is missing column(s) {missing}")
    return df[REFERENCE_COLUMNS]
