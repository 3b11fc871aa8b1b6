"""End-of-sweep summary: the trials ranked by the sweep metric, as Markdown, CSV and one PNG.

The figure is drawn on a bare ``Figure`` with the Agg canvas (no pyplot, no global backend
switch), so it works on headless Ray workers and in processes that use matplotlib otherwise.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MISSING = "—"
_COLOURS = {"finished": "tab:blue", "stopped early": "tab:orange"}
_OTHER_COLOUR = "tab:red"


@dataclass
class TrialSummary:
    trial_id: str
    status: str  # "finished" | "stopped early" | "error" | "running"
    epochs: int  # epochs the trial reported
    params: dict[str, float | int | str]  # swept config key -> value
    metric: float | None  # the sweep metric at the trial's last epoch, i.e. of its final model (None: never reported)
    run_id: str = ""  # MLflow child run id
    checkpoint: str = ""  # path of its final checkpoint


def has_finite_metric(trial: TrialSummary) -> bool:
    # NaN and inf count as "never reported": a diverged trial must not win (or break) the ranking.
    return trial.metric is not None and math.isfinite(trial.metric)


def rank_trials(trials: Iterable[TrialSummary], mode: str) -> list[TrialSummary]:
    """Best first for ``mode`` ("max" | "min"); trials without a metric last; ties by trial id."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    sign = -1.0 if mode == "max" else 1.0

    def key(t: TrialSummary):
        return (0, sign * t.metric, t.trial_id) if has_finite_metric(t) else (1, 0.0, t.trial_id)

    return sorted(trials, key=key)


def _param_keys(trials: list[TrialSummary]) -> list[str]:
    return sorted({k for t in trials for k in t.params})


def _fmt_param(value) -> str:
    if value is None:
        return MISSING
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fmt_metric(trial: TrialSummary) -> str:
    return f"{trial.metric:.4f}" if has_finite_metric(trial) else MISSING


def format_trials_table(trials: Iterable[TrialSummary], metric: str, mode: str) -> str:
    """A Markdown table of the trials, best first, one column per swept parameter."""
    ranked = rank_trials(trials, mode)
    keys = _param_keys(ranked)
    header = ["rank", "trial", "status", "epochs", metric, *keys, "run id"]
    rows = [
        [str(i), t.trial_id, t.status, str(t.epochs), _fmt_metric(t),
         *(_fmt_param(t.params.get(k)) for k in keys), t.run_id or MISSING]
        for i, t in enumerate(ranked, start=1)
    ]
    # A "|" inside a cell (e.g. a categorical value) would split the Markdown column.
    lines = ["| " + " | ".join(c.replace("|", r"\|") for c in row) + " |" for row in [header, *rows]]
    lines.insert(1, "|" + "---|" * len(header))
    return "\n".join(lines) + "\n"


def _write_csv(ranked: list[TrialSummary], metric: str, path: Path) -> None:
    keys = _param_keys(ranked)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "trial_id", "status", "epochs", metric, *keys, "run_id", "checkpoint"])
        for i, t in enumerate(ranked, start=1):
            # Full precision here (the CSV is for machines); empty cells where there is no value.
            writer.writerow([i, t.trial_id, t.status, t.epochs, t.metric if has_finite_metric(t) else "",
                             *(t.params.get(k, "") for k in keys), t.run_id, t.checkpoint])


def _plot(ranked: list[TrialSummary], metric: str, log_scale: set[str], path: Path) -> bool:
    """One panel per swept parameter, metric against value. False (nothing drawn) when there are
    no parameters or no trial has a metric."""
    scored = [t for t in ranked if has_finite_metric(t)]
    keys = _param_keys(ranked)
    if not scored or not keys:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.5 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    best = scored[0]  # ranked, so the first scored trial is the best
    for ax, key in zip(axes, keys):
        points = [t for t in scored if key in t.params]
        values = [t.params[key] for t in points]
        # Strings (and bools) are categories: plot at positions 0..n-1 with the values as ticks.
        categorical = any(isinstance(v, (str, bool)) for v in values)
        if categorical:
            cats = sorted({str(v) for v in values})
            xs = [cats.index(str(v)) for v in values]
            ax.set_xticks(range(len(cats)), cats)
            ax.set_xlim(-0.5, len(cats) - 0.5)  # keep the end categories off the panel edges
        else:
            xs = values
            if key in log_scale:
                ax.set_xscale("log")
        for status in dict.fromkeys(t.status for t in points):  # first-seen order, no repeats
            idx = [i for i, t in enumerate(points) if t.status == status]
            ax.scatter([xs[i] for i in idx], [points[i].metric for i in idx], label=status,
                       color=_COLOURS.get(status, _OTHER_COLOUR), alpha=0.8)
        i = next((i for i, t in enumerate(points) if t is best), None)
        if i is not None:
            ax.scatter([xs[i]], [best.metric], marker="*", s=250, color="gold",
                       edgecolors="black", zorder=3, label=f"best ({best.trial_id})")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.savefig(path, format="png")
    return True


def write_sweep_summary(
    trials: Iterable[TrialSummary],
    *,
    metric: str,
    mode: str,
    output_dir: Path,
    log_scale: Iterable[str] = (),
) -> list[Path]:
    """Write ``trials.md``, ``trials.csv`` and (when there is something to plot)
    ``metric_vs_params.png`` into ``output_dir``; returns the paths written."""
    ranked = rank_trials(trials, mode)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    md = output_dir / "trials.md"
    md.write_text(f"# Sweep trials ranked by `{metric}` ({mode})\n\n" + format_trials_table(ranked, metric, mode))
    table = output_dir / "trials.csv"
    _write_csv(ranked, metric, table)
    written = [md, table]
    png = output_dir / "metric_vs_params.png"
    if _plot(ranked, metric, set(log_scale), png):
        written.append(png)
    return written
