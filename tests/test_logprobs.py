"""Log-probs: selective log-softmax on response positions equals a slow full log-softmax, token by token."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from dpo_core.batching import collate_pairs
from dpo_core.logprobs import LogprobError, sequence_logps, split_pair_logps
from dpo_core.templating import tokenize_pairs


def slow_reference_logps(model, batch) -> torch.Tensor:
    """Full forward, full log-softmax over the vocabulary, then a Python loop over response tokens."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    out = []
    for r in range(batch.input_ids.shape[0]):
        total = torch.zeros((), dtype=torch.float32)
        for t in range(1, batch.input_ids.shape[1]):
            if batch.response_mask[r, t]:
                total = total + logprobs[r, t - 1, batch.input_ids[r, t]]
        out.append(total)
    return torch.stack(out)


def _pairs():
    return pd.DataFrame(
        {
            "pair_id": ["p0", "p1", "p2"],
            "prompt": [
                [{"role": "user", "content": "What is the capital of France?"}],
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi " * 30}],
                [{"role": "user", "content": "Count to five."}],
            ],
            "chosen": ["Paris.", "Hi!", "One, two, three, four, five. " * 6],
            "rejected": ["I think it is Lyon, but I am not sure at all.", "No.", "1 2 3"],
        }
    )


@pytest.fixture()
def tokenized(tokenizer):
    df, report = tokenize_pairs(_pairs(), tokenizer, max_length=64, max_prompt_length=40)
    # the long prompt and the long chosen response are cut: the truncated cases are covered
    assert report.prompt_truncated >= 1 and report.chosen_truncated >= 1
    return df


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_sequence_logps_match_slow_full_log_softmax(tiny_model, tokenizer, tokenized, chunk_size):
    batch = collate_pairs(tokenized.to_dict("records"), tokenizer.pad_token_id)
    assert (batch.attention_mask == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        fast, counts = sequence_logps(tiny_model, batch, chunk_size=chunk_size)
        slow = slow_reference_logps(tiny_model, batch)
    assert fast.dtype == torch.float32 and fast.shape == (6,)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    lengths = [len(x) for x in tokenized["chosen_ids"]] + [len(x) for x in tokenized["rejected_ids"]]
    assert counts.tolist() == lengths


def test_padding_does_not_change_a_rows_score(tiny_model, tokenizer, tokenized):
    rows = tokenized.to_dict("records")
    with torch.no_grad():
        together, _ = sequence_logps(tiny_model, collate_pairs(rows, tokenizer.pad_token_id))
        alone = [sequence_logps(tiny_model, collate_pairs([r], tokenizer.pad_token_id))[0] for r in rows]
    chosen, rejected = split_pair_logps(together)
    torch.testing.assert_close(chosen, torch.stack([a[0] for a in alone]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, torch.stack([a[1] for a in alone]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_gradients_match_the_slow_computation(tokenizer, tokenized, chunk_size):
    from dpo_core.models import tiny_llama

    batch = collate_pairs(tokenized.to_dict("records"), tokenizer.pad_token_id)
    grads = []
    for fn in (lambda m: sequence_logps(m, batch, chunk_size=chunk_size)[0], lambda m: slow_reference_logps(m, batch)):
        model = tiny_llama(tokenizer, seed=3).train()
        (fn(model) * torch.linspace(-1, 1, 6)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    # float32 with the machine's thread count: summation order differs between the two paths (and with the number of
    # threads), so this is 1e-5 of each gradient's scale; the float64 test below checks exactness
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-5 * g.abs().max().item(), rtol=1e-4, msg=name)


def test_chunked_head_equals_the_full_log_softmax_in_float64(tokenizer, tokenized):
    """In float64 the chunked head (logits recomputed in the backward) and the full log-softmax through autograd
    agree to rounding: per-token log-probs and every parameter's gradient, the tied embedding included."""
    from dpo_core.models import tiny_llama

    batch = collate_pairs(tokenized.to_dict("records"), tokenizer.pad_token_id)
    weights = torch.linspace(-1, 1, 6, dtype=torch.float64)
    grads, logps = [], []

    def full(model):  # the whole [rows, positions, vocab] log-softmax in the model's dtype (float64 here)
        logprobs = torch.log_softmax(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
        token = logprobs[:, :-1].gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        return (token * batch.response_mask[:, 1:]).sum(-1)

    for fn in (lambda m: sequence_logps(m, batch, chunk_size=7)[0], full):
        model = tiny_llama(tokenizer, seed=3).double().train()
        out = fn(model)
        (out * weights).sum().backward()
        logps.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert logps[0].dtype == torch.float64
    torch.testing.assert_close(logps[0], logps[1], atol=1e-9, rtol=1e-12)
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-12 * max(1.0, g.abs().max().item()), rtol=1e-9,
                                   msg=name)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_head_gradcheck(softcap, with_bias):
    """``torch.autograd.gradcheck`` of the chunked head (states, weight and bias; soft-capping), float64, chunks that
    do not divide the positions; the WPO output equals log sum_v softmax_v^2 and carries no gradient."""
    from dpo_core.logprobs import _ChunkedHeadLogps, head_token_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=with_bias).double()
    states = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,))

    def fn(h, w, *b):  # the autograd function itself, so that gradcheck can vary the weight and the bias
        return _ChunkedHeadLogps.apply(h, w, b[0] if b else None, targets, 3, softcap, torch.float64, False)

    inputs = (states, head.weight.detach().clone().requires_grad_(True))
    if with_bias:
        inputs += (head.bias.detach().clone().requires_grad_(True),)
    assert torch.autograd.gradcheck(fn, inputs)
    logits = torch.nn.functional.linear(states, *inputs[1:])
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logps, sum_sq = head_token_logps(head, states, targets, chunk_size=3, softcap=softcap, with_sum_sq=True)
    full = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(logps, full.gather(-1, targets[:, None]).squeeze(-1))
    torch.testing.assert_close(sum_sq, torch.logsumexp(2 * full, dim=-1))
    assert logps.dtype == torch.float64 and not sum_sq.requires_grad


def test_chunked_head_under_autocast_keeps_the_log_softmax_in_float32():
    """Under bf16 autocast the head's matmuls run in bf16 (as ``F.linear`` would), the log-softmax in float32, and
    the gradients come back in the inputs' dtypes, close to float32 ones (device-agnostic; here on CPU)."""
    from dpo_core.logprobs import head_token_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 50, bias=False)
    states = torch.randn(9, 32, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    exact = head_token_logps(head, states, targets, chunk_size=4)[0]
    (g_states,) = torch.autograd.grad(exact.sum(), states)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head_token_logps(head, states, targets, chunk_size=4)[0]
    low.sum().backward()
    assert low.dtype == torch.float32 and states.grad.dtype == torch.float32
    assert head.weight.grad.dtype == torch.float32
    bf16 = torch.log_softmax(torch.nn.functional.linear(states.bfloat16(), head.weight.bfloat16()).float(), -1)
    torch.testing.assert_close(low, bf16.gather(-1, targets[:, None]).squeeze(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states.grad, g_states, atol=0.05, rtol=0.05)


def test_split_and_errors(tiny_model, tokenizer):
    chosen, rejected = split_pair_logps(torch.arange(6.0))
    assert chosen.tolist() == [0, 1, 2] and rejected.tolist() == [3, 4, 5]
    with pytest.raises(LogprobError, match="even number"):
        split_pair_logps(torch.arange(3.0))
    batch = collate_pairs([{"pair_id": "x", "prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}], 0)
    batch.response_mask[:, 0] = True
    with pytest.raises(LogprobError, match="position 0"):
        sequence_logps(tiny_model, batch)
    with pytest.raises(LogprobError, match="chunk_size"):
        sequence_logps(tiny_model, batch, chunk_size=0)
    batch.response_mask[:, 0] = False
    with pytest.raises(LogprobError, match="LM head"):
        sequence_logps(torch.nn.Linear(2, 2), batch)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_scores_like_the_padded_one(tokenizer, tokenized, attn):
    from dpo_core.batching import pack_pairs
    from dpo_core.models import tiny_llama

    model = tiny_llama(tokenizer, seed=1)
    model.config._attn_implementation = attn
    rows = tokenized.to_dict("records")
    packed = pack_pairs(rows)
    assert packed.input_ids.shape[0] == 1 and packed.is_packed
    assert packed.input_ids.shape[1] == packed.n_tokens == int(collate_pairs(rows, 0).attention_mask.sum())
    with torch.no_grad():
        padded_logps, padded_counts = sequence_logps(model, collate_pairs(rows, tokenizer.pad_token_id))
        packed_logps, packed_counts = sequence_logps(model, packed, chunk_size=5)
    torch.testing.assert_close(packed_logps, padded_logps, atol=1e-5, rtol=1e-5)
    assert packed_counts.tolist() == padded_counts.tolist()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_shared_prompt_batch_scores_like_the_padded_one(tokenizer, tokenized, attn, chunk_size):
    """One row `prompt + chosen + rejected` per pair (4-D mask, restarted positions) == two padded rows per pair,
    in value and in gradient."""
    from dpo_core.batching import share_prompt_pairs
    from dpo_core.models import tiny_llama

    model = tiny_llama(tokenizer, seed=1)
    model.config._attn_implementation = attn
    rows = tokenized.to_dict("records")
    shared = share_prompt_pairs(rows, tokenizer.pad_token_id)
    padded = collate_pairs(rows, tokenizer.pad_token_id)
    assert shared.layout == "shared_prompt" and shared.input_ids.shape[0] == len(rows)
    prompts = sum(len(r["prompt_ids"]) for r in rows)
    assert shared.n_tokens == padded.n_tokens - prompts  # every prompt computed once instead of twice
    assert shared.n_sequence_tokens == padded.n_tokens  # ... but the same trained tokens are counted
    shared_logps, shared_counts = sequence_logps(model, shared, chunk_size=chunk_size)
    grad_shared = torch.autograd.grad(shared_logps.sum(), model.model.embed_tokens.weight)[0]
    padded_logps, padded_counts = sequence_logps(model, padded)
    grad_padded = torch.autograd.grad(padded_logps.sum(), model.model.embed_tokens.weight)[0]
    torch.testing.assert_close(shared_logps, padded_logps, atol=1e-5, rtol=1e-5)
    scale = float(grad_padded.abs().max())  # float32 sums in another order: compare at the gradient's scale
    torch.testing.assert_close(grad_shared, grad_padded, atol=1e-5 * scale, rtol=1e-4)
    assert shared_counts.tolist() == padded_counts.tolist()


def test_shared_prompt_mask_is_what_makes_it_right(tokenizer, tokenized):
    """Let the rejected tokens see the chosen response (the mistake the mask prevents): log-probs must change."""
    from dpo_core.batching import share_prompt_pairs
    from dpo_core.models import tiny_llama

    model = tiny_llama(tokenizer, seed=1)
    rows = tokenized.to_dict("records")
    good = share_prompt_pairs(rows, tokenizer.pad_token_id)
    leaky = share_prompt_pairs(rows, tokenizer.pad_token_id)
    width = leaky.input_ids.shape[1]
    leaky.attention_4d = leaky.attention_4d | torch.ones(width, width, dtype=torch.bool).tril()
    leaky.attention_4d &= leaky.attention_mask.bool()[:, None, None, :] | torch.eye(width, dtype=torch.bool)
    with torch.no_grad():
        right, _ = sequence_logps(model, good)
        wrong, _ = sequence_logps(model, leaky)
        reference, _ = sequence_logps(model, collate_pairs(rows, tokenizer.pad_token_id))
    n = len(rows)
    torch.testing.assert_close(wrong[:n], reference[:n], atol=1e-5, rtol=1e-5)  # chosen never sees rejected
    assert (wrong[n:] - reference[n:]).abs().max() > 1e-3
    torch.testing.assert_close(right, reference, atol=1e-5, rtol=1e-5)


def test_shared_prompt_refuses_attention_without_4d_masks(tokenizer, tokenized):
    from dpo_core.batching import share_prompt_pairs
    from dpo_core.models import tiny_llama

    model = tiny_llama(tokenizer, seed=1)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(LogprobError, match="sdpa or eager"):
        sequence_logps(model, share_prompt_pairs(tokenized.to_dict("records"), tokenizer.pad_token_id))


def _slow_token_terms(model, batch):
    """Per padded row: the list of (log p(y_t), log sum_v p_v^2) of its response tokens, from the full softmax."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        logprobs = torch.log_softmax(logits, -1)
    rows = []
    for r in range(batch.input_ids.shape[0]):
        terms = [(float(logprobs[r, t - 1, batch.input_ids[r, t]]), float(torch.logsumexp(2 * logprobs[r, t - 1], -1)))
                 for t in range(1, batch.input_ids.shape[1]) if batch.response_mask[r, t]]
        rows.append(terms)
    return rows


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
def test_shared_length_and_wpo_sums_in_every_layout(tokenizer, tokenized, layout):
    """``shared_logps`` sums the first min(|y_w|, |y_l|) tokens of each response; ``wpo_logps`` sums
    log p(y_t) - log sum_v p_v^2 (detached); both equal the full-softmax computation, whatever the layout."""
    from dpo_core.batching import make_batch
    from dpo_core.logprobs import sequence_scores
    from dpo_core.models import tiny_llama

    model = tiny_llama(tokenizer, seed=1)
    rows = tokenized.to_dict("records")
    terms = _slow_token_terms(model, collate_pairs(rows, tokenizer.pad_token_id))
    b = len(rows)
    shared_length = [min(len(terms[i]), len(terms[b + i])) for i in range(b)] * 2
    assert shared_length[:b] != [len(t) for t in terms[:b]], "some chosen response is longer than its rejected one"
    expected_shared = [sum(lp for lp, _ in terms[k][: shared_length[k]]) for k in range(2 * b)]
    expected_wpo = [sum(lp - sq for lp, sq in terms[k]) for k in range(2 * b)]
    scores = sequence_scores(model, make_batch(rows, tokenizer.pad_token_id, layout), chunk_size=5, shared=True,
                             wpo=True)
    assert scores.shared_logps.tolist() == pytest.approx(expected_shared, abs=1e-4)
    assert scores.wpo_logps.tolist() == pytest.approx(expected_wpo, abs=1e-4)
    assert scores.shared_logps.requires_grad and not scores.wpo_logps.requires_grad
    assert sequence_scores(model, collate_pairs(rows, tokenizer.pad_token_id)).shared_logps is None
