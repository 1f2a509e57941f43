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
import contextlib
import json
import math
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from verl_selflock.diagnostics.logs import MAX_VALUE, REWARD_KEYS, SkipReport, metric_series, read_training_logs
from verl_selflock.errors import InvalidInput, MissingInput

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
        files = [p for p in paths.split(",") if p]
        if not sep or not name or not files:
            raise InvalidInput(f"--runs items look like name=path (got {item!r})")
        runs.append((name, files))
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
    """``summary.json`` of an eval output folder (or the file itself), checked: an object whose plotted
    metrics are objects of numbers. NaN (or null) is an undefined estimate, drawn as "n/a"; an infinite
    value cannot be a rate or a mean of turns and is refused, naming the file and the key."""
    path = Path(path).expanduser()
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise MissingInput(f"{file} does not exist (run `verl-selflock eval --out {path}` first)")
    try:
        summary = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as err:
        raise InvalidInput(f"{file}: cannot read it ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise InvalidInput(f"{file}: not UTF-8 text (not a summary.json of `verl-selflock eval`?)") from err
    except json.JSONDecodeError as err:
        raise InvalidInput(f"{file}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from err
    except RecursionError as err:
        raise InvalidInput(f"{file}: not usable JSON (nested too deeply)") from err
    if not isinstance(summary, dict):
        raise InvalidInput(f"{file}: expected a JSON object (a summary.json of `verl-selflock eval`), got {type(summary).__name__}")
    metrics = summary.get("metrics", {})
    if not isinstance(metrics, dict):
        raise InvalidInput(f"{file}: 'metrics' must be an object, got {type(metrics).__name__}")
    for key in [key for key, _ in EVAL_RATES] + ["turns"]:
        entry = metrics.get(key)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise InvalidInput(f"{file}: metrics.{key} must be an object with value, ci_low, ci_high")
        for field in ("value", "ci_low", "ci_high"):
            value = entry.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInput(f"{file}: metrics.{key}.{field} is not a number ({str(value)[:40]!r})")
            if math.isinf(value) or abs(value) > MAX_VALUE:
                raise InvalidInput(f"{file}: metrics.{key}.{field} is {value:g} (not a finite number of plottable size)")
    return summary


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
        episodes = episodes if isinstance(episodes, int) and not isinstance(episodes, bool) else "?"
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


def output_path(out: str | os.PathLike) -> tuple[Path, str]:
    """(file, format) for ``--out``: the format from the suffix (PNG when there is none, and ``.png`` is
    appended); refused before any plotting: an unknown suffix, a folder, a parent that is a file."""
    from matplotlib.figure import Figure

    path = Path(out).expanduser()
    if path.is_dir():
        raise InvalidInput(f"--out {path}: is a folder; give a file name such as {path / 'plot.png'}")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    kind = path.suffix[1:].lower()
    supported = Figure().canvas.get_supported_filetypes()
    if kind not in supported:
        raise InvalidInput(f"--out {path}: unknown image format {path.suffix!r} (use one of {', '.join(sorted(supported))})")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInput(f"--out {path}: {parent} is a file, not a folder")
            break
    return path, kind


def _save(fig: Any, out: str | os.PathLike) -> Path:
    """Write the figure atomically: a temporary file in the same folder, renamed over ``out`` when complete."""
    import matplotlib.pyplot as plt

    path, kind = output_path(out)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(temp, dpi=120, format=kind)
        os.replace(temp, path)
    except OSError as err:
        raise InvalidInput(f"--out {path}: cannot write there ({err.strerror or err})") from err
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):
            temp.unlink()
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``verl-selflock plot``."""
    parser.add_argument("kind", choices=("train", "eval"), help="train: curves from training logs; eval: bar charts")
    parser.add_argument("--runs", nargs="+", required=True,
                        help="name=path items: train: log file(s), comma-separated; eval: `verl-selflock eval` --out folders")
    parser.add_argument("--out", required=True, help="image file to write (PNG unless the suffix names another format)")
    parser.add_argument("--smooth", type=int, default=5, help="train: moving-average window in steps (1 = none)")
    parser.add_argument("--title", default=None, help="figure title")


def run(args: argparse.Namespace) -> int:
    runs = parse_runs(args.runs)
    if args.smooth < 1:
        raise InvalidInput(f"--smooth must be >= 1 (1 = no smoothing), got {args.smooth}")
    output_path(args.out)  # a bad --out is refused before the logs are read
    if args.kind == "train":
        series = []
        for name, paths in runs:
            report = SkipReport()
            series.append((name, read_training_logs(paths, report)))
            if report.summary():
                print(f"run {name!r}: {report.summary()}", file=sys.stderr)
        path = plot_training(series, args.out, smooth=args.smooth, title=args.title)
    else:
        several = [name for name, paths in runs if len(paths) > 1]
        if several:
            raise InvalidInput(f"--runs {several[0]}=...: plot eval takes one eval folder per run, got several")
        path = plot_eval([(name, load_eval_summary(paths[0])) for name, paths in runs], args.out, title=args.title)
    print(f"wrote {os.path.abspath(path)}")
    return 0
