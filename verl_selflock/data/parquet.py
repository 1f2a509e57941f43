"""Writing dataset splits as veRL parquet files (shared by the task builders)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["write_splits"]


def write_splits(rows: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``<out_dir>/<split>.parquet`` per split (folder created); returns ``{split: path}``."""
    import pandas as pd

    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, str] = {}
    for split, split_rows in rows.items():
        path = os.path.join(os.fspath(out_dir), f"{split}.parquet")
        pd.DataFrame(list(split_rows)).to_parquet(path, index=False)
        paths[split] = path
    return paths
