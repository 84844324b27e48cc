"""Where a training step's time goes: torch.profiler over one step of ours, TRL's and the seed loop's method.

    python -m bench.profile_step [--threads 2] [--pairs 4]

Same model, same 4 benchmark pairs, one warm-up step then one profiled step each, in one process (so the three
see the same machine state). Prints self-CPU time by category (matmul, attention, LM head log-softmax, optimizer,
elementwise/other) and the top operators; the numbers in BENCHMARKS.md's notes come from this.

* ours: the trainer's default batch (`share_prompt_pairs`: one row `prompt + chosen + rejected` per pair) ->
  `sequence_logps` (LM head on response positions only) -> sigmoid loss -> backward -> clip -> `AdamW(fused=True)`
  (the trainer's optimizer), reference log-probs from a table; `ours, two padded rows`: the same with
  `collate_pairs` (`train.batch_layout: padded`);
* TRL: its collator -> the fused-LM-head forward `DPOTrainer` uses (`add_fused_lm_head`; on CPU it scores every
  position) -> sigmoid loss -> backward -> clip -> `AdamW(fused=True)` (TRL's default `adamw_torch_fused`);
* seed: align-anything's method, the 4 pairs one at a time (batch 1) with a live reference forward.
"""

from __future__ import annotations

import argparse
import copy
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bench.common import BenchSettings, load_bench_data, load_policy, load_tokenizer, model_dir, set_threads

CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax")),
    ("log-softmax / logsumexp", ("log_softmax", "logsumexp", "aten::exp", "aten::gather", "aten::max")),
    ("optimizer", ("adam", "aten::_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k.lower() in low for k in keys):
            return cat
    return "other (elementwise, copies, norms, embedding)"


def _ours_step(model, opt, rows, pad_id, ref, beta, layout: str = "padded"):
    from dpo_core.batching import make_batch
    from dpo_core.logprobs import sequence_logps, split_pair_logps
    from dpo_core.losses import preference_loss

    batch = make_batch(rows, pad_id, layout)
    chosen, rejected = split_pair_logps(sequence_logps(model, batch)[0])
    out = preference_loss("sigmoid", chosen, rejected, ref[0], ref[1], beta=beta)
    out.losses.mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _trl_step(model, opt, examples, collator, ref, beta):
    inputs = collator(examples)
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                fused_lm_head=True, use_cache=False)  # fmt: skip
    chosen, rejected = out.log_probs.sum(dim=1).chunk(2, dim=0)
    loss = -F.logsigmoid(beta * ((chosen - ref[0]) - (rejected - ref[1]))).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _seed_step(model, reference, opt, rows, raw, tokenizer, beta):
    from bench.seed_loop import dpo_loss, left_pad_batch

    for row, r in zip(rows, raw):
        seqs = [list(row["prompt_ids"]) + list(row["chosen_ids"]), list(row["prompt_ids"]) + list(row["rejected_ids"])]
        lens = [min(len(tokenizer(r[k], add_special_tokens=False)["input_ids"]), len(row[f"{k}_ids"]))
                for k in ("chosen", "rejected")]  # fmt: skip
        out = dpo_loss(model, reference, left_pad_batch(seqs, tokenizer.pad_token_id), lens, tokenizer.pad_token_id,
                       beta)  # fmt: skip
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def profile_once(fn) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    fn()  # warm-up (optimizer state allocation, lazy init)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    by_cat: dict[str, float] = defaultdict(float)
    top = []
    for e in events:
        by_cat[categorize(e.key)] += e.self_cpu_time_total / 1e6
        top.append((e.key, e.self_cpu_time_total / 1e6))
    top.sort(key=lambda x: -x[1])
    return sum(by_cat.values()), dict(by_cat), top[:12]


def main(argv: list[str] | None = None) -> None:
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from dpo_core.models import pad_id

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=BenchSettings().threads)
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    s = BenchSettings()
    path = model_dir()
    tok = load_tokenizer(path)
    data = load_bench_data(tok, s, args.pairs)
    rows = data.tokenized.to_dict("records")
    ref = (torch.full((args.pairs,), -150.0), torch.full((args.pairs,), -150.0))
    base = load_policy(path).train()

    ours_model = base
    ours_opt = torch.optim.AdamW(ours_model.parameters(), lr=1e-5, fused=True)
    trl_model = copy.deepcopy(base)
    add_fused_lm_head(trl_model, outputs=("log_probs", "entropy", "is_top1", "mean_logits"))  # what DPOTrainer asks
    trl_opt = torch.optim.AdamW(trl_model.parameters(), lr=1e-5, fused=True)
    pad = pad_id(tok)
    collator = DataCollatorForPreference(pad_token_id=pad, max_length=s.max_length)
    examples = [{"prompt_ids": list(r["prompt_ids"]), "chosen_ids": list(r["chosen_ids"]),
                 "rejected_ids": list(r["rejected_ids"])} for r in rows]  # fmt: skip

    results = {
        "ours": profile_once(lambda: _ours_step(ours_model, ours_opt, rows, pad, ref, s.beta, "shared_prompt")),
        "ours, two padded rows": profile_once(lambda: _ours_step(ours_model, ours_opt, rows, pad, ref, s.beta,
                                                                 "padded")),
        "trl": profile_once(lambda: _trl_step(trl_model, trl_opt, examples, collator, ref, s.beta)),
    }
    del trl_model, trl_opt
    seed_ref = copy.deepcopy(base).eval().requires_grad_(False)
    seed_opt = torch.optim.AdamW(base.parameters(), lr=1e-5)
    results["seed (4 pairs, batch 1)"] = profile_once(
        lambda: _seed_step(base, seed_ref, seed_opt, rows, data.raw, tok, s.beta)
    )
    cats = [c for c, _ in CATEGORIES] + ["other (elementwise, copies, norms, embedding)"]
    print(f"self-CPU seconds per step of {args.pairs} pairs, {args.threads} threads")
    print("| category | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for c in cats:
        print(f"| {c} | " + " | ".join(f"{r[1].get(c, 0.0):.2f}" for r in results.values()) + " |")
    print("| **total** | " + " | ".join(f"{r[0]:.2f}" for r in results.values()) + " |")
    for name, (_, _, top) in results.items():
        print(f"\ntop operators, {name}:")
        for k, v in top:
            print(f"  {v:8.3f}s  {k}")


if __name__ == "__main__":
    main()
