"""This project's trainer (`dpo_core.trainer.train`) on the benchmark's pairs: precomputed reference or live.

`python -m bench.ours --precompute --json out.json` runs the default path: the reference table is computed from
the initial policy with `dpo_core.reference.compute_reference_logps` (timed apart, as `precompute_seconds`), then
`train(..., reference=table)`, then the trained policy is evaluated on the same pairs with
`dpo_core.evaluation.evaluate_preferences` (timed apart, as `eval_seconds`): the reference precompute and the
evaluation score pairs with the same forward-only scorer, `dpo_core.scoring.score_pairs`. `--live` passes a second frozen copy of the model as
`ref_model` instead (no precompute, no evaluation).

Timing: the wall-clock between consecutive `on_step` callbacks (collation, forward, backward, clipping, optimizer).
The first (warm-up) step is not timed. Checkpoint and final-model writes are switched off (`trainer_hooks`), as TRL
runs with `save_strategy="no"`: they are disk writes, not training.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
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


CHECKPOINTING = {"off": False, "selective": "selective", "full": True}  # --gradient-checkpointing values


def train_config(s: BenchSettings, *, gradient_checkpointing: bool | str | None = None, layout: str = "auto",
                 chunk: int | None = None, steps: int | None = None):
    """The trainer's settings for a benchmark run of `steps` optimizer steps (default `s.run_steps`);
    `gradient_checkpointing` and `chunk` None: `TrainConfig`'s defaults."""
    from dpo_core.config import TrainConfig

    extra = {} if chunk is None else {"logprob_chunk_size": chunk}
    if gradient_checkpointing is not None:
        extra["gradient_checkpointing"] = gradient_checkpointing
    return TrainConfig(
        **extra,
        batch_layout=layout,
        loss="sigmoid",
        beta=s.beta,
        learning_rate=s.learning_rate,
        batch_size=s.batch_size,
        epochs=1,
        max_steps=steps or s.run_steps,
        seed=s.seed,
        max_grad_norm=1.0,
        checkpoint_every=10**6,  # only the final checkpoint (which `trainer_hooks` skips)
        keep_checkpoints=1,
    )


def trainer_step_pairs(tokenized, s: BenchSettings) -> list[list[int]]:
    """Row indices of `tokenized` that each of the run's `s.run_steps` optimizer steps trains, in order.

    The trainer's documented data order (`dpo_core.trainer`): epoch `e` is `length_grouped_batches(lengths,
    batch_size, seed=seed + e, mega_batch_mult)`. `run` checks its batches against this plan; the seed loop uses it
    to train the very pairs our timed steps train.
    """
    from dpo_core.batching import length_grouped_batches, pair_length

    cfg = train_config(s)
    lengths = [pair_length(r) for r in tokenized[["prompt_ids", "chosen_ids", "rejected_ids"]].to_dict("records")]
    mult = cfg.mega_batch_mult if cfg.length_grouping else 1
    steps: list[list[int]] = []
    for epoch in range(math.ceil(s.run_steps / math.ceil(len(lengths) / cfg.batch_size))):
        steps += length_grouped_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch, mega_batch_mult=mult)
    return steps[: s.run_steps]


@contextlib.contextmanager
def trainer_hooks(batches: list) -> Iterator[None]:
    """Record each batch the trainer collates (in `batches`); skip its checkpoint and final-model writes."""
    import dpo_core.trainer as trainer_mod

    saved = trainer_mod._collate, trainer_mod.save_checkpoint, trainer_mod._save_final

    def counting_collate(rows, layout, tokenizer):
        batch = saved[0](rows, layout, tokenizer)
        batches.append(batch)
        return batch

    trainer_mod._collate = counting_collate
    trainer_mod.save_checkpoint = lambda root, step, **kw: None
    trainer_mod._save_final = lambda model, tokenizer, target, tensors=None: target
    try:
        yield
    finally:
        trainer_mod._collate, trainer_mod.save_checkpoint, trainer_mod._save_final = saved


def run(
    s: BenchSettings, *, precompute: bool, gradient_checkpointing: bool | str | None = None, layout: str = "auto",
    chunk: int | None = None,
) -> VariantResult:
    import dpo_core.trainer as trainer_mod
    from dpo_core.evaluation import evaluate_preferences
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

    batches: list = []
    step_ends: list[tuple[float, float]] = []
    with trainer_hooks(batches), tempfile.TemporaryDirectory(prefix="bench-ours-") as out_dir:
        result = trainer_mod.train(
            model, tokenizer, data.tokenized, cfg, out_dir=Path(out_dir), spec=spec, reference=reference,
            ref_model=ref_model, on_step=lambda m: step_ends.append(now()), progress_bar=False,
        )  # fmt: skip
    train_peak = peak_rss_mb()

    if result.steps != s.run_steps or len(step_ends) != s.run_steps or len(batches) != s.run_steps:
        raise BenchError(
            f"expected {s.run_steps} steps of one batch each; got {result.steps} steps, {len(step_ends)} callbacks, "
            f"{len(batches)} batches"
        )
    ids = data.tokenized.pair_id.tolist()
    if [b.pair_ids for b in batches] != [[ids[i] for i in step] for step in trainer_step_pairs(data.tokenized, s)]:
        raise BenchError("the trainer's batches differ from bench.ours.trainer_step_pairs; the seed loop would time "
                         "other pairs than ours")
    intervals, cpu = step_intervals(step_ends)
    timed = batches[1:]
    first = result.history[0]
    warmup = batches[0].n_sequence_tokens / first["tokens_per_second"] if first.get("tokens_per_second") else None

    eval_seconds = None
    if precompute:  # the trained policy against the reference table, as the evaluate stage does
        t0 = time.perf_counter()
        evaluate_preferences(model, data.tokenized, reference_df=reference, beta=s.beta,
                             batch_size=cfg.reference_batch_size, spec=spec, chunk_size=cfg.logprob_chunk_size,
                             layout=layout)  # fmt: skip
        eval_seconds = time.perf_counter() - t0
    return VariantResult(
        variant=("ours_precompute" if precompute else "ours_live")
        + {True: "_gc", False: "_no_ckpt"}.get(gradient_checkpointing, "") + ("" if layout == "auto" else f"_{layout}"),
        params=count_params(model),
        live_reference=not precompute,
        step_seconds=intervals,
        step_cpu_seconds=cpu,
        step_pairs=[b.n_pairs for b in timed],
        step_tokens=[b.n_sequence_tokens for b in timed],
        step_positions=[b.n_tokens for b in timed],
        padded_tokens=[int(b.input_ids.numel()) for b in timed],
        peak_rss_mb=0.0,
        train_peak_rss_mb=train_peak,
        warmup_seconds=warmup,
        precompute_seconds=precompute_seconds,
        precompute_pairs=len(data.tokenized) if precompute else None,
        eval_seconds=eval_seconds,
        eval_pairs=len(data.tokenized) if precompute else None,
        load_seconds=load_seconds,
        threads=s.threads,
        notes=[f"batch layout: {', '.join(sorted({b.layout for b in batches}))}",
               "checkpoint and final-model writes switched off"],
        history=result.history,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="this project's trainer, benchmark variant")
    add_settings_args(parser)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--precompute", action="store_true", help="precomputed reference table (the default path)")
    mode.add_argument("--live", action="store_true", help="a live frozen reference model")
    parser.add_argument("--gradient-checkpointing", nargs="?", const="full", default=None,
                        choices=list(CHECKPOINTING), help="TrainConfig.gradient_checkpointing (default: the config's "
                        "default; the bare flag: full)")
    parser.add_argument("--layout", default="auto", choices=["auto", "padded", "packed", "shared_prompt"],
                        help="TrainConfig.batch_layout (auto: one shared-prompt row per pair with SDPA)")
    parser.add_argument("--logprob-chunk-size", type=int, default=None,
                        help="TrainConfig.logprob_chunk_size (default: the config's default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(settings_from_args(args), precompute=args.precompute,
                 gradient_checkpointing=CHECKPOINTING.get(args.gradient_checkpointing), layout=args.layout,
                 chunk=args.logprob_chunk_size)  # fmt: skip
    write_result(result, args.json)


if __name__ == "__main__":
    main()
