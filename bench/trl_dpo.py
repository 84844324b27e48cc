"""Hugging Face TRL's `DPOTrainer` on the benchmark's pairs, with `precompute_ref_log_probs` on or off.

`python -m bench.trl_dpo --precompute --json out.json` (or `--live`). Same model folder, pairs, beta, batch size,
max length and learning rate as every other variant; float32 on CPU (TRL's defaults `bf16=True` and
`gradient_checkpointing=True` are switched off: our trainer runs neither bf16 nor whole-layer recomputation on CPU,
only its default selective checkpointing that recomputes no matmul); no reporting, no saving.
The dataset is a `datasets.Dataset` of the raw conversational rows (TRL tokenizes it itself); for the selected
pairs its token ids must equal ours, which is checked before training.

Timing: the wall-clock between consecutive optimizer-step ends (a `TrainerCallback`), so data loading and the
optimizer are inside and the first (warm-up) step is out. The reference precompute runs inside `DPOTrainer`'s
constructor and is timed on its own (`precompute_seconds`). Trained tokens per step are counted from the
collator's attention mask (non-padding tokens of the chosen and rejected sequences).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (
    BenchError,
    BenchData,
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


def conversational_dataset(data: BenchData):
    """The raw pairs as TRL's conversational preference format."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in data.raw
        ]
    )


def dpo_config(s: BenchSettings, out_dir: str, *, precompute: bool, max_steps: int):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1,
        max_steps=max_steps,
        learning_rate=s.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        max_grad_norm=1.0,
        weight_decay=0.0,
        beta=s.beta,
        loss_type=["sigmoid"],
        max_length=s.max_length,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=8,  # = our TrainConfig.reference_batch_size default
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=s.seed,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


def check_same_tokens(train_dataset, data: BenchData, max_length: int) -> None:
    """TRL's tokenization of the pairs must equal ours (prompt + response cut at max_length)."""
    bad = []
    for i, (ex, row) in enumerate(zip(train_dataset, data.tokenized.itertuples())):
        for side in ("chosen_ids", "rejected_ids"):
            trl_seq = (list(ex["prompt_ids"]) + list(ex[side]))[:max_length]
            ours = list(row.prompt_ids) + list(getattr(row, side))
            if trl_seq != ours:
                bad.append(f"pair {i} {side}")
    if len(train_dataset) != len(data.tokenized):
        bad.append(f"TRL kept {len(train_dataset)} of {len(data.tokenized)} pairs")
    if bad:
        raise BenchError(f"TRL's token ids differ from ours for {len(bad)} sequence(s): {', '.join(bad[:5])}")


def run(s: BenchSettings, *, precompute: bool) -> VariantResult:
    from transformers import TrainerCallback
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    set_threads(s.threads)
    torch.manual_seed(s.seed)
    path = model_dir()
    tokenizer = load_tokenizer(path)
    data = load_bench_data(tokenizer, s, s.n_pairs)
    t0 = time.perf_counter()
    model = load_policy(path)
    ref_model = None if precompute else load_policy(path)  # what a user passes for a full fine-tune
    load_seconds = time.perf_counter() - t0

    counts: list[tuple[int, int]] = []

    class CountingCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            out = super().torch_call(examples)
            counts.append((int(out["attention_mask"].sum()), int(out["attention_mask"].numel())))
            return out

    step_ends: list[tuple[float, float]] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            step_ends.append(now())

        def on_step_end(self, args, state, control, **kw):
            step_ends.append(now())

    precompute_seconds: list[float] = []
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **kw):
        t = time.perf_counter()
        out = original(self, *a, **kw)
        precompute_seconds.append(time.perf_counter() - t)
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute
    try:
        with tempfile.TemporaryDirectory(prefix="bench-trl-") as out_dir:
            args = dpo_config(s, out_dir, precompute=precompute, max_steps=s.run_steps)
            trainer = DPOTrainer(
                model=model,
                ref_model=ref_model,
                args=args,
                train_dataset=conversational_dataset(data),
                processing_class=tokenizer,
                data_collator=CountingCollator(pad_token_id=tokenizer.pad_token_id, max_length=s.max_length),
                callbacks=[StepClock()],
            )
            check_same_tokens(trainer.train_dataset, data, s.max_length)
            counts.clear()  # the precompute pass also collates: count training batches only
            trainer.train()
            history = [h for h in trainer.state.log_history if "loss" in h]
    finally:
        DPOTrainer._precompute_ref_logps = original

    if len(step_ends) != s.run_steps + 1:
        raise BenchError(f"TRL ran {len(step_ends) - 1} optimizer steps, expected {s.run_steps}")
    intervals, cpu = step_intervals(step_ends)
    batches = counts[: s.run_steps]
    if len(batches) != s.run_steps:
        raise BenchError(f"counted {len(batches)} TRL training batches, expected {s.run_steps}")
    return VariantResult(
        variant="trl_precompute" if precompute else "trl_live",
        params=count_params(model),
        live_reference=not precompute,
        step_seconds=intervals[1:],
        step_cpu_seconds=cpu[1:],
        step_pairs=[s.batch_size] * s.timed_steps,
        step_tokens=[c[0] for c in batches[1:]],
        padded_tokens=[c[1] for c in batches[1:]],
        peak_rss_mb=0.0,
        precompute_seconds=sum(precompute_seconds) if precompute else None,
        precompute_pairs=len(data.raw) if precompute else None,
        warmup_seconds=intervals[0],
        load_seconds=load_seconds,
        threads=s.threads,
        notes=["LM head on every position (CPU: no Triton kernel)"],
        history=history,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="TRL DPOTrainer benchmark variant")
    add_settings_args(parser)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
    mode.add_argument("--live", action="store_true", help="a live reference model")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    write_result(run(settings_from_args(args), precompute=args.precompute), args.json)


if __name__ == "__main__":
    main()
