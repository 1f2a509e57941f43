"""Build-once folders under our cache, safe across processes (pytest workers, Ray actors).

The cache is local to a node: a path under it that one process resolved (the TaskRunner resolving
``${selflock.pe_data:...}``) exists on that node only. So nothing that Ray workers on other nodes must
open is written here at run time: the agent loop's knobs travel inside the config instead (issue 14).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

_CACHE_ENV = "VERL_SELFLOCK_CACHE"
COMPLETE_MARKER = ".verl_selflock_complete"


def cache_dir() -> Path:
    """Root of our caches: ``$VERL_SELFLOCK_CACHE`` or ``~/.cache/verl_selflock``."""
    return Path(os.environ.get(_CACHE_ENV, Path.home() / ".cache" / "verl_selflock"))


def build_once(folder: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Run ``build(folder)`` unless a previous run completed it; return ``folder``.

    A marker file written after ``build`` returns says the folder is complete, so a build that
    crashed half-way is redone; a file lock beside the folder makes concurrent callers wait for the
    one that builds instead of building twice.
    """
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if marker.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not marker.exists():
            build(folder)
            folder.mkdir(parents=True, exist_ok=True)
            marker.write_text("ok\n")
    return folder
