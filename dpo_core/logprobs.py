"""Per-sequence response log-probabilities, computing the LM head only where it is needed.

For a row ``x_0 .. x_{n-1}`` whose response tokens are the positions ``t`` with ``response_mask[t]``, the score is

    log pi(y | x) = sum_{t in response} log softmax(W h_{t-1})[x_t]
                  = sum_{t in response} ( (W h_{t-1})[x_t] - logsumexp(W h_{t-1}) )

The base transformer runs once over the whole batch (chosen and rejected rows together); the LM head ``W`` is
applied only to the hidden states ``h_{t-1}`` that predict a response token, in chunks of ``chunk_size`` positions,
and each chunk uses a *selective* log-softmax (the gathered logit minus the logsumexp) instead of materialising a
full ``[positions, vocab]`` log-softmax. With gradients on, ``_ChunkedHeadLogps`` keeps only the hidden states, the
targets and one logsumexp per position; its backward recomputes each chunk's logits and turns them into the gradient
in place, ``d logp_t / d logits = onehot(x_t) - softmax(logits)``, so at most one chunk of ``[chunk_size, vocab]``
float32 values is alive at a time, forward or backward (a 1,000-token batch of a 49k vocabulary would otherwise keep
~200 MB of logits and build two more tensors of that size in the backward). The log-softmax is always float32; under
autocast the head's matmuls run in the autocast dtype, as ``F.linear`` would. Logits for prompt tokens are never
computed at all.

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
           "decoder_and_head", "head_token_logps", "attention_implementation", "layout_for"]


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
    """Selective log-softmax of one chunk through any head module: logit[target] - logsumexp(logits), in float32.

    Returns Float[N], or (Float[N], Float[N] detached log sum_v p_v^2) with ``with_sum_sq``. For heads that are not
    a plain ``nn.Linear`` (e.g. a peft adapter on the LM head); ``_ChunkedHeadLogps`` is the path for the rest.
    """
    logits = head(states).float()
    if softcap:  # Gemma-2 style final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_sum_sq:
        return logps
    return logps, (torch.logsumexp(2 * logits, dim=-1) - 2 * lse).detach()


def _chunk_logits(states, weight, bias, dtype, softcap):
    """Logits of one chunk, matmul in ``dtype``, in float32 (float64 for a float64 model); with ``softcap`` also
    ``tanh(z / softcap)`` (else None)."""
    z = torch.nn.functional.linear(states.to(dtype), weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if not softcap:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


class _ChunkedHeadLogps(torch.autograd.Function):
    """Per-token ``log softmax(W h + b)[target]`` in chunks of positions, recomputing the logits in the backward.

    Forward (per chunk of ``chunk_size`` positions): logits in float32, ``lse = logsumexp(logits)``,
    ``logp = logits[target] - lse``; saved for the backward: the states, the targets and ``lse`` (no logits).
    Backward (per chunk): the logits again, then in place ``G = g * (onehot(target) - exp(logits - lse))`` (times
    ``1 - tanh^2`` under soft-capping), ``dh = G W`` and ``dW += G^T h`` (``db += sum G``). With ``with_sum_sq``
    a second, non-differentiable output: log sum_v p_v^2 = logsumexp(2 logits) - 2 lse (WPO).
    """

    @staticmethod
    def forward(ctx, states, weight, bias, targets, chunk_size, softcap, dtype, with_sum_sq):
        n = states.shape[0]
        logps = torch.empty(n, dtype=torch.promote_types(dtype, torch.float32), device=states.device)
        lse = torch.empty_like(logps)
        sum_sq = torch.empty_like(logps) if with_sum_sq else None
        with torch.autocast(states.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                logits, _ = _chunk_logits(states[start:end], w, b, dtype, softcap)
                torch.logsumexp(logits, dim=-1, out=lse[start:end])
                logps[start:end] = logits.gather(-1, targets[start:end, None]).squeeze(-1) - lse[start:end]
                if with_sum_sq:
                    sum_sq[start:end] = torch.logsumexp(logits.mul_(2), dim=-1) - 2 * lse[start:end]
        ctx.save_for_backward(states, weight, bias, targets, lse)
        ctx.chunk_size, ctx.softcap, ctx.dtype = chunk_size, softcap, dtype
        if not with_sum_sq:
            return logps
        ctx.mark_non_differentiable(sum_sq)
        return logps, sum_sq

    @staticmethod
    def backward(ctx, grad_logps, *_):
        states, weight, bias, targets, lse = ctx.saved_tensors
        need_states, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype, softcap, n = ctx.dtype, ctx.softcap, states.shape[0]
        grad_states = torch.empty_like(states) if need_states else None
        acc = lse.dtype  # float32, or float64 for a float64 model
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
        with torch.autocast(states.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, n, ctx.chunk_size):
                end = min(start + ctx.chunk_size, n)
                h, g = states[start:end], grad_logps[start:end, None].to(acc)
                logits, t = _chunk_logits(h, w, b, dtype, softcap)
                grad = logits.sub_(lse[start:end, None]).exp_().mul_(-g)  # -g * softmax
                grad.scatter_add_(1, targets[start:end, None], g)
                if softcap:
                    grad.mul_(1 - t * t)
                if need_bias:
                    grad_bias += grad.sum(0)
                grad = grad.to(dtype)
                if need_states:
                    grad_states[start:end] = grad @ w
                if need_weight:
                    if dtype == acc:
                        grad_weight.addmm_(grad.T, h)
                    else:
                        grad_weight += (grad.T @ h.to(dtype)).to(acc)
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_states, grad_weight, grad_bias, None, None, None, None, None


def _is_plain_linear(head: torch.nn.Module) -> bool:
    """A head whose forward is exactly ``nn.Linear``'s on a floating-point weight (not a peft or quantized layer)."""
    return (isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward
            and head.weight.is_floating_point())


def head_token_logps(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, *, chunk_size: int,
                     softcap: float | None = None, with_sum_sq: bool = False):
    """Log-probs of ``targets`` Long[N] under the LM head applied to ``states`` [N, H], ``chunk_size`` positions at a
    time: ``(Float32[N], Float32[N] log sum_v p_v^2 detached, or None)`` (float64 for a float64 model).

    A plain linear head goes through ``_ChunkedHeadLogps`` (logits recomputed in the backward, never kept); any
    other head module runs chunk by chunk under activation checkpointing (the same memory bound, by autograd).
    """
    if _is_plain_linear(head):
        device = states.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
        out = _ChunkedHeadLogps.apply(states, head.weight, head.bias, targets, chunk_size, softcap, dtype,
                                      with_sum_sq)
        return out if with_sum_sq else (out, None)
    recompute = torch.is_grad_enabled() and states.requires_grad
    pieces = []
    for start in range(0, states.shape[0], chunk_size):
        args = (head, states[start : start + chunk_size], targets[start : start + chunk_size], softcap, with_sum_sq)
        pieces.append(checkpoint(_token_logps, *args, use_reentrant=False) if recompute else _token_logps(*args))
    if not pieces:
        empty = states.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_sum_sq else None)
    if not with_sum_sq:
        return torch.cat(pieces), None
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


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
    model: torch.nn.Module, batch: PairBatch, *, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs per row of ``batch``: ``(logps Float32[2B], token_counts Long[2B])``, the
    first two fields of ``sequence_scores`` (see there)."""
    scores = sequence_scores(model, batch, chunk_size=chunk_size)
    return scores.logps, scores.counts


def sequence_scores(
    model: torch.nn.Module,
    batch: PairBatch,
    *,
    chunk_size: int = 1024,
    shared: bool = False,
    wpo: bool = False,
) -> SequenceScores:
    """Sums of response-token log-probs per sequence of ``batch``, and what LD-DPO and WPO need of them.

    Args:
        model: a causal LM (optionally peft-wrapped) on the batch's device.
        batch: a ``PairBatch`` (2B sequences: chosen then rejected), in any layout.
        chunk_size: response positions per LM-head call (bounds the transient memory of the logits, forward and
            backward: ``head_token_logps``).
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
    token_logps, sum_sq = head_token_logps(head, states, targets, chunk_size=chunk_size, softcap=softcap,
                                           with_sum_sq=wpo)
    counts = torch.bincount(owner, minlength=n_sequences)

    def per_sequence(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_sequences, dtype=values.dtype, device=mask.device).index_add(0, owner, values)

    shared_logps = wpo_logps = None
    if shared:
        shared_logps = per_sequence(token_logps * _within_shared_length(owner, counts))
    if wpo:
        wpo_logps = per_sequence(token_logps.detach() - sum_sq)
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
