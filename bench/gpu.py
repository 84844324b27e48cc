"""The GPU benchmark (issue 9): this project's trainer against the seed loop on a Qwen2.5-0.5B-shaped model, bf16.

Run on a machine with a GPU (a few minutes, no download, no tokenizer, no checkpoint writes):

    .venv/bin/python -m bench.gpu --json bench_results/gpu.json

Smoke test on a CPU (seconds; tests/test_bench_gpu.py runs it):

    .venv/bin/python -m bench.gpu --device cpu --shape tiny --json /tmp/gpu-tiny.json

Options: ``--device cuda|cpu`` (default: cuda when available), ``--shape qwen2.5-0.5b|tiny``, ``--steps N`` (timed
optimizer steps per layout, after ``--warmup-steps``), ``--batch-size B``, ``--layouts padded,packed,shared_prompt``,
``--seed-loop-pairs N`` (0: exactly the pairs the trainer's timed steps trained), ``--gradient-checkpointing``,
``--logprob-chunk-size``, ``--max-length``, ``--max-prompt-length``, ``--attn`` (override the attention kernel, e.g.
``sdpa`` if an installed flash_attn does not load).

What it does, in one process:

1. **Model.** A randomly initialised ``Qwen2ForCausalLM`` of Qwen2.5-0.5B-Instruct's shape (``QWEN25_05B``: 24
   layers, hidden 896, MLP 4864, 14 query / 2 key-value heads, vocabulary 151936, tied embeddings, rope theta 1e6;
   494,032,768 parameters), built with transformers' ``Qwen2Config`` directly on the device. Precision and attention
   come from ``dpo_core.models.pick_device``, the trainer's own path: on CUDA float32 master weights under bf16
   autocast, ``flash_attention_2`` when ``flash_attn`` is importable, else ``sdpa``; on CPU float32, ``sdpa``.
   ``--shape tiny`` is the same architecture with 2 layers, hidden 64 and a 1024-token vocabulary.
2. **Data.** Synthetic pairs: random token ids (the shipped data's tokenizer is SmolLM2's, not Qwen's), with prompt,
   chosen and rejected LENGTHS drawn (seeded) from the distribution of the shipped UltraFeedback train pairs as
   ``dpo_core.templating.tokenize_pairs`` cuts them at max_length 1024 / max_prompt_length 512 (their percentiles
   and correlations, ``LENGTH_PERCENTILES``; they average 2P + C + R = 895 tokens). No tokenizer or model file is
   needed on the GPU machine that way. Lengths scale with ``--max-length / 1024``.
3. **This project's trainer**, once per batch layout: ``dpo_core.trainer.train`` with a reference table
   precomputed from the initial weights by ``dpo_core.reference.compute_reference_logps`` (timed apart), the
   settings of ``bench.ours.train_config``. Every layout starts from the same initial weights. ``shared_prompt``
   needs a 4-D mask, which flash attention does not take: with ``flash_attention_2`` that layout runs with ``sdpa``
   (the table's ``attn`` column says so). Checkpoint and final-model writes are switched off for the benchmark (a
   0.5B model's checkpoint is ~6 GB of disk writes that are not part of a training step; ``bench.ours`` times them
   and takes them out instead).
4. **The seed loop's method** (``bench.seed_loop``'s ``left_pad_batch`` and ``train_step``: batch size 1, a live
   reference copy, full-vocabulary logits and log-softmax, per-sample Python loop, ``gc.collect()`` per step,
   non-fused AdamW) on the very same pairs the trainer's timed steps trained, under the same autocast.
5. **Peak.** A bf16 GEMM loop (``bench.matmul_peak.measure(device=cuda, dtype=bfloat16)``) measured in the same run,
   and the datasheet dense bf16 peak when the device name matches ``SPEC_BF16_TFLOPS`` (H100 SXM, H100 PCIe, H200).

Timing: wall clock between consecutive steps, read after ``torch.cuda.synchronize()``; the warm-up steps are not
timed. The trainer groups pairs by length in mega-batches of 8 batches, sorted longest first; the defaults (8 warm-up
+ 8 timed steps) time exactly the second mega-batch, so the timed pairs are a random sample, not the short end. Reported per variant: pairs/s, trained tokens/s (non-padding tokens of the 2B sequences ``prompt +
response``, a shared prompt counted twice), peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each
variant's training), and MFU = 6 N x trained tokens/s (+ 2 N per token for a live reference forward, as
``bench.common.VariantResult`` counts) / peak bf16 FLOP/s, N = all parameters (tied embedding counted once). The
precomputed-reference variants also get ``pairs_per_second_with_reference`` and ``mfu_with_reference``: the
reference pass's time apportioned per pair and its 2 N FLOPs per token counted. The targets of issue 9 (>= 5x the seed
loop's pairs/s; >= 40% MFU in bf16, taken against the datasheet peak when known, else the measured GEMM peak) are
judged only for ``--shape qwen2.5-0.5b`` on CUDA. With ``--gradient-checkpointing`` the MFU still counts 6 N per
token (the recomputed forward is not useful work).

Status: the CUDA path has NOT been run yet (the session that wrote this had no GPU); the CPU ``--shape tiny`` path
runs in tests/test_bench_gpu.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from bench.common import BenchError, BenchSettings, VariantResult, count_params, machine_info, now, peak_rss_mb
from bench.common import step_intervals
from bench.matmul_peak import measure as measure_gemm_peak
from bench.ours import train_config, trainer_hooks
from bench.seed_loop import left_pad_batch, train_step
from dpo_core.fileio import atomic_file

# Qwen/Qwen2.5-0.5B-Instruct's config.json (as mirrored at huggingface.co/unsloth/Qwen2.5-0.5B-Instruct, whose
# "_name_or_path" is Qwen/Qwen2.5-0.5B-Instruct); the architecture fields, not the weights
QWEN25_05B: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 21,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
TINY: dict[str, Any] = {**QWEN25_05B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
                        "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2}
MODEL_SHAPES: dict[str, dict[str, Any]] = {"qwen2.5-0.5b": QWEN25_05B, "tiny": TINY}


@dataclass(frozen=True)
class ShapeDefaults:
    """Run settings that go with a model shape unless given on the command line."""

    max_length: int
    max_prompt_length: int
    batch_size: int
    steps: int
    warmup_steps: int


SHAPE_DEFAULTS = {
    # the GPU config's template and batch (configs/gpu-qwen2.5-0.5b.yaml: max_length 1024, prompt 512, batch 8);
    # 8 + 8 steps = two length-grouped mega-batches (TrainConfig.mega_batch_mult 8): the timed steps are one whole
    # mega-batch, longest batch to shortest, as every stretch of 8 steps of a long run is
    "qwen2.5-0.5b": ShapeDefaults(max_length=1024, max_prompt_length=512, batch_size=8, steps=8, warmup_steps=8),
    "tiny": ShapeDefaults(max_length=128, max_prompt_length=64, batch_size=2, steps=2, warmup_steps=1),
}

# The token lengths of the 996 shipped UltraFeedback train pairs that bench.common.read_raw_pairs keeps, templated
# and cut by dpo_core.templating.tokenize_pairs at max_length 1024 / max_prompt_length 512 with the SmolLM2 tokenizer:
# their 0, 5, 10, ..., 100th percentiles (means: prompt 178, chosen 284, rejected 255 tokens; 2P + C + R = 895), and
# the correlations of their normal scores (long prompts leave less room for the responses)
LENGTH_PERCENTILES: dict[str, tuple[int, ...]] = {
    "prompt": (34, 39, 42, 45, 48, 53, 58, 68, 85, 99, 111, 126, 145, 167, 199, 251, 318, 416, 510, 512, 512),
    "chosen": (2, 11, 20, 30, 46, 62, 85, 111, 145, 186, 219, 260, 316, 359, 414, 459, 512, 564, 643, 753, 973),
    "rejected": (2, 12, 23, 36, 51, 68, 91, 108, 138, 167, 196, 236, 275, 306, 351, 398, 452, 496, 547, 664, 986),
}
LENGTH_CORRELATION = ((1.0, -0.24, -0.24), (-0.24, 1.0, 0.55), (-0.24, 0.55, 1.0))  # prompt, chosen, rejected
FIT_MAX_LENGTH = 1024
PAD_ID = 0  # token ids are drawn from 1 .. vocab-1, so padding (and the seed loop's strip_pad) never hits a real one

# dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets; matched on the device name, in order
SPEC_BF16_TFLOPS: tuple[tuple[Callable[[str], bool], str, float], ...] = (
    (lambda n: "H200" in n and "NVL" not in n, "H200 SXM", 989.0),
    (lambda n: "H100" in n and "PCIE" in n.upper(), "H100 PCIe", 756.0),
    (lambda n: "H100" in n and "NVL" not in n, "H100 SXM", 989.0),
)
TARGET_SPEEDUP = 5.0
TARGET_MFU = 0.40


@dataclass(frozen=True)
class GpuBenchSettings:
    """One benchmark run. ``steps`` are timed optimizer steps per layout, after ``warmup_steps`` untimed ones."""

    device: str
    shape: str
    steps: int
    warmup_steps: int
    batch_size: int
    max_length: int
    max_prompt_length: int
    layouts: tuple[str, ...] = ("padded", "packed", "shared_prompt")
    seed_loop_pairs: int = 0  # 0: every pair the trainer's timed steps trained
    gradient_checkpointing: bool = False
    logprob_chunk_size: int | None = None  # None: TrainConfig's default
    attn: str = "auto"  # model.attn_implementation (auto: the trainer's choice)
    beta: float = 0.1
    learning_rate: float = 1e-5
    seed: int = 42

    @property
    def n_pairs(self) -> int:
        """One epoch of warm-up + timed steps."""
        return (self.warmup_steps + self.steps) * self.batch_size

    def bench_settings(self) -> BenchSettings:
        """The CPU benchmark's settings record, for ``bench.ours.train_config``."""
        return BenchSettings(timed_steps=self.steps, batch_size=self.batch_size,
                             max_length=self.max_length, max_prompt_length=self.max_prompt_length, beta=self.beta,
                             learning_rate=self.learning_rate, seed=self.seed, threads=torch.get_num_threads())


# ----------------------------------------------------------------------------------------------- model and data


def device_spec(device: str, attn: str = "auto"):
    """The trainer's own device choice (``dpo_core.models.pick_device``): bf16 autocast on CUDA, float32 on CPU;
    ``attn`` as ``model.attn_implementation`` (auto: flash_attention_2 on CUDA when importable, else sdpa)."""
    from dpo_core.config import ModelConfig
    from dpo_core.models import pick_device

    return pick_device(ModelConfig(device=device, dtype="auto", attn_implementation=attn))


def build_model(shape: str, spec, seed: int) -> torch.nn.Module:
    """A randomly initialised Qwen2 causal LM of ``shape``, created directly on ``spec.device`` in ``spec.dtype``."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(**MODEL_SHAPES[shape], pad_token_id=PAD_ID, use_cache=False)
    with torch.device(spec.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=spec.attn_implementation,
                                                 dtype=spec.dtype)
    return model


def synthetic_lengths(n: int, max_length: int, max_prompt_length: int, seed: int) -> np.ndarray:
    """[n, 3] (prompt, chosen, rejected) token counts drawn like the shipped pairs' (``LENGTH_PERCENTILES``, joined
    by a Gaussian copula with ``LENGTH_CORRELATION``), scaled by ``max_length / 1024`` and cut the way
    ``tokenize_pairs`` cuts: prompt to ``max_prompt_length``, each response to ``max_length - prompt``."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3)) @ np.linalg.cholesky(np.array(LENGTH_CORRELATION)).T
    u = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))  # standard normal CDF: uniform, correlated
    grid = np.linspace(0.0, 1.0, len(LENGTH_PERCENTILES["prompt"]))
    scale = max_length / FIT_MAX_LENGTH
    prompt, chosen, rejected = (
        np.maximum(1, np.rint(scale * np.interp(u[:, i], grid, LENGTH_PERCENTILES[key]))).astype(np.int64)
        for i, key in enumerate(("prompt", "chosen", "rejected"))
    )
    prompt = np.minimum(prompt, max_prompt_length)
    room = max_length - prompt
    return np.stack([prompt, np.minimum(chosen, room), np.minimum(rejected, room)], axis=1)


def synthetic_pairs(n: int, vocab_size: int, max_length: int, max_prompt_length: int, seed: int):
    """A tokenized-pairs frame (``pair_id``, ``prompt_ids``, ``chosen_ids``, ``rejected_ids``) of random token ids."""
    import pandas as pd

    if max_prompt_length >= max_length:
        raise BenchError(f"--max-prompt-length ({max_prompt_length}) must be below --max-length ({max_length})")
    lengths = synthetic_lengths(n, max_length, max_prompt_length, seed)
    rng = np.random.default_rng(seed + 1)
    ids = lambda k: rng.integers(1, vocab_size, size=int(k)).tolist()  # noqa: E731
    return pd.DataFrame([{"pair_id": f"synthetic-{i:05d}", "prompt_ids": ids(p), "chosen_ids": ids(c),
                          "rejected_ids": ids(r)} for i, (p, c, r) in enumerate(lengths)])


# --------------------------------------------------------------------------------------------- timing helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    """Free what the previous variant left and restart the peak-memory counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


@contextlib.contextmanager
def attention(model: torch.nn.Module, layout: str) -> Iterator[str]:
    """The model's attention for ``layout``: ``sdpa`` for the shared-prompt 4-D mask when it runs flash attention
    (switched back afterwards); yields the implementation in use."""
    from dpo_core.logprobs import attention_implementation

    original = attention_implementation(model)
    switch = layout == "shared_prompt" and original not in ("sdpa", "eager")
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        yield attention_implementation(model) or "unknown"
    finally:
        if switch:
            model.set_attn_implementation(original)


# ------------------------------------------------------------------------------------------------------ variants


@dataclass
class Measured:
    """One variant's timings (``VariantResult``) and what the GPU run adds to it."""

    result: VariantResult
    layout: str
    attn: str
    peak_gpu_mb: float | None
    timed_pair_ids: list[str]
    warmup_pair_ids: list[str]


def run_ours(model, init_state: dict, data, s: GpuBenchSettings, spec, layout: str) -> Measured:
    """``dpo_core.trainer.train`` with a precomputed reference table, in ``layout``, from the initial weights."""
    import dpo_core.trainer as trainer_mod
    from dpo_core.reference import compute_reference_logps

    model.load_state_dict(init_state)
    cfg = train_config(s.bench_settings(), gradient_checkpointing=s.gradient_checkpointing, layout=layout,
                       chunk=s.logprob_chunk_size, steps=s.warmup_steps + s.steps)
    tokenizer = SimpleNamespace(pad_token_id=PAD_ID)  # all the trainer reads of a tokenizer once writes are off
    reset_memory(spec.device)
    with attention(model, layout) as attn:
        synchronize(spec.device)
        t0 = time.perf_counter()
        reference = compute_reference_logps(model, data, batch_size=cfg.reference_batch_size, spec=spec,
                                            chunk_size=cfg.logprob_chunk_size, layout=layout)
        synchronize(spec.device)
        precompute_seconds = time.perf_counter() - t0
        reset_memory(spec.device)

        batches: list = []
        step_ends: list[tuple[float, float]] = []

        def on_step(_metrics: dict) -> None:
            synchronize(spec.device)
            step_ends.append(now())

        try:
            with trainer_hooks(batches), tempfile.TemporaryDirectory(prefix="bench-gpu-") as out_dir:
                out = trainer_mod.train(model, tokenizer, data, cfg, out_dir=Path(out_dir), spec=spec,
                                        reference=reference, on_step=on_step, progress_bar=False)
        finally:
            if s.gradient_checkpointing:  # train() switched it on: not for the next variant or the seed loop
                _disable_checkpointing(model)
    n_steps = s.warmup_steps + s.steps
    if out.steps != n_steps or len(step_ends) != n_steps or len(batches) != n_steps:
        raise BenchError(f"expected {n_steps} steps of one batch each; got {out.steps} steps, {len(step_ends)} "
                         f"callbacks, {len(batches)} batches")
    wall, cpu = step_intervals(step_ends)  # intervals end at steps 2..n: drop the warm-up ones
    skip = s.warmup_steps - 1
    timed = batches[s.warmup_steps:]
    result = VariantResult(
        variant=f"ours_precompute_{layout}" + ("_gc" if s.gradient_checkpointing else ""),
        params=count_params(model), live_reference=False, step_seconds=wall[skip:], step_cpu_seconds=cpu[skip:],
        step_pairs=[b.n_pairs for b in timed], step_tokens=[b.n_sequence_tokens for b in timed],
        step_positions=[b.n_tokens for b in timed], padded_tokens=[int(b.input_ids.numel()) for b in timed],
        peak_rss_mb=0.0, precompute_seconds=precompute_seconds, precompute_pairs=len(data),
        notes=[f"{s.warmup_steps} warm-up step(s) not timed", f"batch layout {layout}, attention {attn}",
               "checkpoint writes switched off"],
        history=out.history,
    )
    return Measured(result, layout, attn, peak_memory_mb(spec.device),
                    [p for b in timed for p in b.pair_ids], [p for b in batches[: s.warmup_steps] for p in b.pair_ids])


def _disable_checkpointing(model: torch.nn.Module) -> None:
    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    off()


def run_seed_loop(model, init_state: dict, rows: list[dict], warmup: int, s: GpuBenchSettings, spec) -> Measured:
    """The seed loop's method on ``rows`` (the first ``warmup`` not timed): batch 1, live reference, full logits."""
    from transformers import get_cosine_schedule_with_warmup

    model.load_state_dict(init_state)
    reset_memory(spec.device)
    policy = model
    reference = copy.deepcopy(model).eval().requires_grad_(False)  # align-anything loads a second full copy
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=s.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, int(0.1 * len(rows))), len(rows))
    synchronize(spec.device)
    step_ends = [now()]
    tokens, padded, history = [], [], []
    for row in rows:
        seqs = [row["prompt_ids"] + row["chosen_ids"], row["prompt_ids"] + row["rejected_ids"]]
        # response lengths counted from the end: exact here (no pad id among the random token ids)
        response_lens = [len(row["chosen_ids"]), len(row["rejected_ids"])]
        batch = {k: v.to(spec.device) for k, v in left_pad_batch(seqs, PAD_ID).items()}
        out = train_step(policy, reference, optimizer, scheduler, batch, response_lens, PAD_ID, s.beta,
                         autocast=spec.autocast())
        synchronize(spec.device)
        step_ends.append(now())
        tokens.append(sum(len(x) for x in seqs))
        padded.append(int(batch["input_ids"].numel()))
        history.append({"loss": out["loss"].item()})
    peak = peak_memory_mb(spec.device)
    del reference, optimizer
    wall, cpu = step_intervals(step_ends)
    result = VariantResult(
        variant="seed_loop", params=count_params(policy), live_reference=True, step_seconds=wall[warmup:],
        step_cpu_seconds=cpu[warmup:], step_pairs=[1] * (len(rows) - warmup), step_tokens=tokens[warmup:],
        padded_tokens=padded[warmup:], peak_rss_mb=0.0,
        notes=[f"{warmup} warm-up pair(s) not timed", "batch size 1, live reference (the seed tutorial's method)",
               "same autocast as the trainer"],
        history=history,
    )
    return Measured(result, "seed (left padded, batch 1)", getattr(model.config, "_attn_implementation", "?"), peak,
                    [r["pair_id"] for r in rows[warmup:]], [r["pair_id"] for r in rows[:warmup]])


# ----------------------------------------------------------------------------------------------------- the run


def datasheet_peak(name: str) -> tuple[str, float] | None:
    """(label, dense bf16 TFLOP/s) from ``SPEC_BF16_TFLOPS`` for a CUDA device name, or None if none matches."""
    return next(((label, tflops) for match, label, tflops in SPEC_BF16_TFLOPS if match(name)), None)


def spec_peak(device: torch.device) -> tuple[str, float] | None:
    """The datasheet peak of this CUDA device (``datasheet_peak`` of its name); None on CPU."""
    return datasheet_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def measure_peak(spec) -> dict:
    """The GEMM peak in the compute dtype (bf16 on CUDA, float32 on CPU), measured now, plus the datasheet peak."""
    if spec.is_cuda:
        gemm = measure_gemm_peak(torch.get_num_threads(), device=spec.device, dtype=spec.autocast_dtype or spec.dtype,
                                 min_seconds=0.3, repeats=2)
    else:  # a quick CPU reading: only the smoke test runs here
        gemm = measure_gemm_peak(torch.get_num_threads(), shapes=((512, 512, 512),), min_seconds=0.05, repeats=1)
    datasheet = spec_peak(spec.device)
    return {"measured": gemm, "measured_flops": gemm["peak_gflops"] * 1e9,
            "spec_label": datasheet[0] if datasheet else None,
            "spec_flops": datasheet[1] * 1e12 if datasheet else None}


def variant_record(m: Measured, peak: dict) -> dict:
    """``VariantResult.to_json()`` plus layout, attention, GPU memory and MFU against both peaks."""
    r = m.result
    flops = r.model_flops() / r.seconds
    record = r.to_json()
    record.update(layout=m.layout, attn=m.attn, peak_gpu_mb=m.peak_gpu_mb, timed_pair_ids=m.timed_pair_ids,
                  mfu_measured_peak=flops / peak["measured_flops"],
                  mfu_spec_peak=flops / peak["spec_flops"] if peak["spec_flops"] else None)
    if r.precompute_seconds is not None and r.precompute_pairs:
        # the reference pass, apportioned per pair, and its forward FLOPs (2 N per token)
        ref_seconds = r.precompute_seconds * sum(r.step_pairs) / r.precompute_pairs
        total = r.seconds + ref_seconds
        record.update(pairs_per_second_with_reference=sum(r.step_pairs) / total,
                      mfu_with_reference=(r.model_flops() + 2 * r.params * sum(r.step_tokens)) / total
                      / (peak["spec_flops"] or peak["measured_flops"]))
    return record


def layout_agreement(runs: list[Measured]) -> dict:
    """How far the layouts' step-1 log-probs and last-step loss differ (same weights, same pairs, same order)."""
    keys = ("logps/chosen", "logps/rejected")
    out: dict[str, Any] = {"layouts": [m.layout for m in runs]}
    for key, step in [(k, 0) for k in keys] + [("loss", -1)]:
        values = [m.result.history[step][key] for m in runs]
        label = f"{key}@step{1 if step == 0 else len(runs[0].result.history)}"
        out[label] = {"values": values, "max_abs_diff": max(values) - min(values)}
    return out


def targets(records: dict[str, dict], peak: dict, s: GpuBenchSettings, on_cuda: bool) -> dict:
    """Issue 9's GPU targets against the best trainer variant: pairs/s vs the seed loop, and MFU."""
    ours = {k: v for k, v in records.items() if k != "seed_loop"}
    best_speed = max(ours, key=lambda k: ours[k]["pairs_per_second"])
    best_mfu = max(ours, key=lambda k: ours[k]["mfu_spec_peak"] or ours[k]["mfu_measured_peak"])
    speedup = ours[best_speed]["pairs_per_second"] / records["seed_loop"]["pairs_per_second"]
    mfu_key = "mfu_spec_peak" if peak["spec_flops"] else "mfu_measured_peak"
    mfu = ours[best_mfu][mfu_key]
    applicable = on_cuda and s.shape == "qwen2.5-0.5b"
    return {
        "applicable": applicable,
        "why_not": None if applicable else "the targets are for a Qwen2.5-0.5B-shaped model in bf16 on a GPU",
        "speedup": {"variant": best_speed, "value": speedup, "target": TARGET_SPEEDUP,
                    "met": speedup >= TARGET_SPEEDUP if applicable else None},
        "mfu": {"variant": best_mfu, "value": mfu, "against": mfu_key, "target": TARGET_MFU,
                "met": mfu >= TARGET_MFU if applicable else None},
    }


def run(s: GpuBenchSettings) -> dict:
    """The whole benchmark; returns the JSON record."""
    spec = device_spec(s.device, s.attn)
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    model = build_model(s.shape, spec, s.seed)
    synchronize(spec.device)
    build_seconds = time.perf_counter() - t0
    init_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    data = synthetic_pairs(s.n_pairs, model.config.vocab_size, s.max_length, s.max_prompt_length, s.seed)
    peak = measure_peak(spec)

    ours = [run_ours(model, init_state, data, s, spec, layout) for layout in s.layouts]
    by_id = {r["pair_id"]: r for r in data[["pair_id", "prompt_ids", "chosen_ids", "rejected_ids"]]
             .to_dict("records")}
    timed_ids = ours[0].timed_pair_ids[: s.seed_loop_pairs or None]
    warmup_ids = ours[0].warmup_pair_ids[: max(1, s.warmup_steps)]
    seed = run_seed_loop(model, init_state, [by_id[p] for p in warmup_ids + timed_ids], len(warmup_ids), s, spec)

    records = {m.result.variant: variant_record(m, peak) for m in ours}
    records["seed_loop"] = variant_record(seed, peak)
    embed = model.get_input_embeddings().weight.numel()
    lengths = np.array([[len(r[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")] for r in by_id.values()])
    info = machine_info()
    if spec.is_cuda:
        props = torch.cuda.get_device_properties(spec.device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    info["flash_attn"] = _version("flash_attn")
    return {
        "benchmark": "bench.gpu",
        "settings": asdict(s),
        "machine": info,
        "model": {"shape": s.shape, "config": MODEL_SHAPES[s.shape], "params": count_params(model),
                  "non_embedding_params": count_params(model) - embed, "weights_dtype": str(spec.dtype),
                  "autocast_dtype": str(spec.autocast_dtype), "attn": spec.attn_implementation,
                  "build_seconds": build_seconds},
        "data": {"pairs": len(data), "mean_prompt_tokens": float(lengths[:, 0].mean()),
                 "mean_chosen_tokens": float(lengths[:, 1].mean()),
                 "mean_rejected_tokens": float(lengths[:, 2].mean()),
                 "mean_pair_tokens": float((2 * lengths[:, 0] + lengths[:, 1] + lengths[:, 2]).mean()),
                 "timed_pairs": len(ours[0].timed_pair_ids),
                 "timed_mean_pair_tokens": sum(ours[0].result.step_tokens) / len(ours[0].timed_pair_ids)},
        "peak": peak,
        "variants": records,
        "layout_agreement": layout_agreement(ours),
        "targets": targets(records, peak, s, spec.is_cuda),
        "peak_rss_mb": peak_rss_mb(),
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return "not installed"


def render(report: dict) -> str:
    """The markdown table (and the targets' verdicts) of a ``run`` record."""
    peak = report["peak"]
    spec_col = f"MFU ({peak['spec_label']} spec)" if peak["spec_label"] else "MFU (spec)"
    seed_pps = report["variants"]["seed_loop"]["pairs_per_second"]
    mem = "peak GPU MiB" if report["machine"].get("gpu") else "peak GPU MiB (CPU run: none)"
    lines = [
        f"Model: {report['model']['shape']} ({report['model']['params'] / 1e6:.1f}M params), weights "
        f"{report['model']['weights_dtype']}, autocast {report['model']['autocast_dtype']}, attention "
        f"{report['model']['attn']}; device {report['machine'].get('gpu', 'cpu')}; measured GEMM peak "
        f"{peak['measured_flops'] / 1e12:.2f} TFLOP/s",
        "",
        f"| variant | layout | attn | pairs/s | vs seed | tokens/s | {mem} | MFU (measured peak) | {spec_col} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in report["variants"].items():
        gpu_mb = f"{v['peak_gpu_mb']:.0f}" if v["peak_gpu_mb"] is not None else "-"
        spec_mfu = f"{v['mfu_spec_peak']:.1%}" if v["mfu_spec_peak"] is not None else "-"
        lines.append(f"| {name} | {v['layout']} | {v['attn']} | {v['pairs_per_second']:.2f} | "
                     f"{v['pairs_per_second'] / seed_pps:.2f}x | {v['tokens_per_second']:.0f} | {gpu_mb} | "
                     f"{v['mfu_measured_peak']:.1%} | {spec_mfu} |")
    t = report["targets"]
    if t["applicable"]:
        for key, label in (("speedup", f">= {TARGET_SPEEDUP:g}x the seed loop's pairs/s"),
                           ("mfu", f">= {TARGET_MFU:.0%} MFU in bf16")):
            goal = t[key]
            value = f"{goal['value']:.2f}x" if key == "speedup" else f"{goal['value']:.1%} ({goal['against']})"
            lines.append(f"- target {label}: {'**met**' if goal['met'] else '**missed**'} ({goal['variant']}: {value})")
    else:
        lines.append(f"- targets not judged: {t['why_not']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``.settings`` holds the ``GpuBenchSettings`` (shape defaults filled in)."""
    from dpo_core.batching import LAYOUTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per layout")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps before them (>= 1)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--max-prompt-length", type=int, default=None)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: padded,packed,shared_prompt")
    parser.add_argument("--seed-loop-pairs", type=int, default=0,
                        help="timed pairs of the seed loop (0: the pairs the trainer's timed steps trained)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--logprob-chunk-size", type=int, default=None)
    parser.add_argument("--attn", default="auto", choices=["auto", "flash_attention_2", "sdpa", "eager"],
                        help="attention implementation (auto: flash_attention_2 on CUDA when importable, else sdpa)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    d = SHAPE_DEFAULTS[args.shape]
    layouts = tuple(x.strip() for x in args.layouts.split(",") if x.strip())
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown or not layouts:
        parser.error(f"--layouts: unknown {unknown}; choose from {list(LAYOUTS)}")
    s = GpuBenchSettings(
        device=args.device, shape=args.shape, steps=args.steps or d.steps,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else d.warmup_steps,
        batch_size=args.batch_size or d.batch_size, max_length=args.max_length or d.max_length,
        max_prompt_length=args.max_prompt_length or d.max_prompt_length, layouts=layouts,
        seed_loop_pairs=args.seed_loop_pairs, gradient_checkpointing=args.gradient_checkpointing,
        logprob_chunk_size=args.logprob_chunk_size, attn=args.attn, seed=args.seed,
    )
    if s.warmup_steps < 1 or s.steps < 1 or s.batch_size < 1 or s.seed_loop_pairs < 0:
        parser.error("--warmup-steps, --steps and --batch-size must be >= 1, --seed-loop-pairs >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (a GPU and a CUDA torch build are needed; "
                     "--device cpu --shape tiny is the CPU smoke test)")
    args.settings = s
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args.settings)
    blob = json.dumps(report, indent=1, default=str)
    if args.json is not None:
        with atomic_file(args.json) as handle:
            handle.write(blob)
    print(render(report))


if __name__ == "__main__":
    main()
