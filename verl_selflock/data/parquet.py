"""The rows of a veRL dataset and writing them as parquet files (shared by the task builders)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from verl_selflock.contracts.names import AGENT_NAME
from verl_selflock.errors import InvalidInput

__all__ = ["dataset_row", "split_rows", "check_out_dir", "check_count", "write_splits"]


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


def check_count(value: int, option: str, minimum: int = 1) -> int:
    """``value`` if it is at least ``minimum``; otherwise an error naming the option (``--train``)."""
    try:
        whole = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError, OverflowError):  # NaN, inf, not a number at all
        whole = False
    if not whole or value < minimum:
        raise InvalidInput(f"{option} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


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


def check_out_dir(out_dir: str | os.PathLike, splits: Iterable[str] = ("train", "test")) -> Path:
    """Refuse an output folder that cannot take ``<split>.parquet`` files, before anything is built or
    written: a path that is a file, or a ``<split>.parquet`` that is a folder (named with ``--out``)."""
    folder = Path(out_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InvalidInput(f"--out {folder}: is a file, not a folder")
    for parent in folder.parents:  # a file in the middle of the path: makedirs would fail later
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInput(f"--out {folder}: {parent} is a file, not a folder")
            break
    for split in splits:
        target = folder / f"{split}.parquet"
        if target.is_dir():
            raise InvalidInput(f"--out {folder}: {target} is a folder; remove it or choose another --out")
    return folder


def write_splits(rows: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``<out_dir>/<split>.parquet`` per split (folder created); returns ``{split: path}``.

    Atomic per file and all-or-nothing across splits: every split is first written to a temporary file in
    the same folder, and only when all are written are they renamed into place (``os.replace``), so a
    failure (disk full, no permission, Ctrl-C) leaves neither a partial file nor a new file of one split
    beside an old one of the other. A folder this call created is removed again on failure."""
    import pandas as pd

    folder = check_out_dir(out_dir, rows)
    created = not folder.exists()
    temps: dict[str, str] = {}
    paths = {split: str(folder / f"{split}.parquet") for split in rows}
    done = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for split, split_rows in rows.items():
            # A fresh name, not mkstemp: mkstemp's file is private (0600), the parquet should get the umask's mode.
            temps[split] = str(folder / f".{split}.parquet.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            pd.DataFrame(list(split_rows)).to_parquet(temps[split], index=False)
        for split, temp in temps.items():
            os.replace(temp, paths[split])
        done = True
    except OSError as err:  # the user's disk or permissions, not our bug
        raise InvalidInput(f"--out {folder}: cannot write there ({err.strerror or err})") from err
    finally:
        if not done:
            for temp in temps.values():
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
    return paths
