"""Same batch, same process, alternating: the steadiest engine-vs-engine comparison on a shared machine.

    python -m bench.same_batch [--threads 2] [--repeats 5]

One training step (forward, backward, clip, AdamW) on the same 4 benchmark pairs, for each of

* `two padded rows, per-tensor AdamW`: `bench.profile_step._ours_step` (two right-padded rows per pair, LM head on
  response positions only) with the unfused `torch.optim.AdamW` (the trainer before it switched to fused);
* `two padded rows + fused AdamW`: the same with `AdamW(fused=True)` (`train.batch_layout: padded`);
* `shared prompt + fused AdamW`: the trainer's default (`dpo_core.batching.share_prompt_pairs`, one row per pair);
* `trl`: TRL's fused-LM-head forward on its collated batch + `AdamW(fused=True)`,

run round-robin `--repeats` times after a warm-up, so load from other jobs hits all of them alike. Reports the
median step time of each and the median of per-repeat ratios against `trl`. Three full model copies are alive.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import BenchSettings, load_bench_data, load_policy, load_tokenizer, model_dir, set_threads
from bench.profile_step import _ours_step, _trl_step


def _shared_step(model, opt, rows, pad_id, ref, beta):
    from dpo_core.batching import share_prompt_pairs
    from dpo_core.logprobs import sequence_logps, split_pair_logps

    chosen, rejected = split_pair_logps(sequence_logps(model, share_prompt_pairs(rows, pad_id))[0])
    loss = -F.logsigmoid(beta * ((chosen - ref[0]) - (rejected - ref[1]))).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from dpo_core.models import pad_id

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=BenchSettings().threads)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    set_threads(args.threads)
    s = BenchSettings()
    path = model_dir()
    tok = load_tokenizer(path)
    rows = load_bench_data(tok, s, args.pairs).tokenized.to_dict("records")
    ref = (torch.full((args.pairs,), -150.0), torch.full((args.pairs,), -150.0))
    pad = pad_id(tok)

    ours = load_policy(path).train()
    shared = copy.deepcopy(ours)
    trl = copy.deepcopy(ours)
    add_fused_lm_head(trl, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # as DPOTrainer does
    opt_default = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    opt_fused = torch.optim.AdamW(ours.parameters(), lr=1e-5, fused=True)
    opt_shared = torch.optim.AdamW(shared.parameters(), lr=1e-5, fused=True)
    opt_trl = torch.optim.AdamW(trl.parameters(), lr=1e-5, fused=True)
    collator = DataCollatorForPreference(pad_token_id=pad, max_length=s.max_length)
    examples = [{k: list(r[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows]
    steps = {
        "two padded rows, per-tensor AdamW": lambda: _ours_step(ours, opt_default, rows, pad, ref, s.beta),
        "two padded rows + fused AdamW": lambda: _ours_step(ours, opt_fused, rows, pad, ref, s.beta),
        "shared prompt + fused AdamW (default)": lambda: _shared_step(shared, opt_shared, rows, pad, ref, s.beta),
        "trl": lambda: _trl_step(trl, opt_trl, examples, collator, ref, s.beta),
    }
    for fn in steps.values():  # warm-up: optimizer state, lazy init
        fn()
    secs: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            secs[name].append(time.perf_counter() - t)
    two_row = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    print(f"{args.pairs} pairs ({two_row} trained tokens), {args.threads} threads, {args.repeats} repeats")
    print("| step | median s | trained tokens/s | speed vs TRL (median of per-repeat ratios) |")
    print("|---|---|---|---|")
    for name, xs in secs.items():
        ratio = statistics.median(t / o for t, o in zip(secs["trl"], xs))
        med = statistics.median(xs)
        print(f"| {name} | {med:.2f} | {two_row / med:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
