"""The rows of a veRL dataset and writing them as parquet files (shared by the task builders)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from verl_selflock.contracts.names import AGENT_NAME

__all__ = ["dataset_row", "split_rows", "write_splits"]


def dataset_row(
    data_source: str,
    prompt: list[dict[str, str]],
    ability: str,
    ground_truth: Any,
    *,
    index: int,
    split: str,
    spec: Mapping[str, Any],
) -> dict[str, Any]:
    """One row as veRL's ``RLHFDataset`` reads it, played by our agent loop (``agent_name``).

    ``reward_model`` is bookkeeping only: veRL never shows it to the policy, and the reward comes from
    the environment, which reads ``extra_info["env"]`` (the spec)."""
    return {
        "data_source": data_source,
        "prompt": prompt,
        "ability": ability,
        "agent_name": AGENT_NAME,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"index": index, "split": split, "env": spec},
    }


def split_rows(
    counts: Mapping[str, int], make_row: Callable[[str, int], dict[str, Any]], desc: str, progress: bool = True
) -> dict[str, list[dict[str, Any]]]:
    """``{split: [make_row(split, 0), ..., make_row(split, counts[split] - 1)]}``, the splits in the order of
    ``counts`` (a builder that draws distinct instances relies on that order), under one progress bar."""
    from tqdm import tqdm

    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in counts}
    with tqdm(total=sum(counts.values()), desc=desc, disable=not progress, unit="row") as bar:
        for split, count in counts.items():
            for index in range(count):
                rows[split].append(make_row(split, index))
                bar.update(1)
    return rows


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
