"""Training curves as one PNG: the four panels the seed tutorial plots (loss, reward accuracy, reward margin, chosen and
rejected rewards against the optimizer step), done right: labelled axes and units, the raw per-step values drawn
faint with an exponential moving average on top (DPO's per-batch metrics are noisy with a handful of pairs per step),
the validation split's values (`val/...`, scored every `train.eval_every` steps) as dashed lines with markers,
the chance level marked on the accuracy panel and, for sigmoid DPO, ln 2 (its loss at zero margin, i.e. at the
start) on the loss panel. Uses matplotlib's Agg backend: no display needed, safe in worker threads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless; must come before pyplot is imported anywhere in this process
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

PANELS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Loss", ("loss",), "loss"),
    ("Reward accuracy", ("rewards/accuracies",), "fraction of pairs with chosen reward > rejected"),
    ("Reward margin", ("rewards/margins",), "chosen - rejected reward"),
    ("Implicit rewards", ("rewards/chosen", "rewards/rejected"), "beta * (log pi - log pi_ref)"),
)


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Exponential moving average with bias correction (like TensorBoard's smoothing); NaN values are skipped.

    s_t = alpha * s_{t-1} + (1 - alpha) * x_t, reported as s_t / (1 - alpha**n) after n finite values."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1), got {alpha}")
    out: list[float] = []
    state, n = 0.0, 0
    for x in values:
        if x is None or not math.isfinite(x):
            out.append(float("nan"))
            continue
        n += 1
        state = alpha * state + (1.0 - alpha) * x
        out.append(state / (1.0 - alpha**n))
    return out


def default_smoothing(n_points: int) -> float:
    """More smoothing for longer runs: 0 for < 5 points, up to 0.9."""
    if n_points < 5:
        return 0.0
    return min(0.9, 1.0 - 4.0 / n_points)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in history:
        if key in record and record[key] is not None and "step" in record:
            steps.append(int(record["step"]))
            values.append(float(record[key]))
    return steps, values


def plot_training_curves(history: Sequence[Mapping[str, Any]], *, title: str = "DPO training",
                         smoothing: float | None = None, loss_type: str | None = None) -> Figure:
    """A 2x2 figure of the training history (records with `step` and TRL metric names). Close it after use.

    `loss_type='sigmoid'` adds the ln 2 reference line (the sigmoid-DPO loss at zero margin) to the loss panel."""
    if not history:
        raise ValueError("plot_training_curves needs at least one history record")
    alpha = default_smoothing(len(history)) if smoothing is None else smoothing
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    colors = {"rewards/chosen": "tab:green", "rewards/rejected": "tab:red"}
    for ax, (panel_title, keys, ylabel) in zip(axes.flat, PANELS):
        drawn = False
        for key in keys:
            steps, values = _series(history, key)
            if not steps:
                continue
            color = colors.get(key, "tab:blue")
            label = key.split("/")[-1]
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=1, marker="." if len(steps) < 30 else None,
                    label=f"{label} (raw)")
            if alpha > 0:
                ax.plot(steps, ema(values, alpha), color=color, linewidth=2, label=f"{label} (EMA {alpha:.2f})")
            val_steps, val_values = _series(history, f"val/{key}")  # validation scored during training, if any
            if val_steps:
                ax.plot(val_steps, val_values, color=color, linestyle="--", marker="o", markersize=4,
                        label=f"{label} (validation)")
            drawn = True
        if panel_title == "Reward accuracy":
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
            ax.set_ylim(-0.05, 1.05)
        elif panel_title == "Loss" and loss_type == "sigmoid":
            ax.axhline(math.log(2), color="grey", linestyle=":", linewidth=1, label="ln 2 (zero margin)")
        elif panel_title in ("Reward margin", "Implicit rewards"):
            ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
        if not drawn:
            ax.text(0.5, 0.5, f"no {', '.join(keys)} in history", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(panel_title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    return fig


def save_training_curves(history: Sequence[Mapping[str, Any]], path: Path | str, **kwargs: Any) -> Path:
    """Plot the history and write the PNG to `path` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plot_training_curves(history, **kwargs)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_sweep(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str,
               winner: int | None = None) -> Figure:
    """The validation metric of every completed sweep trial against each swept key: one panel per key. Rows hold
    `trial` (index), `status`, each key's value and `metric`; the winner is drawn as a star. Numeric values go on a
    linear axis (log when they are all positive and span 10x or more), anything else on a categorical one."""
    if not keys:
        raise ValueError("plot_sweep needs at least one swept key")
    done = [r for r in rows if r.get("status") == "completed" and r.get(metric) is not None]
    failed = len(rows) - len(done)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), constrained_layout=True, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        values = [r[key] for r in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
            if xs and min(xs) > 0 and max(xs) >= 10 * min(xs):
                ax.set_xscale("log")
        else:  # categories in order of first appearance
            labels = list(dict.fromkeys(str(v) for v in values))
            xs = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels)
        ys = [float(r[metric]) for r in done]
        ax.scatter(xs, ys, color="tab:blue", zorder=2, label="trial")
        for x, y, r in zip(xs, ys, done):
            if r["trial"] == winner:
                ax.scatter([x], [y], marker="*", s=220, color="tab:orange", zorder=3, label="winner")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        if not done:
            ax.text(0.5, 0.5, "no completed trial", ha="center", va="center", transform=ax.transAxes)
        elif winner is not None:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{metric} per trial ({len(done)} completed" + (f", {failed} failed)" if failed else ")"))
    return fig
