"""This project's trainer (`dpo_core.trainer.train`) on the benchmark's pairs: precomputed reference or live.

`python -m bench.ours --precompute --json out.json` runs the default path: the reference table is computed from
the initial policy with `dpo_core.reference.compute_reference_logps` (timed apart, as `precompute_seconds`), then
`train(..., reference=table)`. `--live` passes a second frozen copy of the model as `ref_model` instead.

Timing: the wall-clock between consecutive `on_step` callbacks (collation, forward, backward, clipping, optimizer),
minus the checkpoint writes that fall inside (TRL runs with `save_strategy="no"`; the final checkpoint the trainer
always writes is not part of a training step's throughput). The first (warm-up) step is not timed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (
    BenchError,
    BenchSettings,
    VariantResult,
    add_settings_args,
    count_params,
    load_bench_data,
    load_policy,
    load_tokenizer,
    model_dir,
    now,
    peak_rss_mb,
    set_threads,
    settings_from_args,
    step_intervals,
    write_result,
)


def train_config(s: BenchSettings, *, gradient_checkpointing: bool = False, layout: str = "auto",
                 chunk: int | None = None):
    from dpo_core.config import TrainConfig

    extra = {} if chunk is None else {"logprob_chunk_size": chunk}
    return TrainConfig(
        **extra,
        gradient_checkpointing=gradient_checkpointing,
        batch_layout=layout,
        loss="sigmoid",
        beta=s.beta,
        learning_rate=s.learning_rate,
        batch_size=s.batch_size,
        epochs=1,
        seed=s.seed,
        max_grad_norm=1.0,
        checkpoint_every=10**6,  # only the final checkpoint (excluded from the timings, see the module docstring)
        keep_checkpoints=1,
    )


def run(
    s: BenchSettings, *, precompute: bool, gradient_checkpointing: bool = False, layout: str = "auto",
    chunk: int | None = None,
) -> VariantResult:
    import dpo_core.trainer as trainer_mod
    from dpo_core.batching import PairBatch
    from dpo_core.models import DeviceSpec
    from dpo_core.reference import compute_reference_logps

    set_threads(s.threads)
    torch.manual_seed(s.seed)
    path = model_dir()
    tokenizer = load_tokenizer(path)
    data = load_bench_data(tokenizer, s, s.n_pairs)
    t0 = time.perf_counter()
    model = load_policy(path)
    ref_model = None if precompute else load_policy(path)
    load_seconds = time.perf_counter() - t0
    spec = DeviceSpec(device=torch.device("cpu"), dtype=torch.float32, autocast_dtype=None, attn_implementation="sdpa")
    cfg = train_config(s, gradient_checkpointing=gradient_checkpointing, layout=layout, chunk=chunk)

    reference, precompute_seconds = None, None
    if precompute:
        t0 = time.perf_counter()
        reference = compute_reference_logps(
            model, data.tokenized, batch_size=cfg.reference_batch_size, spec=spec, chunk_size=cfg.logprob_chunk_size,
            layout=layout,
        )
        precompute_seconds = time.perf_counter() - t0

    # count each training batch's tokens, and time the checkpoint writes so they can be taken out of the steps
    # (pairs, trained tokens of the 2B sequences, non-padding positions computed, positions incl. padding)
    batches: list[tuple[int, int, int, int]] = []
    ckpt_seconds: dict[int, tuple[float, float]] = {}
    rss_before_save: list[float] = []
    original_collate, original_save = trainer_mod._collate, trainer_mod.save_checkpoint

    def counting_collate(rows, layout, tokenizer) -> PairBatch:
        b = original_collate(rows, layout, tokenizer)
        batches.append((b.n_pairs, b.n_sequence_tokens, b.n_tokens, int(b.input_ids.numel())))
        layouts.add(b.layout)
        return b

    def timed_save(root, step, **kw):
        rss_before_save.append(peak_rss_mb())
        t = now()
        out = original_save(root, step, **kw)
        done = now()
        ckpt_seconds[step] = (done[0] - t[0], done[1] - t[1])
        return out

    layouts: set[str] = set()
    step_ends: list[tuple[float, float]] = []
    trainer_mod._collate, trainer_mod.save_checkpoint = counting_collate, timed_save
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ours-") as out_dir:
            result = trainer_mod.train(
                model, tokenizer, data.tokenized, cfg, out_dir=Path(out_dir), spec=spec, reference=reference,
                ref_model=ref_model, on_step=lambda m: step_ends.append(now()), progress_bar=False,
            )  # fmt: skip
    finally:
        trainer_mod._collate, trainer_mod.save_checkpoint = original_collate, original_save

    if result.steps != s.steps or len(step_ends) != s.steps or len(batches) != s.steps:
        raise BenchError(
            f"expected {s.steps} steps of one batch each; got {result.steps} steps, {len(step_ends)} callbacks, "
            f"{len(batches)} batches"
        )
    # the interval ending at step k holds step k's checkpoint write, if any: take it out
    intervals, cpu = step_intervals(step_ends, [ckpt_seconds.get(k, (0.0, 0.0)) for k in range(2, s.steps + 1)])
    first = result.history[0]
    warmup = batches[0][1] / first["tokens_per_second"] if first.get("tokens_per_second") else float("nan")
    return VariantResult(
        variant=("ours_precompute" if precompute else "ours_live") + ("_gc" if gradient_checkpointing else "")
        + ("" if layout == "auto" else f"_{layout}"),
        params=count_params(model),
        live_reference=not precompute,
        step_seconds=intervals,
        step_cpu_seconds=cpu,
        step_pairs=[b[0] for b in batches[1:]],
        step_tokens=[b[1] for b in batches[1:]],
        step_positions=[b[2] for b in batches[1:]],
        padded_tokens=[b[3] for b in batches[1:]],
        peak_rss_mb=0.0,
        train_peak_rss_mb=rss_before_save[0] if rss_before_save else None,
        precompute_seconds=precompute_seconds,
        precompute_pairs=len(data.tokenized) if precompute else None,
        load_seconds=load_seconds,
        threads=s.threads,
        notes=[
            f"warm-up step {warmup:.2f}s not timed",
            f"batch layout: {', '.join(sorted(layouts))}",
            f"final checkpoint write {sum(w for w, _ in ckpt_seconds.values()):.2f}s excluded",
        ],
        history=result.history,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="this project's trainer, benchmark variant")
    add_settings_args(parser)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--precompute", action="store_true", help="precomputed reference table (the default path)")
    mode.add_argument("--live", action="store_true", help="a live frozen reference model")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TrainConfig.gradient_checkpointing")
    parser.add_argument("--layout", default="auto", choices=["auto", "padded", "packed", "shared_prompt"],
                        help="TrainConfig.batch_layout (auto: one shared-prompt row per pair with SDPA)")
    parser.add_argument("--logprob-chunk-size", type=int, default=None,
                        help="TrainConfig.logprob_chunk_size (default: the config's default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(settings_from_args(args), precompute=args.precompute,
                 gradient_checkpointing=args.gradient_checkpointing, layout=args.layout,
                 chunk=args.logprob_chunk_size)  # fmt: skip
    write_result(result, args.json)


if __name__ == "__main__":
    main()
