"""The reference model's log-probs, computed once in a batched no-grad pass and stored as a Parquet table.

Training reads this table (``pair_id, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens``) instead of
keeping a second, frozen model in memory and running it every step. Pairs are scored in length-sorted batches
(least padding), and the table comes back in the order of the input rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dpo_core.batching import length_grouped_batches, make_batch, pair_length
from dpo_core.fileio import atomic_file
from dpo_core.logprobs import layout_for, sequence_logps, split_pair_logps
from dpo_core.models import DeviceSpec

__all__ = ["REFERENCE_COLUMNS", "ReferenceError", "compute_reference_logps", "write_reference_table",
           "read_reference_table", "pad_id_of"]

REFERENCE_COLUMNS = ["pair_id", "chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens"]
_TOKENIZED_NEEDED = ("pair_id", "prompt_ids", "chosen_ids", "rejected_ids")


class ReferenceError(ValueError):
    """The reference pass cannot run or its table is unusable; the message says what is wrong."""


def pad_id_of(model: torch.nn.Module) -> int:
    """A pad id for right padding. Its value never matters (padded positions are masked and never scored)."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return int(pad) if isinstance(pad, int) else 0


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
    """Sequence log-probs of every pair's chosen and rejected response under ``model`` (no grad, eval mode).

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
    if batch_size < 1:
        raise ReferenceError(f"batch_size must be >= 1, got {batch_size}")
    rows = tokenized_df[list(_TOKENIZED_NEEDED)].to_dict("records")
    n = len(rows)
    out = {k: np.zeros(n, dtype=t) for k, t in
           (("chosen_logps", np.float64), ("rejected_logps", np.float64),
            ("chosen_tokens", np.int64), ("rejected_tokens", np.int64))}
    order = length_grouped_batches([pair_length(r) for r in rows], batch_size, seed=0,
                                   mega_batch_mult=max(1, -(-n // batch_size)), shuffle=False)
    pad_id, was_training, done = pad_id_of(model), model.training, 0
    layout = layout_for(model, layout)
    model.eval()
    try:
        with torch.no_grad():
            for indices in order:
                batch = make_batch([rows[i] for i in indices], pad_id, layout).to(spec.device)
                with spec.autocast():
                    logps, counts = sequence_logps(model, batch, chunk_size=chunk_size)
                columns = (*split_pair_logps(logps.double()), *split_pair_logps(counts))
                for name, values in zip(REFERENCE_COLUMNS[1:], columns):
                    out[name][indices] = values.cpu().numpy()
                done += len(indices)
                if progress is not None:
                    progress(done, n)
    finally:
        model.train(was_training)
    bad = ~(np.isfinite(out["chosen_logps"]) & np.isfinite(out["rejected_logps"]))
    if bad.any():
        ids = [rows[i]["pair_id"] for i in np.flatnonzero(bad)[:3]]
        raise ReferenceError(f"the reference model gives non-finite log-probs for {int(bad.sum())} pairs (e.g. {ids})")
    return pd.DataFrame({"pair_id": [str(r["pair_id"]) for r in rows], **out})[REFERENCE_COLUMNS]


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
