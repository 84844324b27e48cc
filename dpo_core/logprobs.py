"""Per-sequence response log-probabilities, computing the LM head only where it is needed.

For a row ``x_0 .. x_{n-1}`` whose response tokens are the positions ``t`` with ``response_mask[t]``, the score is

    log pi(y | x) = sum_{t in response} log softmax(W h_{t-1})[x_t]
                  = sum_{t in response} ( (W h_{t-1})[x_t] - logsumexp(W h_{t-1}) )

The base transformer runs once over the whole batch (chosen and rejected rows together); the LM head ``W`` is
applied only to the hidden states ``h_{t-1}`` that predict a response token, in chunks of ``chunk_size`` positions,
and each chunk uses a *selective* log-softmax (the gathered logit minus the logsumexp) instead of materialising a
full ``[positions, vocab]`` log-softmax. With gradients on, the float32 logits of a batch's response positions are
kept for the backward when they fit ``keep_logits_bytes`` (256 MiB by default: the batches of the CPU configs);
above that each chunk is recomputed in the backward pass instead (activation checkpointing), so at most one chunk
of logits is alive at a time. Logits for prompt tokens are never computed at all.

A packed batch (``dpo_core.batching.pack_pairs``: all sequences in one row, position ids restarting per sequence)
is scored the same way; sums then go to the sequence each token belongs to instead of to its row. A shared-prompt
batch (``dpo_core.batching.share_prompt_pairs``: one row ``prompt + chosen + rejected`` per pair) passes its 4-D
mask and position ids to the decoder and names each response token's predicting position in ``predictor_ids``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from dpo_core.batching import MASK_4D_ATTENTION, PairBatch, resolve_layout

__all__ = ["LogprobError", "SequenceScores", "sequence_scores", "sequence_logps", "split_pair_logps",
           "decoder_and_head", "attention_implementation", "layout_for"]


class LogprobError(ValueError):
    """The model or batch cannot be scored (no separable LM head, a response token at position 0, ...)."""


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(base transformer returning hidden states, LM head) of a causal LM or a peft-wrapped one.

    For a peft model the adapters live inside the wrapped model's modules, so calling its decoder directly keeps
    them active (and ``with model.disable_adapter():`` still turns them off).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = get_head() if callable(get_head) else None
    if decoder is None or head is None or decoder is base:
        raise LogprobError(
            f"{type(base).__name__} does not expose a base transformer (get_decoder) and an LM head "
            "(get_output_embeddings); use a Hugging Face *ForCausalLM model"
        )
    return decoder, head


def _token_logps(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                 with_sum_sq: bool = False):
    """Selective log-softmax of one chunk: logit[target] - logsumexp(logits), in float32. Float[N].

    ``with_sum_sq``: also log sum_v p_v^2 = logsumexp(2 logits) - 2 logsumexp(logits) per position (detached), as a
    second tensor Float[N].
    """
    logits = head(states).float()
    if softcap:  # Gemma-2 style final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_sum_sq:
        return logps
    return logps, (torch.logsumexp(2 * logits, dim=-1) - 2 * lse).detach()


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The attention kernel the model runs (transformers' ``config._attn_implementation``), None if it has none."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def layout_for(model: torch.nn.Module, layout: str = "auto") -> str:
    """The concrete batch layout for ``model`` (``dpo_core.batching.resolve_layout`` on its attention kernel)."""
    return resolve_layout(layout, attention_implementation(model))


def _attention_inputs(model: torch.nn.Module, batch: PairBatch) -> dict[str, torch.Tensor]:
    """Decoder keyword arguments for the batch's layout.

    Padded rows: the 2-D padding mask. Packed: position ids only (transformers derives the block-diagonal mask from
    them). Shared prompt: position ids and the 4-D mask as an *additive* float mask (0 = attend, the dtype's minimum
    = masked) in the dtype attention runs in, built once per batch. Eager attention adds it to the scores as is; SDPA
    would otherwise convert a boolean mask to this form inside each of the model's layers.
    """
    if batch.layout == "padded":
        return {"attention_mask": batch.attention_mask}
    if batch.layout == "packed":
        return {"position_ids": batch.position_ids}
    attn = attention_implementation(model)
    if attn not in MASK_4D_ATTENTION:
        raise LogprobError(f"a shared-prompt batch needs sdpa or eager attention (a 4-D mask), the model uses "
                           f"{attn!r}; build the batch with layout 'padded' or 'packed'")
    device = batch.attention_4d.device
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = next(model.parameters()).dtype
    mask = torch.zeros(batch.attention_4d.shape, dtype=dtype, device=device)
    mask.masked_fill_(~batch.attention_4d, torch.finfo(dtype).min)
    return {"attention_mask": mask, "position_ids": batch.position_ids}


KEEP_LOGITS_BYTES = 256 * 2**20


class SequenceScores(NamedTuple):
    """What ``sequence_scores`` returns for the 2B sequences of a batch (chosen then rejected).

    Attributes:
        logps: Float32[2B], sums of the response tokens' log-probs.
        counts: Long[2B], response tokens per sequence.
        shared_logps: Float32[2B] or None, sums over the first min(|y_w|, |y_l|) response tokens of each sequence, the
            length its pair's two responses share (LD-DPO, ``dpo_core.losses.ld_logps``).
        wpo_logps: Float32[2B] or None, detached sums of log p(y_t) - log sum_v p_v^2 over the response tokens (WPO,
            ``dpo_core.losses.wpo_weights``).
    """

    logps: torch.Tensor
    counts: torch.Tensor
    shared_logps: torch.Tensor | None = None
    wpo_logps: torch.Tensor | None = None


def sequence_logps(
    model: torch.nn.Module, batch: PairBatch, *, chunk_size: int = 1024, keep_logits_bytes: int = KEEP_LOGITS_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs per row of ``batch``: ``(logps Float32[2B], token_counts Long[2B])``, the
    first two fields of ``sequence_scores`` (see there)."""
    scores = sequence_scores(model, batch, chunk_size=chunk_size, keep_logits_bytes=keep_logits_bytes)
    return scores.logps, scores.counts


def sequence_scores(
    model: torch.nn.Module,
    batch: PairBatch,
    *,
    chunk_size: int = 1024,
    keep_logits_bytes: int = KEEP_LOGITS_BYTES,
    shared: bool = False,
    wpo: bool = False,
) -> SequenceScores:
    """Sums of response-token log-probs per sequence of ``batch``, and what LD-DPO and WPO need of them.

    Args:
        model: a causal LM (optionally peft-wrapped) on the batch's device.
        batch: a ``PairBatch`` (2B sequences: chosen then rejected), in any layout.
        chunk_size: response positions per LM-head call (bounds the transient memory of the logits).
        keep_logits_bytes: with gradients on, keep the float32 logits of all response positions for the backward
            when they take at most this many bytes; recompute them chunk by chunk in the backward otherwise
            (one more LM-head forward, at most one chunk of logits alive).
        shared: also sum over the first min(|y_w|, |y_l|) response tokens of each sequence (``shared_logps``).
        wpo: also sum log p(y_t) - log sum_v p_v^2 (``wpo_logps``; one more logsumexp over the vocabulary per token).

    Returns:
        ``SequenceScores``; ``shared_logps`` / ``wpo_logps`` are None unless asked for.
    """
    if chunk_size < 1:
        raise LogprobError(f"chunk_size must be >= 1, got {chunk_size}")
    mask = batch.response_mask
    if bool(mask[:, 0].any()):
        raise LogprobError("a response token at position 0 has no context to be predicted from; rows need a prompt")
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=batch.input_ids, use_cache=False, **_attention_inputs(model, batch))[0]

    rows, positions = mask.nonzero(as_tuple=True)  # the response tokens, row by row
    # the hidden state that predicts each one: the previous position, or as the batch says (shared prompt)
    prev = batch.predictor_ids[rows, positions] if batch.predictor_ids is not None else positions - 1
    states = hidden[rows, prev]  # [N, H]
    targets = batch.input_ids[rows, positions]
    # the sequence each response token belongs to (its own row unless packed or shared)
    owner = batch.sequence_ids[rows, positions] if batch.sequence_ids is not None else rows
    n_sequences = batch.n_sequences
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    recompute = torch.is_grad_enabled() and states.requires_grad and states.shape[0] * vocab * 4 > keep_logits_bytes
    pieces = []
    for start in range(0, states.shape[0], chunk_size):
        args = (head, states[start : start + chunk_size], targets[start : start + chunk_size], softcap, wpo)
        pieces.append(checkpoint(_token_logps, *args, use_reentrant=False) if recompute else _token_logps(*args))
    if wpo:
        pieces, sum_sq = [p[0] for p in pieces], [p[1] for p in pieces]
    token_logps = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)
    counts = torch.bincount(owner, minlength=n_sequences)

    def per_sequence(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_sequences, dtype=torch.float32, device=mask.device).index_add(0, owner, values)

    shared_logps = wpo_logps = None
    if shared:
        shared_logps = per_sequence(token_logps * _within_shared_length(owner, counts))
    if wpo:
        wpo_logps = per_sequence(token_logps.detach() - torch.cat(sum_sq)) if sum_sq else per_sequence(token_logps)
    return SequenceScores(per_sequence(token_logps), counts, shared_logps, wpo_logps)


def _within_shared_length(owner: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool[N]: which response tokens are among the first min(|y_w|, |y_l|) of their sequence.

    ``owner`` Long[N] names each token's sequence; every layout lists a sequence's tokens together and in order
    (row-major over the response mask), so a token's place in its sequence is its index minus the sequence's first.
    """
    index = torch.arange(owner.shape[0], device=owner.device)
    first = torch.full_like(counts, owner.shape[0]).scatter_reduce(0, owner, index, reduce="amin")
    chosen, rejected = split_pair_logps(counts)
    shared_length = torch.minimum(chosen, rejected).repeat(2)
    return (index - first[owner]) < shared_length[owner]


def split_pair_logps(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a [2B] tensor of a ``PairBatch`` into (chosen [B], rejected [B])."""
    if values.shape[0] % 2:
        raise LogprobError(f"expected an even number of rows (chosen then rejected), got {values.shape[0]}")
    half = values.shape[0] // 2
    return values[:half], values[half:]
