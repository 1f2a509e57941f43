"""Append-only JSONL of finished episodes that survives being killed at any moment.

Every record is written as one line, flushed and fsync'ed before the next episode is recorded, so
an interrupted run loses at most the episodes that were still running. On resume the file is read
back; a partial last line (the process died while writing it) is cut off, and the ids already
present are skipped by the runner. Any other line that is not a JSON object with an ``id`` was not
written by us (a hand edit, another tool, a disk fault): a resume reads the file with ``strict=True``
and refuses it with a :class:`~verl_selflock.errors.UserError` naming the file and line, because
skipping it would silently rerun (or drop) an episode.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from verl_selflock.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["EpisodeStore", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Plain JSON types for records holding numpy values, tuples and non-finite floats (-> None)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class EpisodeStore:
    """``path``: a JSONL file of records that each carry an ``id``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def repair(self) -> int:
        """Cut a partial last line left by a killed writer; returns the bytes removed."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        with open(self.path, "r+b") as handle:
            handle.truncate(keep)
        logger.warning("%s: removed a partial last record (%d bytes) left by an interrupted run", self.path, len(data) - keep)
        return len(data) - keep

    def records(self, strict: bool = False) -> Iterator[dict[str, Any]]:
        """Every complete record. A line that is not a JSON object with an ``id`` is skipped with a
        warning, or with ``strict`` raises :class:`UserError` naming the file and line."""
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    problem = "is not JSON"
                else:
                    problem = _record_problem(record)
                if problem is None:
                    yield record
                elif strict:
                    raise UserError(
                        f"{self.path}:{number}: {problem}; fix or delete that line (its episode is then run "
                        "again), or use another --out"
                    )
                else:
                    logger.warning("%s:%d %s; skipped", self.path, number, problem)

    def ids(self, strict: bool = False) -> set[str]:
        """The ids of :meth:`records`; with ``strict``, a second record of an id is logged (the summary
        counts one)."""
        seen: set[str] = set()
        for record in self.records(strict):
            key = str(record["id"])
            if strict and key in seen:
                logger.warning("%s: episode %r is recorded more than once; the summary counts its last record", self.path, key)
            seen.add(key)
        return seen

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (one line, flushed and fsync'ed)."""
        line = json.dumps(to_jsonable(record), ensure_ascii=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def _record_problem(record: Any) -> str | None:
    """Why a parsed line is not one of our records (None if it is)."""
    if not isinstance(record, dict):
        return f"is JSON but not an object (a {type(record).__name__})"
    if "id" not in record:
        return "is a record without an 'id'"
    if not isinstance(record["id"], str | int) or isinstance(record["id"], bool):
        return f"has an 'id' that is not a string ({str(record['id'])[:60]!r})"
    return None
