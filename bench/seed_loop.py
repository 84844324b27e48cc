"""The seed tutorial's DPO loop, re-implemented faithfully for the benchmark (align-anything's method).

The seed tutorial trains with PKU-Alignment/align-anything (`align_anything/trainers/text_to_text/dpo.py` and
`align_anything/datasets/text_to_text/preference.py`). Its method, reproduced here step for step:

* batch size 1: each optimizer step sees one pair, chosen ("better") and rejected ("worse") stacked into a batch
  of 2, LEFT padded with the tokenizer's pad token;
* a live reference model: a second full copy of the network, run under `no_grad` on every step;
* the LM head on every position: `model(**batch).logits` is the full `[2, T, vocab]` tensor;
* response tokens counted from the END: the response length is the token count of the response TEXT tokenized
  on its own, and the last `response_len` positions of the pad-stripped sequence are scored (`strip_pad` removes
  every pad token, also genuine ones when pad == eos; see align-anything issue 215);
* a full `log_softmax(logits.float())` over the vocabulary, then a gather (`gather_log_probabilities`);
* a per-sample Python loop for the loss and the rewards; `torch_gc()` (a `gc.collect()`) after every step.

One adaptation, so that every benchmark variant trains the same tokens at the same `max_length`: the sequences
are the shared tokenized pairs (`bench.common.load_bench_data`), and the counted-from-the-end response length
is capped at the kept response (the original collator does not truncate at all).

Which pairs: the first pair of our trainer's warm-up batch (one untimed step), then `--seed-loop-pairs` timed
pairs spread evenly over the pairs our trainer's timed steps train, in the trainer's order
(`bench.ours.trainer_step_pairs`: longest batch to shortest), so they span the same lengths; 0: all of them.

Run: `python -m bench.seed_loop --json out.json` (in its own process, for an unmixed peak RSS).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import (
    BenchSettings,
    VariantResult,
    add_settings_args,
    count_params,
    load_bench_data,
    load_policy,
    load_tokenizer,
    model_dir,
    now,
    set_threads,
    settings_from_args,
    step_intervals,
    write_result,
)
from bench.ours import trainer_step_pairs


def strip_pad(seq: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """align-anything's `strip_pad`: drop every pad token (genuine end-of-turn tokens too when pad == eos)."""
    return seq[seq != pad_token_id]


def gather_log_probabilities(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Full log-softmax over the vocabulary, then gather: `[B, L, V], [B, L] -> [B, L]`."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(dim=-1, index=labels.long().unsqueeze(dim=-1)).squeeze(dim=-1)


def left_pad_batch(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """[better, worse] left padded, as the tokenizer with `padding_side='left'` does in align-anything's collator."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def compute_log_probs(model, batch: dict, response_lens: list[int], pad_id: int) -> torch.Tensor:
    """align-anything's `DPOTrainer.compute_log_probs`: per-token log-probs of the last response positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprob_list = []
    for idx in range(len(response_lens)):
        response_length = response_lens[idx]
        raw_input_id = strip_pad(batch["input_ids"][idx], pad_id)
        logit = logits[idx][-response_length:].unsqueeze(0)
        input_id = raw_input_id[-response_length:].unsqueeze(0)
        log_p = gather_log_probabilities(logit[:, :-1], input_id[:, 1:])
        logprob_list.append(log_p.squeeze(0))
    return torch.nn.utils.rnn.pad_sequence(logprob_list, batch_first=True, padding_value=0.0)


def dpo_loss(policy, reference, batch: dict, response_lens: list[int], pad_id: int, beta: float) -> dict:
    """align-anything's `DPOTrainer.loss`: a per-sample Python loop over the (here: one) pair in the batch."""
    seq_logps = compute_log_probs(policy, batch, response_lens, pad_id)
    better, worse = seq_logps.chunk(chunks=2, dim=0)
    with torch.no_grad():
        ref_better, ref_worse = compute_log_probs(reference, batch, response_lens, pad_id).chunk(chunks=2, dim=0)
    losses, better_rewards, worse_rewards = [], [], []
    for i in range(better.size(0)):
        better_log_ratio = better[i, :].sum(dim=-1) - ref_better[i, :].sum(dim=-1)
        worse_log_ratio = worse[i, :].sum(dim=-1) - ref_worse[i, :].sum(dim=-1)
        losses.append(-F.logsigmoid(beta * (better_log_ratio - worse_log_ratio)))
        better_rewards.append(beta * better_log_ratio.detach())
        worse_rewards.append(beta * worse_log_ratio.detach())
    better_reward, worse_reward = torch.stack(better_rewards), torch.stack(worse_rewards)
    return {
        "loss": torch.stack(losses).mean(),
        "better_sample_reward": better_reward,
        "worse_sample_reward": worse_reward,
        "reward_accuracy": (better_reward > worse_reward).float().mean(),
    }


def train_step(policy, reference, optimizer, scheduler, batch: dict, response_lens: list[int], pad_id: int,
               beta: float, autocast=None) -> dict:
    """One step of the seed loop on one pair: loss, backward, clip to 1.0, AdamW, schedule, `torch_gc()`."""
    with autocast if autocast is not None else contextlib.nullcontext():
        out = dpo_loss(policy, reference, batch, response_lens, pad_id, beta)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    gc.collect()  # align-anything's torch_gc() after every step
    return out


def pair_order(trainer_steps: list[list[int]], n: int) -> list[int]:
    """The pairs the seed loop trains, one per step: the first pair of the trainer's warm-up batch, then `n` of the
    pairs the trainer's timed steps train, spread evenly over them in the trainer's order (0: all of them)."""
    timed = [i for step in trainer_steps[1:] for i in step]
    k = min(n or len(timed), len(timed))
    return [trainer_steps[0][0]] + [timed[(j * len(timed)) // k] for j in range(k)]


def run(s: BenchSettings) -> VariantResult:
    from transformers import get_cosine_schedule_with_warmup

    set_threads(s.threads)
    torch.manual_seed(s.seed)
    path = model_dir()
    tokenizer = load_tokenizer(path)
    data = load_bench_data(tokenizer, s, s.n_pairs)
    order = pair_order(trainer_step_pairs(data.tokenized, s), s.seed_loop_pairs)
    t0 = time.perf_counter()
    policy = load_policy(path)
    reference = load_policy(path)  # align-anything loads a second full copy
    reference.eval().requires_grad_(False)
    load_seconds = time.perf_counter() - t0
    policy.train()
    pad_id = tokenizer.pad_token_id

    optimizer = torch.optim.AdamW(policy.parameters(), lr=s.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, int(0.1 * len(order))), len(order))
    step_ends = [now()]  # wall-clock at each step end: preprocessing, forward, backward, optimizer
    step_pairs, step_tokens, padded, history = [], [], [], []
    for i in order:
        row = data.tokenized.iloc[i]
        raw = data.raw[i]
        prompt = list(row.prompt_ids)
        seqs = [prompt + list(row.chosen_ids), prompt + list(row.rejected_ids)]
        # response length = the response TEXT tokenized on its own (align-anything's preprocess), capped at the
        # kept response so the count-from-the-end stays inside the shared max_length sequence
        text_lens = [
            len(tokenizer(raw[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected")
        ]
        response_lens = [min(text_lens[0], len(row.chosen_ids)), min(text_lens[1], len(row.rejected_ids))]
        batch = left_pad_batch(seqs, pad_id)
        out = train_step(policy, reference, optimizer, scheduler, batch, response_lens, pad_id, s.beta)
        step_ends.append(now())
        step_pairs.append(1)
        step_tokens.append(int(batch["attention_mask"].sum()))
        padded.append(int(batch["input_ids"].numel()))
        history.append(
            {
                "loss": out["loss"].item(),
                "rewards/chosen": float(out["better_sample_reward"].mean()),
                "rewards/rejected": float(out["worse_sample_reward"].mean()),
            }
        )
    intervals, cpu = step_intervals(step_ends)
    return VariantResult(
        variant="seed_loop",
        params=count_params(policy),
        live_reference=True,
        step_seconds=intervals[1:],
        step_cpu_seconds=cpu[1:],
        step_pairs=step_pairs[1:],
        step_tokens=step_tokens[1:],
        padded_tokens=padded[1:],
        peak_rss_mb=0.0,
        warmup_seconds=intervals[0],
        load_seconds=load_seconds,
        threads=s.threads,
        notes=[f"batch size 1 (the seed tutorial's method), {len(order) - 1} of the {s.n_pairs} pairs our timed steps "
               "train"],
        history=history,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the seed tutorial's DPO loop (align-anything's method)")
    add_settings_args(parser)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    write_result(run(settings_from_args(args)), args.json)


if __name__ == "__main__":
    main()
