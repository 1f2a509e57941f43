"""``verl-selflock plot``: PNG figures of training runs and of evaluations, side by side.

* ``verl-selflock plot train --runs vanilla=logs/vanilla.jsonl arew=logs/arew.jsonl --out train.png``:
  reward, AS proxy and BT proxy over training steps, one line per run (raw values faint, a moving
  average solid), steps where the self-locking monitor fired shaded. Log formats:
  :mod:`verl_selflock.diagnostics.logs` (veRL JSONL / console log, wandb or tensorboard CSV; several
  files of one run comma-separated).
* ``verl-selflock plot eval --runs vanilla=eval/vanilla arew=eval/arew --out eval.png``: bar charts of
  the ``summary.json`` of ``verl-selflock eval`` runs with their 95% confidence intervals as error
  bars: rates in [0, 1] in one panel, turns in another.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from verl_selflock.diagnostics.logs import REWARD_KEYS, metric_series, read_training_logs

__all__ = ["TRAIN_PANELS", "plot_training", "plot_eval", "parse_runs", "add_arguments", "run"]

TRAIN_PANELS: list[tuple[str, tuple[str, ...], str]] = [
    ("Mean training reward", REWARD_KEYS, "reward (success rate)"),
    ("AS proxy: share of informative queries", ("selflock/as_proxy",), "share of Action rounds with AS +1"),
    ("BT proxy: share of updates toward the truth", ("selflock/bt_proxy",), "share of Update rounds with BT +1"),
]
EVAL_RATES: list[tuple[str, str]] = [
    ("success_rate", "success rate"),
    ("as_proxy", "AS proxy"),
    ("bt_proxy", "BT proxy"),
    ("finish_ratio", "finish ratio"),
    ("invalid_ratio", "invalid ratio"),
    ("repeat_ratio", "repeat ratio"),
]
LOCK_KEY = "selflock/self_locking"


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is a dependency
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")  # files only, never a window (works on headless machines)
    import matplotlib.pyplot as plt

    return plt


def parse_runs(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``name=path[,path...]`` items -> [(name, [paths])] (clear error for a malformed item)."""
    runs = []
    for item in items:
        name, sep, paths = item.partition("=")
        if not sep or not name or not paths:
            raise ValueError(f"--runs items look like name=path (got {item!r})")
        runs.append((name, [p for p in paths.split(",") if p]))
    return runs


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points (the first points average what exists)."""
    x = np.asarray(values, dtype=np.float64)
    if window <= 1 or x.size == 0:
        return x
    cumulative = np.concatenate([[0.0], np.cumsum(x)])
    index = np.arange(1, x.size + 1)
    start = np.maximum(0, index - window)
    return (cumulative[index] - cumulative[start]) / (index - start)


def plot_training(runs: Sequence[tuple[str, Mapping[str, Mapping[int, float]]]], out: str | os.PathLike,
                  smooth: int = 5, title: str | None = None) -> Path:
    """Reward / AS proxy / BT proxy over steps for each ``(run name, series)``; returns the PNG path."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(TRAIN_PANELS), figsize=(5.2 * len(TRAIN_PANELS), 4.0), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column, (panel_title, keys, ylabel) in enumerate(TRAIN_PANELS):
        ax = axes[0][column]
        drawn = 0
        for number, (name, series) in enumerate(runs):
            found = metric_series(series, keys)
            if found is None:
                continue
            key, steps, values = found
            color = colors[number % len(colors)]
            if smooth > 1 and len(values) > 2:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
                ax.plot(steps, moving_average(values, smooth), color=color, linewidth=2, label=name)
            else:
                ax.plot(steps, values, color=color, linewidth=2, marker="o", markersize=3, label=name)
            locked_steps = sorted(s for s, v in series.get(LOCK_KEY, {}).items() if v >= 0.5)
            for number_in_run, step in enumerate(locked_steps):
                # Labelled once per run, in the reward panel only, so the legend says whose warning it is.
                label = f"{name}: self-locking warning" if column == 0 and number_in_run == 0 else None
                ax.axvspan(step - 0.5, step + 0.5, color=color, alpha=0.12, linewidth=0, label=label)
            drawn += 1
        ax.set_title(panel_title, fontsize=11)
        if column > 0:
            ax.set_ylim(-0.02, 1.02)  # shares: a fixed scale, so small wiggles do not look like trends
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=9, loc="best")
        else:
            ax.text(0.5, 0.5, f"not logged:\n{' / '.join(keys)}", ha="center", va="center", transform=ax.transAxes,
                    fontsize=9, color="gray")
    note = f"faint: per step; solid: moving average over {smooth} steps" if smooth > 1 else "per step"
    fig.suptitle(title or f"Training runs ({note})", fontsize=12)
    fig.tight_layout()
    return _save(fig, out)


def load_eval_summary(path: str | os.PathLike) -> dict[str, Any]:
    """``summary.json`` of an eval output folder (or the file itself)."""
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (run `verl-selflock eval --out {path}` first)")
    return json.loads(file.read_text())


def _error_bar(value: float, low: float, high: float) -> tuple[float, float]:
    """Lengths below and above ``value`` of its interval; 0 where undefined (matplotlib refuses < 0)."""
    below = 0.0 if math.isnan(value) or math.isnan(low) else max(0.0, value - low)
    above = 0.0 if math.isnan(value) or math.isnan(high) else max(0.0, high - value)
    return below, above


def plot_eval(runs: Sequence[tuple[str, Mapping[str, Any]]], out: str | os.PathLike, title: str | None = None) -> Path:
    """Grouped bars with 95% CI error bars for each ``(run name, summary)``; returns the PNG path."""
    plt = _pyplot()
    fig, (ax_rates, ax_turns) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [4, 1]})
    width = 0.8 / max(len(runs), 1)
    positions = np.arange(len(EVAL_RATES))
    for number, (name, summary) in enumerate(runs):
        metrics = summary.get("metrics", {})
        values, errors = [], [[], []]
        for key, _ in EVAL_RATES:
            value, low, high = _estimate(metrics.get(key))
            values.append(value)
            below, above = _error_bar(value, low, high)
            errors[0].append(below)
            errors[1].append(above)
        offset = (number - (len(runs) - 1) / 2) * width
        episodes = summary.get("episodes", "?")
        bars = ax_rates.bar(positions + offset, np.nan_to_num(values), width, yerr=errors, capsize=3,
                            label=f"{name} (n={episodes})")
        for bar, value in zip(bars, values, strict=True):
            text = "n/a" if math.isnan(value) else f"{value:.2f}"
            ax_rates.annotate(text, (bar.get_x() + bar.get_width() / 2, 0), xytext=(0, 2), textcoords="offset points",
                              ha="center", va="bottom", fontsize=7, color="white" if value > 0.08 else "black")
        value, low, high = _estimate(metrics.get("turns"))
        below, above = _error_bar(value, low, high)
        ax_turns.bar([number], [np.nan_to_num(value)], 0.6, yerr=[[below], [above]], capsize=3, color=bars.patches[0].get_facecolor() if bars.patches else None)
        ax_turns.annotate("n/a" if math.isnan(value) else f"{value:.1f}", (number, 0), xytext=(0, 2),
                          textcoords="offset points", ha="center", va="bottom", fontsize=8, color="white")
    ax_rates.set_xticks(positions, [label for _, label in EVAL_RATES])
    ax_rates.set_ylim(0, 1.05)
    ax_rates.set_ylabel("share (95% CI)")
    ax_rates.set_title("Outcome and self-locking proxies", fontsize=11)
    ax_rates.grid(axis="y", alpha=0.3)
    ax_rates.legend(fontsize=9)
    ax_turns.set_xticks(range(len(runs)), [name for name, _ in runs], rotation=20)
    ax_turns.set_ylabel("agent turns per episode (95% CI)")
    ax_turns.set_title("Turns taken", fontsize=11)
    ax_turns.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "Evaluation (error bars: 95% CI; Wilson for rates of episodes, bootstrap otherwise)",
                 fontsize=11)
    fig.tight_layout()
    return _save(fig, out)


def _estimate(entry: Mapping[str, Any] | None) -> tuple[float, float, float]:
    if not entry:
        return math.nan, math.nan, math.nan

    def number(key: str) -> float:
        value = entry.get(key)
        return math.nan if value is None else float(value)

    return number("value"), number("ci_low"), number("ci_high")


def _save(fig: Any, out: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``verl-selflock plot``."""
    parser.add_argument("kind", choices=("train", "eval"), help="train: curves from training logs; eval: bar charts")
    parser.add_argument("--runs", nargs="+", required=True,
                        help="name=path items: train: log file(s), comma-separated; eval: `verl-selflock eval` --out folders")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--smooth", type=int, default=5, help="train: moving-average window in steps (1 = none)")
    parser.add_argument("--title", default=None, help="figure title")


def run(args: argparse.Namespace) -> int:
    runs = parse_runs(args.runs)
    if args.kind == "train":
        path = plot_training([(name, read_training_logs(paths)) for name, paths in runs], args.out,
                             smooth=args.smooth, title=args.title)
    else:
        path = plot_eval([(name, load_eval_summary(paths[0])) for name, paths in runs], args.out, title=args.title)
    print(f"wrote {os.path.abspath(path)}")
    return 0
