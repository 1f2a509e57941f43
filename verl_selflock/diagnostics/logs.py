"""Read per-step training metrics from the log formats a veRL run leaves behind.

Accepted formats (chosen by content, not only by extension):

* **veRL file logger / our JSONL** (``trainer.logger=[file]``, ``*.jsonl``): one JSON object per line,
  ``{"step": 3, "data": {"critic/score/mean": 0.2, "selflock/as_proxy": 0.6, ...}}``; flat lines
  ``{"step": 3, "critic/score/mean": 0.2, ...}`` are accepted too.
* **veRL console log** (``trainer.logger=[console]``, the run's stdout saved to a file): lines
  ``step:3 - critic/score/mean:0.2 - selflock/as_proxy:0.6 - ...``; everything else is ignored.
* **wide CSV** (a wandb "Export CSV" of a run's history, or any table): a step column (``step``,
  ``Step``, ``_step``, ``global_step`` or ``training/global_step``) and one column per metric. wandb's
  ``"<run> - <metric>"`` headers are reduced to ``<metric>``; its ``__MIN``/``__MAX`` columns are dropped.
  One file is one run: an export whose headers name several wandb runs is refused, naming them.
* **tensorboard scalar CSV** (the "Download CSV" of one scalar: columns ``Wall time, Step, Value``):
  one metric per file, named by the file (tensorboard writes ``run-<run>-tag-<tag>.csv`` with ``/`` in
  the tag turned into ``_``); pass several files for one run, comma-separated.

Result: ``{metric name: {step: value}}``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from verl_selflock.contracts.episode import finite_or_none

__all__ = ["read_training_log", "read_training_logs", "REWARD_KEYS", "metric_series"]

Series = dict[str, dict[int, float]]

STEP_COLUMNS = ("step", "Step", "_step", "global_step", "training/global_step")
REWARD_KEYS = ("critic/score/mean", "selflock/reward", "critic/rewards/mean")
"""Where a run's mean training reward is found, in order of preference."""
_CONSOLE_STEP = re.compile(r"step:(\d+) - (.*)$")
_TB_NAME = re.compile(r"tag-(.+)\.csv$")
_WRAPPED = re.compile(r"^[A-Za-z_][\w.]*\((.*)\)$")  # pprint of numpy scalars: np.float64(0.25)


def _add(series: Series, metric: str, step: int, value: Any) -> None:
    number = finite_or_none(value)
    if number is not None:
        series.setdefault(metric, {})[int(step)] = number


def _read_jsonl(path: Path, series: Series) -> None:
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # e.g. a partial last line of a killed run
        if not isinstance(record, Mapping) or "step" not in record:
            continue
        data = record.get("data") if isinstance(record.get("data"), Mapping) else record
        for key, value in data.items():
            if key != "step":
                _add(series, str(key), int(record["step"]), value)


def _read_console(text: str, series: Series) -> None:
    for line in text.splitlines():
        match = _CONSOLE_STEP.search(line)
        if not match:
            continue
        step = int(match.group(1))
        for item in match.group(2).split(" - "):
            key, _, value = item.rpartition(":")
            if key:
                value = value.strip()
                wrapped = _WRAPPED.match(value)
                _add(series, key.strip(), step, wrapped.group(1) if wrapped else value)


def _read_csv(path: Path, series: Series) -> None:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    columns = list(rows[0].keys())
    if {"Step", "Value"} <= set(columns) and "Wall time" in columns:  # tensorboard: one scalar
        match = _TB_NAME.search(path.name)
        tag = match.group(1) if match else path.stem
        metric = _tensorboard_tag(tag)
        for row in rows:
            _add(series, metric, int(float(row["Step"])), row["Value"])
        return
    step_column = next((c for c in STEP_COLUMNS if c in columns), None)
    if step_column is None:
        raise ValueError(f"{path}: no step column (one of {STEP_COLUMNS}) and not a tensorboard scalar CSV")
    _refuse_several_runs(path, columns)
    for row in rows:
        step = finite_or_none(row[step_column])
        if step is None:
            continue
        for column, value in row.items():
            if column == step_column or column.endswith(("__MIN", "__MAX")):
                continue
            metric = column.split(" - ", 1)[1] if " - " in column else column
            _add(series, metric, int(step), value)


def _wandb_runs(columns: Iterable[str]) -> list[str]:
    """Run names of a wandb export's ``"<run> - <metric>"`` headers, in column order."""
    runs: list[str] = []
    for column in columns:
        if " - " in column:
            run = column.split(" - ", 1)[0]
            if run not in runs:
                runs.append(run)
    return runs


def _refuse_several_runs(path: Path, columns: Iterable[str]) -> None:
    """One file is one run: a wandb export of several runs would otherwise be merged into one series
    per metric (each step's value taken from whichever run came last), silently."""
    runs = _wandb_runs(columns)
    if len(runs) > 1:
        raise ValueError(
            f"{path} holds {len(runs)} wandb runs ({', '.join(repr(r) for r in runs)}); a log file must hold "
            "one run. Export each run's history on its own (open the run, Export CSV) and pass them as "
            "--runs NAME=FILE ..."
        )


def _tensorboard_tag(tag: str) -> str:
    """Tensorboard's file name has ``/`` replaced by ``_``: map back the names we plot."""
    for known in (*REWARD_KEYS, "selflock/as_proxy", "selflock/bt_proxy", "selflock/self_locking",
                  "selflock/info_gain_per_action", "selflock/psi_delta", "selflock/turns", "selflock/success_rate"):
        if tag in (known, known.replace("/", "_")):
            return known
    return tag


def read_training_log(path: str | os.PathLike) -> Series:
    """``{metric: {step: value}}`` from one file of a format listed in the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log {path} does not exist")
    series: Series = {}
    if path.suffix == ".csv":
        _read_csv(path, series)
        return series
    text = path.read_text(encoding="utf-8", errors="replace")
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.lstrip().startswith("{"):
        _read_jsonl(path, series)
    else:
        _read_console(text, series)
    if not series:
        raise ValueError(f"{path}: no per-step metrics found (expected veRL's JSONL, console log or a CSV export)")
    return series


def read_training_logs(paths: Iterable[str | os.PathLike]) -> Series:
    """Merge several files of one run (e.g. one tensorboard CSV per metric)."""
    merged: Series = {}
    for path in paths:
        for metric, values in read_training_log(path).items():
            merged.setdefault(metric, {}).update(values)
    return merged


def metric_series(series: Series, names: Iterable[str]) -> tuple[str, list[int], list[float]] | None:
    """The first of ``names`` present in ``series``: (name, sorted steps, values); None if none is."""
    for name in names:
        values = series.get(name)
        if values:
            steps = sorted(values)
            return name, steps, [values[s] for s in steps]
    return None
