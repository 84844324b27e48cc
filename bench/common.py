"""Shared set-up for every benchmark variant: settings, the pairs, the model, timing and the result record.

Every variant (`python -m bench.<variant>`) runs in its own fresh process so that peak resident memory
(`ru_maxrss`) belongs to that variant alone. All of them train the same model (the embedded SmolLM2-135M,
materialised once) on the same UltraFeedback pairs, tokenized by `dpo_core.templating.tokenize_pairs` with the
same `max_length`, and write one JSON `VariantResult` that `bench.run` aggregates.

Pair selection: the first pairs of the shipped train file whose templated prompt fits `max_prompt_length` without
cutting. For those pairs TRL's own tokenization (prompt + response cut at `max_length` from the end, "keep_start")
produces exactly the same token ids as ours (prompt kept whole, response cut to `max_length - len(prompt)`), so
every variant trains the very same tokens; `bench.trl_dpo` checks this and fails loudly if it ever differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpo_core.fileio import atomic_file

REPO = Path(__file__).resolve().parents[1]
TRAIN_FILE = REPO / "data" / "ultrafeedback_binarized_sample" / "train.jsonl"

# Offline, quiet, and the same model cache as the tests and the pipeline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DPO_MODEL_CACHE", str(REPO / ".dpo_state" / "models"))
os.environ.setdefault("TQDM_DISABLE", "1")


class BenchError(RuntimeError):
    """A benchmark cannot run as configured; the message says why."""


@dataclass(frozen=True)
class BenchSettings:
    """The settings every variant shares (the issue: same beta, batch size, max length, learning rate, fp32).

    Every variant runs ``run_steps = timed_steps + 1`` optimizer steps on ``n_pairs = timed_steps * batch_size``
    pairs: the first step is warm-up and is not timed; the next ``timed_steps`` are. With the defaults (8 steps of 4
    pairs = ``TrainConfig.mega_batch_mult`` batches) our trainer's timed steps span one whole length-grouped
    mega-batch, longest batch to shortest, as every stretch of 8 steps of a long run does: steps 2..8 are batches 2..8
    of epoch 1 and step 9 is epoch 2's first, longest batch. That batch has the warm-up batch's lengths but, where
    more pairs share the longest length (192, cut), not necessarily its pairs (`bench.ours.trainer_step_pairs` says
    which).
    """

    timed_steps: int = 8  # optimizer steps timed per run, after one warm-up step
    batch_size: int = 4  # pairs per optimizer step (the seed loop always uses 1, its method)
    max_length: int = 192
    max_prompt_length: int = 96
    beta: float = 0.1
    learning_rate: float = 1e-5
    seed: int = 42
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    # timed pairs (= optimizer steps) of the seed loop: an evenly spaced subset of the pairs our trainer's timed
    # steps train, in the trainer's order (so the subset spans the same lengths); 0 or more than there are: all
    seed_loop_pairs: int = 16

    @property
    def n_pairs(self) -> int:
        """Pairs in the training set: one batch per timed step (one epoch of them)."""
        return self.timed_steps * self.batch_size

    @property
    def run_steps(self) -> int:
        """Optimizer steps per run: the warm-up step, then the timed ones."""
        return self.timed_steps + 1


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    d = BenchSettings()
    parser.add_argument("--timed-steps", type=int, default=d.timed_steps,
                        help="optimizer steps timed per run, after one warm-up step")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--max-length", type=int, default=d.max_length)
    parser.add_argument("--max-prompt-length", type=int, default=d.max_prompt_length)
    parser.add_argument("--beta", type=float, default=d.beta)
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--seed-loop-pairs", type=int, default=d.seed_loop_pairs,
                        help="pairs the seed loop times (a spread subset of the trainer's timed pairs); 0: all")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    s = BenchSettings(
        timed_steps=args.timed_steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        beta=args.beta,
        learning_rate=args.learning_rate,
        seed=args.seed,
        threads=args.threads,
        seed_loop_pairs=args.seed_loop_pairs,
    )
    if s.timed_steps < 1 or s.batch_size < 1:
        raise BenchError(f"--timed-steps and --batch-size must be >= 1, got {s.timed_steps} and {s.batch_size}")
    if s.seed_loop_pairs < 0:
        raise BenchError(f"--seed-loop-pairs must be 0 (all timed pairs) or more, got {s.seed_loop_pairs}")
    if s.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {s.threads}")
    return s


def settings_to_args(s: BenchSettings) -> list[str]:
    """The command-line form of `s`, for launching a variant subprocess."""
    return [
        "--timed-steps", str(s.timed_steps), "--batch-size", str(s.batch_size), "--max-length", str(s.max_length),
        "--max-prompt-length", str(s.max_prompt_length), "--beta", str(s.beta),
        "--learning-rate", str(s.learning_rate), "--seed", str(s.seed), "--threads", str(s.threads),
        "--seed-loop-pairs", str(s.seed_loop_pairs),
    ]  # fmt: skip


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads (the matmul peak is measured at the same count)."""
    import torch

    torch.set_num_threads(n)


def model_dir() -> Path:
    """The materialised embedded SmolLM2-135M-Instruct folder (safetensors + tokenizer)."""
    from dpo_core.models import materialize_embedded

    return materialize_embedded(Path(os.environ["DPO_MODEL_CACHE"]))


def load_tokenizer(path: Path):
    from dpo_core.config import ModelConfig
    from dpo_core.models import load_tokenizer as _load

    return _load(path, ModelConfig())


def load_policy(path: Path):
    """The model in float32 on CPU with SDPA attention, exactly as `dpo_core.models.load_model` loads it."""
    from dpo_core.config import ModelConfig
    from dpo_core.models import load_model, pick_device

    cfg = ModelConfig(name_or_path=str(path), device="cpu")
    return load_model(path, cfg, pick_device(cfg))


def read_raw_pairs(path: Path = TRAIN_FILE) -> list[dict[str, Any]]:
    """The shipped UltraFeedback rows (`prompt`, `chosen`, `rejected` strings), in file order.

    Pairs with identical chosen and rejected text carry no preference (ingestion quarantines them): skipped here too.
    """
    if not path.is_file():
        raise BenchError(f"benchmark data not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchError(f"{path}:{n} is not valid JSON: {exc.msg}") from exc
            if rec["chosen"] == rec["rejected"]:
                continue
            rows.append({"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]})
    return rows


def _pair_id(prompt: str, chosen: str, rejected: str) -> str:
    blob = json.dumps([prompt, chosen, rejected]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def canonical_pairs(rows: list[dict[str, Any]]):
    """Rows -> the canonical pairs frame `tokenize_pairs` takes (prompt as one user message)."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "pair_id": _pair_id(r["prompt"], r["chosen"], r["rejected"]),
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": r["chosen"],
                "rejected": r["rejected"],
                "split": "train",
            }
            for r in rows
        ]
    )


@dataclass
class BenchData:
    """The benchmark's pairs: raw text (for TRL and the seed loop) and our tokenized frame, row-aligned."""

    raw: list[dict[str, Any]]
    tokenized: Any  # pandas DataFrame with dpo_core.templating.TOKENIZED_COLUMNS

    def tokens_per_pair(self) -> list[int]:
        """Non-padding tokens of one pair's two sequences: 2 * prompt + chosen + rejected."""
        return [
            2 * len(p) + len(c) + len(r)
            for p, c, r in zip(self.tokenized.prompt_ids, self.tokenized.chosen_ids, self.tokenized.rejected_ids)
        ]


def load_bench_data(tokenizer, s: BenchSettings, n_pairs: int) -> BenchData:
    """The first `n_pairs` pairs whose prompt is not cut by `max_prompt_length` (see the module docstring)."""
    from dpo_core.templating import tokenize_pairs

    raw = read_raw_pairs()
    # tokenize a generous head of the file; most prompts fit
    head = raw[: max(4 * n_pairs, 64)]
    frame, _report = tokenize_pairs(canonical_pairs(head), tokenizer, s.max_length, s.max_prompt_length)
    pid_to_raw = {_pair_id(r["prompt"], r["chosen"], r["rejected"]): r for r in head}
    keep = frame[~frame.prompt_truncated].head(n_pairs).reset_index(drop=True)
    if len(keep) < n_pairs:
        raise BenchError(
            f"only {len(keep)} of the first {len(head)} pairs have a prompt of <= {s.max_prompt_length} tokens; "
            f"need {n_pairs}"
        )
    return BenchData(raw=[pid_to_raw[p] for p in keep.pair_id], tokenized=keep)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ru_maxrss in KiB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / (1024.0 * 1024.0)


def count_params(model) -> int:
    """Distinct parameters (tied embedding / LM head counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@dataclass
class VariantResult:
    """One run of one variant. Step lists cover the timed steps only (the warm-up step is `warmup_seconds`);
    `tokens` are non-padding tokens."""

    variant: str
    params: int
    live_reference: bool
    step_seconds: list[float]  # per timed optimizer step, wall clock
    step_pairs: list[int]  # pairs in each timed step
    step_tokens: list[int]  # non-padding policy tokens in each timed step (chosen + rejected sequences)
    padded_tokens: list[int]  # positions including padding in each timed step (the tensors actually computed)
    peak_rss_mb: float  # whole process, read at its very end
    train_peak_rss_mb: float | None = None  # high-water mark before any checkpoint write (None: = peak_rss_mb)
    warmup_seconds: float | None = None  # the first (untimed) optimizer step
    precompute_seconds: float | None = None  # reference log-prob pass (not part of the step times)
    precompute_pairs: int | None = None
    eval_seconds: float | None = None  # the trained policy's evaluation on the pairs (forward only, same scorer)
    eval_pairs: int | None = None
    load_seconds: float = 0.0
    threads: int = 1
    notes: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # per-step metrics as the variant reports them
    step_cpu_seconds: list[float] = field(default_factory=list)  # per timed step, CPU time of the process
    # non-padding positions the policy computed per timed step; empty = step_tokens (two rows per pair). Fewer with
    # a shared prompt (one row prompt + chosen + rejected per pair): the prompt is computed once, trained for both
    step_positions: list[int] = field(default_factory=list)

    @property
    def positions(self) -> int:
        return sum(self.step_positions) if self.step_positions else sum(self.step_tokens)

    @property
    def tokens_per_cpu_second(self) -> float:
        """Trained tokens per CPU-second: less sensitive than wall time to other load on a shared machine."""
        cpu = sum(self.step_cpu_seconds)
        return sum(self.step_tokens) / cpu if cpu > 0 else float("nan")

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def pairs_per_second(self) -> float:
        return sum(self.step_pairs) / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return sum(self.step_tokens) / self.seconds

    def model_flops(self) -> float:
        """Useful model FLOPs of the timed steps: 6 N per trained token, + 2 N per token for a live reference
        forward (the same for every variant: they train the same tokens)."""
        per_token = 6 + (2 if self.live_reference else 0)
        return per_token * self.params * sum(self.step_tokens)

    def computed_flops(self) -> float:
        """FLOPs the variant actually spent on non-padding positions (6 N per computed position, + 2 N with a live
        reference): below ``model_flops`` when prompts are shared; what the matmul-peak fraction is taken of."""
        per_token = 6 + (2 if self.live_reference else 0)
        return per_token * self.params * self.positions

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(
            pairs_per_second=self.pairs_per_second,
            tokens_per_second=self.tokens_per_second,
            flops_per_second=self.model_flops() / self.seconds,
            computed_flops_per_second=self.computed_flops() / self.seconds,
            tokens_per_cpu_second=self.tokens_per_cpu_second,
        )
        return d


def write_result(result: VariantResult, path: Path | None) -> None:
    """Write the JSON record (to `path`, or stdout); peak RSS is read at the very end of the run."""
    result.peak_rss_mb = peak_rss_mb()
    if result.train_peak_rss_mb is None:
        result.train_peak_rss_mb = result.peak_rss_mb
    blob = json.dumps(result.to_json(), indent=1)
    if path is None:
        print(blob)
    else:
        with atomic_file(path) as handle:
            handle.write(blob)


def now() -> tuple[float, float]:
    """(wall clock, this process's CPU time over all its threads), both in seconds."""
    return time.perf_counter(), time.process_time()


def step_intervals(ends: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds between consecutive step ends (`now()` readings)."""
    wall = [b[0] - a[0] for a, b in zip(ends, ends[1:])]
    cpu = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
    return wall, cpu


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("transformers", "trl", "accelerate", "datasets", "peft"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "not installed"
    return info
