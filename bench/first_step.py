"""Where the trainer's early steps spend their time: per-phase wall, CPU and page faults of steps 1, 2, 3, ...

    python -m bench.first_step [--layers 8] [--steps 4] [--threads 2] [--same-batch | --bench-order]

Runs `dpo_core.trainer.train` itself (precomputed reference, the default shared-prompt layout, fused AdamW) on a
SmolLM2-135M-shaped model with `--layers` decoder layers (the real hidden sizes and 49,152-token vocabulary, random
weights; `--layers 0`: the embedded model with its 30 layers and real weights), and splits every optimizer step into
phases by wrapping the trainer's own functions: collate, forward (`_Scorer.logps`), loss + backward (the rest of
`_forward_backward`), clip (`_clip`), AdamW (`optimizer.step`, via its step hooks) and the rest (scheduler,
`zero_grad`, metrics, history write). Each phase reports wall seconds, process CPU seconds and minor page faults
(`ru_minflt`: first touches of memory the process had not used before, i.e. allocator growth).

`--same-batch` (the default) trains copies of one pair (distinct pair ids), so every step computes exactly the
same tensors and any difference between steps is one-time cost. `--bench-order` trains the benchmark's first
`steps * 4` pairs in the trainer's length-grouped order instead (longest batch first), as `make bench` does.
Relative numbers within one process are meaningful on a loaded machine; run it a few times.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import BenchSettings, load_bench_data, load_policy, load_tokenizer, model_dir, peak_rss_mb
from bench.common import set_threads

PHASES = ("collate", "forward", "loss+backward", "clip", "adamw", "rest")


N = 4  # wall s, CPU s (user + system), system CPU s, minor page faults


def _clock() -> tuple[float, float, float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime, usage.ru_stime, usage.ru_minflt


class PhaseClock:
    """Accumulates (wall s, CPU s, system s, minor faults) per (step, phase); `rest` is the step's interval minus
    the phases. `tokens[step]`: trained tokens of the step's batch."""

    def __init__(self) -> None:
        self.phases: dict[int, dict[str, list[float]]] = defaultdict(lambda: {p: [0.0] * N for p in PHASES})
        self.tokens: dict[int, int] = defaultdict(int)
        self.step = 1
        self._step_start = _clock()

    def add(self, phase: str, start: tuple) -> None:
        end = _clock()
        acc = self.phases[self.step][phase]
        for i in range(N):
            acc[i] += end[i] - start[i]

    def end_step(self) -> None:
        end = _clock()
        rec = self.phases[self.step]
        total = [end[i] - self._step_start[i] for i in range(N)]
        rec["rest"] = [total[i] - sum(rec[p][i] for p in PHASES if p != "rest") for i in range(N)]
        rec["total"] = total
        self.step += 1
        self._step_start = end

    def wrap(self, phase: str, fn, *, subtract: str | None = None):
        """`fn` timed into `phase`; with `subtract`, the time already booked to that phase inside `fn` is taken out."""

        def timed(*args, **kwargs):
            before = list(self.phases[self.step][subtract]) if subtract else None
            start = _clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, start)
                if before is not None:
                    for i in range(N):
                        self.phases[self.step][phase][i] -= self.phases[self.step][subtract][i] - before[i]

        return timed


def build_model(layers: int):
    """The embedded model (`layers=0`) or a random model of its shape with `layers` decoder layers."""
    path = model_dir()
    if layers == 0:
        return load_policy(path)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config.num_hidden_layers = layers
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


def run(layers: int, steps: int, same_batch: bool, threads: int) -> PhaseClock:
    import pandas as pd

    import dpo_core.trainer as trainer_mod
    from bench.ours import train_config, trainer_hooks
    from dpo_core.models import DeviceSpec
    from dpo_core.reference import compute_reference_logps

    set_threads(threads)
    s = BenchSettings(timed_steps=steps - 1, batch_size=4, threads=threads)
    tokenizer = load_tokenizer(model_dir())
    if same_batch:
        one = load_bench_data(tokenizer, s, 1).tokenized
        data = pd.concat([one] * (4 * steps), ignore_index=True)
        data["pair_id"] = [f"copy-{i}" for i in range(len(data))]
    else:
        data = load_bench_data(tokenizer, s, 4 * steps).tokenized
    model = build_model(layers)
    spec = DeviceSpec(device=torch.device("cpu"), dtype=torch.float32, autocast_dtype=None, attn_implementation="sdpa")
    cfg = train_config(s, steps=steps)
    reference = compute_reference_logps(model, data, batch_size=cfg.reference_batch_size, spec=spec,
                                        chunk_size=cfg.logprob_chunk_size)

    clock = PhaseClock()
    with trainer_hooks([]), tempfile.TemporaryDirectory(prefix="bench-first-step-") as out:  # no checkpoint writes
        originals = {name: getattr(trainer_mod, name) for name in ("_collate", "_forward_backward", "_clip",
                                                                   "_make_optimizer")}
        original_logps = trainer_mod._Scorer.logps

        def make_optimizer(params, cfg):
            opt = originals["_make_optimizer"](params, cfg)
            box = {}
            opt.register_step_pre_hook(lambda *a: box.__setitem__("t", _clock()))
            opt.register_step_post_hook(lambda *a: clock.add("adamw", box.pop("t")))
            return opt

        def collate(rows, layout, tokenizer):
            if clock.step == 1 and not clock.tokens[1]:  # the loop starts: the set-up before it is not a step
                clock._step_start = _clock()
            batch = originals["_collate"](rows, layout, tokenizer)
            clock.tokens[clock.step] += batch.n_sequence_tokens
            return batch

        trainer_mod._collate = clock.wrap("collate", collate)
        trainer_mod._forward_backward = clock.wrap("loss+backward", originals["_forward_backward"],
                                                   subtract="forward")
        trainer_mod._clip = clock.wrap("clip", originals["_clip"])
        trainer_mod._make_optimizer = make_optimizer
        trainer_mod._Scorer.logps = clock.wrap("forward", original_logps)
        try:
            trainer_mod.train(model, tokenizer, data, cfg, out_dir=Path(out), spec=spec, reference=reference,
                              progress_bar=False, on_step=lambda m: clock.end_step())  # fmt: skip
        finally:
            for name, fn in originals.items():
                setattr(trainer_mod, name, fn)
            trainer_mod._Scorer.logps = original_logps
    return clock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (0: the embedded model, 30 layers)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=BenchSettings().threads)
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--same-batch", dest="same_batch", action="store_true", default=True)
    order.add_argument("--bench-order", dest="same_batch", action="store_false")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.layers < 0:
        parser.error("--steps must be >= 2 and --layers >= 0")
    clock = run(args.layers, args.steps, args.same_batch, args.threads)
    print(f"layers {args.layers or 30}, {args.threads} threads, {'same batch' if args.same_batch else 'bench order'}; "
          "per phase: wall s / CPU s (system s) / minor page faults")
    print("| step | tokens | " + " | ".join(PHASES) + " | total | CPU ms per token |")
    print("|---|---|" + "---|" * (len(PHASES) + 2))
    for step, rec in sorted(clock.phases.items()):
        cells = [f"{rec[p][0]:.2f} / {rec[p][1]:.2f} ({rec[p][2]:.2f}) / {rec[p][3] / 1000:.0f}k"
                 for p in (*PHASES, "total")]
        per_token = 1000 * rec["total"][1] / clock.tokens[step] if clock.tokens[step] else float("nan")
        print(f"| {step} | {clock.tokens[step]} | " + " | ".join(cells) + f" | {per_token:.1f} |")
    print(f"peak RSS {peak_rss_mb():,.0f} MiB")


if __name__ == "__main__":
    main()
