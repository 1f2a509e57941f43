"""Append-only JSONL of finished episodes that survives being killed at any moment.

Every record is written as one line, flushed and fsync'ed before the next episode is recorded, so
an interrupted run loses at most the episodes that were still running. On resume the file is read
back; a partial last line (the process died while writing it) is cut off, and the ids already
present are skipped by the runner.
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

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete record; a line that does not parse is skipped with a warning."""
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s:%d is not a JSON record; skipped", self.path, number)
                    continue
                if isinstance(record, dict):
                    yield record

    def ids(self) -> set[str]:
        return {str(record.get("id")) for record in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (one line, flushed and fsync'ed)."""
        line = json.dumps(to_jsonable(record), ensure_ascii=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
