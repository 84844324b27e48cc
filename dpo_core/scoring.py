"""Scoring tokenized pairs: each pair's summed response log-probs under a model, forward only, batched by length.

``score_pairs`` is the one scorer: the reference precompute (``dpo_core.reference``), the evaluation of the policy
(``dpo_core.evaluation.evaluate_preferences``) and the scoring of generated answers under the policy and the
reference (``dpo_core.evaluation.compare_generations``) all call it. Pairs are sorted by length, longest first
(``dpo_core.batching.length_grouped_batches`` without a shuffle), and cut into batches, so a batch carries little
padding; each batch is built in the model's layout (``dpo_core.batching.make_batch``, padded with
``dpo_core.models.pad_id`` of the model's config), scored by ``dpo_core.logprobs.sequence_scores`` in eval mode under
``torch.no_grad``, and the results are put back in the input order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dpo_core.batching import length_grouped_batches, make_batch, pair_length
from dpo_core.logprobs import layout_for, sequence_scores, split_pair_logps
from dpo_core.models import DeviceSpec, model_spec, pad_id

__all__ = ["ScoringError", "PairScores", "score_pairs"]


class ScoringError(ValueError):
    """The pairs cannot be scored with these arguments; the message says what is wrong."""


@dataclass(frozen=True)
class PairScores:
    """Per-pair scores in the order of the rows given.

    Attributes:
        chosen_logps, rejected_logps: float64 [N], summed log-probs of the chosen / rejected response tokens.
        chosen_tokens, rejected_tokens: int64 [N], how many response tokens each sum covers.
        chosen_shared_logps, rejected_shared_logps: float64 [N], the sums over the first min(|y_w|, |y_l|) response
            tokens (the length both responses have; LD-DPO, ``dpo_core.losses.ld_logps``).
        chosen_wpo_logps, rejected_wpo_logps: float64 [N] with ``wpo=True``, else None: sums of
            log p(y_t) - log sum_v p_v^2 (WPO, ``dpo_core.losses.wpo_weights``).
    """

    chosen_logps: np.ndarray
    rejected_logps: np.ndarray
    chosen_tokens: np.ndarray
    rejected_tokens: np.ndarray
    chosen_shared_logps: np.ndarray
    rejected_shared_logps: np.ndarray
    chosen_wpo_logps: np.ndarray | None = None
    rejected_wpo_logps: np.ndarray | None = None


def score_pairs(
    model: torch.nn.Module,
    rows: Sequence[Mapping],
    *,
    batch_size: int,
    spec: DeviceSpec | None = None,
    chunk_size: int = 1024,
    layout: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    wpo: bool = False,
) -> PairScores:
    """Summed response log-probs of every pair in ``rows`` under ``model``, batched, with no gradient.

    Args:
        model: any causal LM (for a peft model, disable the adapters around this call to score the base model).
        rows: tokenized pairs with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (``pair_id`` optional).
        batch_size: pairs per forward.
        spec: device and autocast; defaults to the model's own device without autocast.
        chunk_size: response positions per LM-head chunk.
        layout: batch layout (``dpo_core.batching``; ``auto`` picks the shared-prompt row where attention allows).
        progress: called as ``progress(done_pairs, total_pairs)`` after every batch.
        wpo: also return the WPO sums (one more logsumexp over the vocabulary per token).

    Returns:
        ``PairScores`` in the order of ``rows``. The model's train/eval mode is left as it was.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ScoringError(f"batch_size must be an int >= 1, got {batch_size!r}")
    spec = spec if spec is not None else model_spec(model)
    n = len(rows)
    names = ["chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens", "chosen_shared_logps",
             "rejected_shared_logps"] + (["chosen_wpo_logps", "rejected_wpo_logps"] if wpo else [])
    out = {name: np.zeros(n, dtype=np.int64 if name.endswith("tokens") else np.float64) for name in names}
    # one mega-batch holding every pair: a plain longest-first sort, cut into batches
    order = length_grouped_batches([pair_length(r) for r in rows], batch_size, seed=0,
                                   mega_batch_mult=max(1, -(-n // batch_size)), shuffle=False)
    pad, layout, was_training, done = pad_id(model.config), layout_for(model, layout), model.training, 0
    model.eval()
    try:
        with torch.no_grad():
            for indices in order:
                batch = make_batch([rows[i] for i in indices], pad, layout).to(spec.device)
                with spec.autocast():
                    scores = sequence_scores(model, batch, chunk_size=chunk_size, shared=True, wpo=wpo)
                columns = (*split_pair_logps(scores.logps.double()), *split_pair_logps(scores.counts),
                           *split_pair_logps(scores.shared_logps.double()))
                if wpo:
                    columns += split_pair_logps(scores.wpo_logps.double())
                for name, values in zip(out, columns):
                    out[name][indices] = values.cpu().numpy()
                done += len(indices)
                if progress is not None:
                    progress(done, n)
    finally:
        model.train(was_training)
    return PairScores(**out)
