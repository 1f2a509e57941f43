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

Result: ``{metric name: {step: value}}``. Malformed lines (a truncated last line of a killed run, text
that is not UTF-8, a step that is not a whole finite number, a CSV row with too few or too many fields)
are skipped and counted in a :class:`SkipReport`, never fatal; non-finite metric values are left out and
counted too. A file is refused (:class:`LogFormatError`, one line naming it) only when nothing usable is
left in it, or when its shape is wrong as a whole (a CSV without a step column, several wandb runs).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verl_selflock.errors import InvalidInput, MissingInput

__all__ = ["read_training_log", "read_training_logs", "REWARD_KEYS", "metric_series", "SkipReport", "LogFormatError"]

Series = dict[str, dict[int, float]]

STEP_COLUMNS = ("step", "Step", "_step", "global_step", "training/global_step")
REWARD_KEYS = ("critic/score/mean", "selflock/reward", "critic/rewards/mean")
"""Where a run's mean training reward is found, in order of preference."""
MAX_STEP = 2**53  # steps above are not exact as floats (matplotlib draws floats)
MAX_VALUE = 1e150
"""Largest plottable magnitude: beyond it matplotlib's axis arithmetic (ranges, moving sums) overflows."""
_CONSOLE_STEP = re.compile(r"step:(\d+) - (.*)$")
_TB_NAME = re.compile(r"tag-(.+)\.csv$")
_WRAPPED = re.compile(r"^[A-Za-z_][\w.]*\((.*)\)$")  # pprint of numpy scalars: np.float64(0.25)
_EXAMPLES = 3


class LogFormatError(InvalidInput):
    """A log file that cannot be read as a whole (a user error; also a ValueError, as before)."""


@dataclass
class SkipReport:
    """What the readers left out: malformed lines (with the first few as ``file:line: why``) and
    non-finite (or unplottably large) metric values."""

    lines: int = 0
    examples: list[str] = field(default_factory=list)
    nonfinite: int = 0
    nonfinite_metrics: list[str] = field(default_factory=list)

    def skip(self, path: Path, line_no: int, why: str) -> None:
        self.lines += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(f"{path}:{line_no}: {why}")

    def drop(self, metric: str) -> None:
        self.nonfinite += 1
        if metric not in self.nonfinite_metrics and len(self.nonfinite_metrics) < _EXAMPLES:
            self.nonfinite_metrics.append(metric)

    def summary(self) -> str:
        """One line, empty when nothing was left out."""
        parts = []
        if self.lines:
            parts.append(f"skipped {self.lines} malformed line(s) (first: {'; '.join(self.examples)})")
        if self.nonfinite:
            parts.append(
                f"ignored {self.nonfinite} non-finite value(s) (NaN, inf or beyond +-{MAX_VALUE:g}; of "
                f"{', '.join(self.nonfinite_metrics)})"
            )
        return ", ".join(parts)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: Any) -> float | None:
    """``value`` as a float (NaN and inf included); None when it is not a number at all."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
    except OverflowError:  # an integer beyond float range: as good as infinite
        return math.inf


def _step(value: Any) -> tuple[int | None, str]:
    """(step, "") for a whole finite number (or its text), else (None, why)."""
    number = _number(value.strip() if isinstance(value, str) else value)
    if number is None:
        return None, f"non-numeric step {_short(value)}"
    if not math.isfinite(number):
        return None, f"non-finite step {_short(value)}"
    if number != int(number):
        return None, f"step {_short(value)} is not a whole number"
    if abs(number) > MAX_STEP:
        return None, f"step {_short(value)} is out of range"
    return int(number), ""


def _add(series: Series, report: SkipReport, metric: str, step: int, value: Any) -> None:
    number = _number(value)
    if number is None:
        return  # not a metric value (a name, a flag): nothing to plot
    if not math.isfinite(number) or abs(number) > MAX_VALUE:
        report.drop(metric)
        return
    series.setdefault(metric, {})[step] = number


def _lines(path: Path, report: SkipReport) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines; lines that are not UTF-8 are skipped and counted."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise LogFormatError(f"{path}: cannot read it ({err.strerror or err})") from err
    for line_no, data in enumerate(raw.splitlines(), start=1):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            report.skip(path, line_no, "not UTF-8 text")
            continue
        if line_no == 1:
            text = text.removeprefix("\ufeff")  # Excel and some exporters start with a byte-order mark
        if text.strip():
            yield line_no, text


def _read_jsonl(path: Path, lines: Iterable[tuple[int, str]], series: Series, report: SkipReport) -> None:
    for line_no, line in lines:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            report.skip(path, line_no, "not a JSON line (truncated?)")  # e.g. the partial last line of a killed run
            continue
        if not isinstance(record, Mapping) or "step" not in record:
            report.skip(path, line_no, "not a JSON object with a step")
            continue
        step, why = _step(record["step"])
        if step is None:
            report.skip(path, line_no, why)
            continue
        data = record.get("data") if isinstance(record.get("data"), Mapping) else record
        for key, value in data.items():
            if key != "step":
                _add(series, report, str(key), step, value)


def _read_console(path: Path, lines: Iterable[tuple[int, str]], series: Series, report: SkipReport) -> None:
    for line_no, line in lines:
        match = _CONSOLE_STEP.search(line)
        if not match:
            continue  # everything but the metric lines is noise here
        step, why = _step(match.group(1))
        if step is None:
            report.skip(path, line_no, why)
            continue
        for item in match.group(2).split(" - "):
            key, _, value = item.rpartition(":")
            if key:
                value = value.strip()
                wrapped = _WRAPPED.match(value)
                _add(series, report, key.strip(), step, wrapped.group(1) if wrapped else value)


def _csv_rows(path: Path, lines: Iterable[tuple[int, str]], report: SkipReport) -> Iterator[tuple[int, list[str]]]:
    """Rows parsed line by line, so one bad row (a NUL byte, a field over csv's size limit) costs that row
    only. Metric exports hold no multi-line fields."""
    for line_no, line in lines:
        try:
            row = next(csv.reader([line]))
        except (csv.Error, StopIteration) as err:
            report.skip(path, line_no, f"not a CSV row ({err})")
            continue
        yield line_no, row


def _read_csv(path: Path, lines: Iterable[tuple[int, str]], series: Series, report: SkipReport) -> None:
    rows = _csv_rows(path, lines, report)
    header_line = next(rows, None)
    if header_line is None:
        return
    columns = header_line[1]
    if {"Step", "Value"} <= set(columns) and "Wall time" in columns:  # tensorboard: one scalar
        match = _TB_NAME.search(path.name)
        metric = _tensorboard_tag(match.group(1) if match else path.stem)
        step_at, value_at = columns.index("Step"), columns.index("Value")
        for line_no, row in rows:
            step = _row_step(path, line_no, row, columns, step_at, report)
            if step is not None:
                _add(series, report, metric, step, row[value_at])
        return
    step_column = next((c for c in STEP_COLUMNS if c in columns), None)
    if step_column is None:
        raise LogFormatError(f"{path}: no step column (one of {STEP_COLUMNS}) and not a tensorboard scalar CSV")
    _refuse_several_runs(path, columns)
    step_at = columns.index(step_column)
    metrics = [
        (at, column.split(" - ", 1)[1] if " - " in column else column)
        for at, column in enumerate(columns)
        if at != step_at and not column.endswith(("__MIN", "__MAX"))
    ]
    for line_no, row in rows:
        step = _row_step(path, line_no, row, columns, step_at, report)
        if step is not None:
            for at, metric in metrics:
                _add(series, report, metric, step, row[at])


def _row_step(path: Path, line_no: int, row: list[str], columns: list[str], step_at: int, report: SkipReport) -> int | None:
    """The row's step; None (the row skipped and counted) for a row of the wrong width or a bad step."""
    if len(row) != len(columns):
        report.skip(path, line_no, f"{len(row)} fields, the header has {len(columns)}")
        return None
    step, why = _step(row[step_at])
    if step is None:
        report.skip(path, line_no, why)
    return step


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
        raise LogFormatError(
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


def read_training_log(path: str | os.PathLike, report: SkipReport | None = None) -> Series:
    """``{metric: {step: value}}`` from one file of a format listed in the module docstring; what was left
    out is added to ``report``."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise LogFormatError(f"{path}: is a folder, not a log file")
    if not path.is_file():
        raise MissingInput(f"training log {path} does not exist")
    report = report if report is not None else SkipReport()
    before = report.lines
    series: Series = {}
    lines = _lines(path, report)
    if path.suffix.lower() == ".csv":
        _read_csv(path, lines, series, report)
    else:
        first = next(lines, None)
        rest = [first] if first is not None else []
        # JSONL by name, or by content when the first line is an object (veRL's file logger writes *.jsonl).
        as_jsonl = path.suffix.lower() in (".jsonl", ".json") or (first is not None and first[1].lstrip().startswith("{"))
        reader = _read_jsonl if as_jsonl else _read_console
        reader(path, itertools.chain(rest, lines), series, report)
    if not series:
        skipped = report.lines - before
        why = f"; {skipped} malformed line(s) skipped, first: {report.examples[0]}" if skipped and report.examples else ""
        raise LogFormatError(
            f"{path}: no per-step metrics found (expected veRL's JSONL, console log or a CSV export){why}"
        )
    return series


def read_training_logs(paths: Iterable[str | os.PathLike], report: SkipReport | None = None) -> Series:
    """Merge several files of one run (e.g. one tensorboard CSV per metric)."""
    merged: Series = {}
    for path in paths:
        for metric, values in read_training_log(path, report).items():
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
