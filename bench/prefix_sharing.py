"""Prototype (bench only): score chosen and rejected with ONE pass over their shared prompt.

The engine runs `prompt + chosen` and `prompt + rejected` as two rows, so every prompt token goes through the
network twice. Here each pair is one row `prompt + chosen + rejected` with

* position ids `0..P-1, P..P+C-1, P..P+R-1` (the rejected response restarts where the prompt ends), and
* a 4-D attention mask: causal, except that rejected tokens do not see chosen tokens,

so every response token sees exactly the context it has in its own row, and log pi(y|x) is the same sum as
`dpo_core.logprobs.sequence_logps` gives (checked by `python -m bench.prefix_sharing --check`). The first rejected
token is predicted from the last prompt position, not from the position before it in the row.

`python -m bench.prefix_sharing` times forward + backward of both layouts on the benchmark pairs (interleaved,
same process) to measure what the engine would gain; see BENCHMARKS.md's notes. Not used by the pipeline.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class SharedPromptBatch:
    """B pairs as B rows `prompt + chosen + rejected`, right padded."""

    input_ids: torch.Tensor  # Long[B, T]
    position_ids: torch.Tensor  # Long[B, T]
    attention_mask: torch.Tensor  # Bool[B, 1, T, T], True = may attend
    rows: torch.Tensor  # Long[N]: row of each scored response token
    predictors: torch.Tensor  # Long[N]: position whose hidden state predicts it
    targets: torch.Tensor  # Long[N]: the token id
    slots: torch.Tensor  # Long[N]: 0..B-1 chosen of pair b, B..2B-1 rejected of pair b (PairBatch order)
    n_pairs: int
    n_tokens: int  # real tokens in the tensor (P + C + R per pair)


def collate_shared(rows: Sequence[Mapping], pad_id: int) -> SharedPromptBatch:
    b = len(rows)
    parts = [(list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])) for r in rows]
    width = max(len(p) + len(c) + len(r) for p, c, r in parts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, 1, width, width), dtype=torch.bool)
    rows_i, preds, targets, slots = [], [], [], []
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for i, (p, c, r) in enumerate(parts):
        n_p, n_c, n_r = len(p), len(c), len(r)
        n = n_p + n_c + n_r
        ids[i, :n] = torch.tensor(p + c + r)
        pos[i, :n] = torch.cat([torch.arange(n_p + n_c), torch.arange(n_p, n_p + n_r)])
        m = causal[:n, :n].clone()
        m[n_p + n_c :, n_p : n_p + n_c] = False  # rejected does not see chosen
        mask[i, 0, :n, :n] = m
        idx = torch.arange(n, width)
        mask[i, 0, idx, idx] = True  # padded queries attend to themselves only (no all-masked rows, no NaN)
        for t in range(n_p, n_p + n_c):  # chosen tokens: predicted from t - 1
            rows_i.append(i), preds.append(t - 1), targets.append(ids[i, t].item()), slots.append(i)
        for k, t in enumerate(range(n_p + n_c, n)):  # rejected: the first from the last prompt position
            rows_i.append(i), preds.append(n_p - 1 if k == 0 else t - 1), targets.append(ids[i, t].item())
            slots.append(b + i)
    return SharedPromptBatch(
        input_ids=ids, position_ids=pos, attention_mask=mask, rows=torch.tensor(rows_i), predictors=torch.tensor(preds),
        targets=torch.tensor(targets), slots=torch.tensor(slots), n_pairs=b,
        n_tokens=sum(len(p) + len(c) + len(r) for p, c, r in parts),
    )  # fmt: skip


def shared_logps(model: torch.nn.Module, batch: SharedPromptBatch, *, chunk_size: int = 1024) -> torch.Tensor:
    """Float32[2B] response log-prob sums (chosen rows then rejected rows, like `sequence_logps`)."""
    from dpo_core.logprobs import _token_logps, decoder_and_head

    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, use_cache=False)[0]  # fmt: skip
    states = hidden[batch.rows, batch.predictors]
    recompute = torch.is_grad_enabled() and states.requires_grad
    pieces = []
    for start in range(0, states.shape[0], chunk_size):
        args = (head, states[start : start + chunk_size], batch.targets[start : start + chunk_size], None)
        pieces.append(checkpoint(_token_logps, *args, use_reentrant=False) if recompute else _token_logps(*args))
    token_logps = torch.cat(pieces)
    return torch.zeros(2 * batch.n_pairs, dtype=torch.float32).index_add(0, batch.slots, token_logps)


def check(n_pairs: int = 4) -> float:
    """Max |shared - two-row| log-prob difference on the benchmark pairs (tiny random Llama, SDPA, float32)."""
    from bench.common import BenchSettings, load_bench_data, load_tokenizer, model_dir
    from dpo_core.batching import collate_pairs
    from dpo_core.logprobs import sequence_logps
    from dpo_core.models import tiny_llama

    tok = load_tokenizer(model_dir())
    rows = load_bench_data(tok, BenchSettings(), n_pairs).tokenized.to_dict("records")
    model = tiny_llama(tok, seed=0)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        two_rows = sequence_logps(model, collate_pairs(rows, tok.pad_token_id))[0]
        shared = shared_logps(model, collate_shared(rows, tok.pad_token_id))
    return float((two_rows - shared).abs().max())


def time_both(threads: int, rounds: int) -> dict:
    """Forward + backward seconds of both layouts on the 16 benchmark pairs in length-grouped batches of 4."""
    from bench.common import BenchSettings, load_bench_data, load_policy, load_tokenizer, model_dir, set_threads
    from dpo_core.batching import collate_pairs, length_grouped_batches, pair_length
    from dpo_core.logprobs import sequence_logps

    set_threads(threads)
    s = BenchSettings()
    path = model_dir()
    tok = load_tokenizer(path)
    rows = load_bench_data(tok, s, s.n_pairs).tokenized.to_dict("records")
    model = load_policy(path).train()
    order = length_grouped_batches([pair_length(r) for r in rows], s.batch_size, seed=s.seed)
    pad = tok.pad_token_id
    layouts = {
        "two rows per pair (engine)": lambda idx: sequence_logps(model, collate_pairs([rows[i] for i in idx], pad))[0],
        "shared prompt (prototype)": lambda idx: shared_logps(model, collate_shared([rows[i] for i in idx], pad)),
    }
    secs = {k: [] for k in layouts}
    for f in layouts.values():  # warm-up
        f(order[0]).sum().backward()
        model.zero_grad(set_to_none=True)
    for _ in range(rounds):
        for name, f in layouts.items():
            t = time.perf_counter()
            for idx in order:
                f(idx).sum().backward()
                model.zero_grad(set_to_none=True)
            secs[name].append(time.perf_counter() - t)
    return secs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check log-prob equality (tiny model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    diff = check()
    print(f"max |shared-prompt - two-row| log-prob difference (tiny model): {diff:.2e}")
    if args.check:
        return
    for name, xs in time_both(args.threads, args.rounds).items():
        print(f"{name}: forward+backward over 16 pairs: {', '.join(f'{x:.1f}' for x in xs)} s")


if __name__ == "__main__":
    main()
