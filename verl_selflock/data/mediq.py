"""Build MediQ datasets (train/validation parquet) from the official MediQ jsonl files.

``verl-selflock data mediq --input path/to/mediQ/data --out data/mediq --n-val 400 --seed 0``

Input: the jsonl files of github.com/stellalisy/mediQ (``data/all_dev_good.jsonl``, 1272 MedQA
cases; ``data/all_craft_md.jsonl``, 140 cases; CC BY 4.0), given as files or a folder (every
``*.jsonl`` in it), or fetched with ``--download`` when the network allows. Per row: ``context``
(list of sentences; the first is the initial presentation shown to the agent), ``question``,
``options`` (dict A-D), ``answer_idx`` (letter), and the atomic facts as ``facts`` or
``atomic_facts`` (MediQ's own code reads the latter; we accept either). Fields may be JSON values or
Python-literal strings (parsed with :func:`ast.literal_eval`). Fact strings lose their leading
numbering ("3. ") or bullet ("- "): the patient prompt numbers them itself.

Skipped, counted and reported (never silently): rows without facts (3 rows of ``all_dev_good``),
malformed rows (options not exactly A-D, answer letter not among them, unparsable fields), and rows
whose case id repeats an earlier one. A row without an ``id`` is named by its line number.

Split: cases are ordered by (file, id) and shuffled with the seed; the first ``n_val`` (or
``val_fraction`` of them) form the validation split, written as ``test.parquet`` with env spec
``split: "test"`` (evaluation mode in the agent loop: no counterfactual branches); the rest are
``train.parquet``. Same input and seed, same files.

Row layout (as :mod:`verl_selflock.data.pe`): ``data_source`` ``mediq``, ``prompt`` (system + first
user message; never the answer or the hidden facts), ``agent_name`` ``active_reasoning``,
``reward_model`` ``{"style": "rule", "ground_truth": <letter>}``, ``extra_info`` ``{index, split,
env}`` with the :class:`verl_selflock.envs.mediq.env.MediQEnv` spec.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from verl_selflock.data.parquet import check_count, check_out_dir, dataset_row, write_splits
from verl_selflock.envs.mediq.env import DEFAULT_MAX_TURNS
from verl_selflock.envs.mediq.prompts import OPTION_LETTERS, mediq_messages
from verl_selflock.errors import InvalidInput

__all__ = [
    "OFFICIAL_URLS",
    "MediQCase",
    "case_id_of",
    "parse_case",
    "read_cases",
    "resolve_inputs",
    "download_official",
    "build_mediq_rows",
    "build_mediq_dataset",
    "add_arguments",
    "run",
]

DATA_SOURCE = "mediq"
OFFICIAL_URLS = {
    "all_dev_good.jsonl": "https://raw.githubusercontent.com/stellalisy/mediQ/main/data/all_dev_good.jsonl",
    "all_craft_md.jsonl": "https://raw.githubusercontent.com/stellalisy/mediQ/main/data/all_craft_md.jsonl",
}
# "3. text", "3) text" or a bullet; "1.5 hours after ..." keeps its number (no space after the dot).
_FACT_PREFIX_RE = re.compile(r"^\s*(?:\d+[.)]\s+|[-*\u2022]\s*)")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")


class MediQDataError(InvalidInput):
    """An input file or row cannot be used, or a parameter is impossible (the message names the file and
    line, or the option). A :class:`~verl_selflock.errors.UserError` and a ValueError."""


@dataclass(frozen=True)
class MediQCase:
    """One usable case."""

    case_id: str
    """``<file stem>-<row id>`` (``<file stem>-line<n>`` for a row without an id): unique across files
    (part of the simulator cache key)."""
    initial: str
    question: str
    options: tuple[str, str, str, str]
    answer_index: int
    facts: tuple[str, ...]
    source: str


def _literal(value: Any) -> Any:
    """A field that may be a Python-literal string (``"['a', 'b']"``) or already a JSON value."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[{(":
            return ast.literal_eval(text)
    return value


def _clean_fact(fact: Any) -> str:
    return _FACT_PREFIX_RE.sub("", str(fact)).strip()


def case_id_of(row: dict[str, Any], source: str, line_no: int) -> str:
    """``<source>-<row id>``; a row without an id (missing, null or blank) gets ``<source>-line<line_no>``
    instead: its line in the file is stable for the same input, and unlike ``<source>-None`` it does not
    make every id-less row a duplicate of the first one."""
    row_id = row.get("id")
    if row_id is None or not str(row_id).strip():
        return f"{source}-line{line_no}"
    return f"{source}-{row_id}"


def parse_case(row: dict[str, Any], source: str, line_no: int) -> tuple[MediQCase | None, str | None]:
    """``(case, None)`` for a usable row, ``(None, reason)`` for a skipped one (``no_facts`` or ``malformed``).
    ``line_no`` (1-based line in ``source``) names a row that has no ``id`` (see :func:`case_id_of`)."""
    try:
        facts_field = row.get("atomic_facts")
        if facts_field is None:
            facts_field = row.get("facts")
        facts = _literal(facts_field) if facts_field is not None else []
        if isinstance(facts, str):
            facts = [facts]
        facts = tuple(f for f in (_clean_fact(x) for x in (facts or [])) if f)
        if not facts:
            return None, "no_facts"
        options = _literal(row["options"])
        if not isinstance(options, dict) or sorted(options) != list(OPTION_LETTERS):
            return None, "malformed"
        letter = str(row["answer_idx"]).strip().upper()
        if letter not in OPTION_LETTERS:
            return None, "malformed"
        context = _literal(row.get("context") or [])
        if isinstance(context, str):
            context = _SENTENCE_END_RE.split(context.strip())
        context = [str(c).strip() for c in context if str(c).strip()]
        # MediQ's initial information is the first sentence of the case; fall back to the first fact.
        initial = context[0] if context else facts[0]
        question = str(row.get("question", "")).strip()
        if not question:
            return None, "malformed"
        case_id = case_id_of(row, source, line_no)
    except (KeyError, ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None, "malformed"
    return (
        MediQCase(
            case_id=case_id,
            initial=initial,
            question=question,
            options=tuple(str(options[k]).strip() for k in OPTION_LETTERS),  # type: ignore[arg-type]
            answer_index=OPTION_LETTERS.index(letter),
            facts=facts,
            source=source,
        ),
        None,
    )


def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named directly plus every ``*.jsonl`` in named folders, sorted, without duplicates."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise MediQDataError(f"--input {path}: no *.jsonl files in this folder")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise MediQDataError(f"--input {path}: no such file or folder")
    return sorted(dict.fromkeys(p.resolve() for p in paths))


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 file; a line that is not UTF-8 (a binary or
    mis-encoded file) is an error naming the file and line."""
    try:
        data = path.read_bytes()  # bytes: a decoding error is then one line's, with its number
    except OSError as err:
        raise MediQDataError(f"--input {path}: cannot read it ({err.strerror or err})") from err
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise MediQDataError(
                f"{path}:{line_no}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                "is this the MediQ jsonl file?"
            ) from err
        if line.strip():
            yield line_no, line


def read_cases(paths: Iterable[Path]) -> tuple[list[MediQCase], Counter[str]]:
    """Usable cases of all files (ordered by file, then id) and the counts of skipped rows by reason."""
    cases: list[MediQCase] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    for path in paths:
        for line_no, line in _jsonl_lines(path):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise MediQDataError(f"{path}:{line_no}: not a JSON line ({err.msg}, column {err.colno})") from err
            except RecursionError as err:  # nesting deeper than Python's parser goes
                raise MediQDataError(f"{path}:{line_no}: not a usable JSON line (nested too deeply)") from err
            if not isinstance(row, dict):
                raise MediQDataError(f"{path}:{line_no}: expected a JSON object")
            case, reason = parse_case(row, path.stem, line_no)
            if case is None:
                skipped[str(reason)] += 1
            elif case.case_id in seen:
                skipped["duplicate_id"] += 1
            else:
                seen.add(case.case_id)
                cases.append(case)
    return cases, skipped


def download_official(folder: str | os.PathLike, timeout_s: float = 60.0) -> list[Path]:
    """Fetch the official MediQ jsonl files into ``folder`` (kept when already there)."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, url in OFFICIAL_URLS.items():
        path = target / name
        if not path.exists():
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (fixed https URLs)
                    data = response.read()
            except (urllib.error.URLError, TimeoutError, OSError) as err:
                raise MediQDataError(
                    f"could not download {url} ({err}); without network access, download the files of "
                    "https://github.com/stellalisy/mediQ/tree/main/data elsewhere and pass them with --input"
                ) from err
            tmp = path.with_suffix(".part")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        paths.append(path)
    return paths


def make_mediq_spec(case: MediQCase, split: str, max_turns: int, counterfactual_bt: bool) -> dict[str, Any]:
    """The environment spec (``extra_info["env"]``)."""
    return {
        "task": "mediq",
        "id": case.case_id,
        "split": split,
        "max_turns": int(max_turns),
        "initial": case.initial,
        "question": case.question,
        "options": list(case.options),
        "answer_index": int(case.answer_index),
        "facts": list(case.facts),
        "counterfactual_bt": bool(counterfactual_bt),
        "source": case.source,
    }


def _n_val(total: int, n_val: int | None, val_fraction: float) -> int:
    """Validation cases; both splits must keep at least one case (an empty parquet fails late, in training)."""
    if n_val is not None:
        if isinstance(n_val, bool) or int(n_val) != n_val or not 1 <= n_val <= total - 1:
            raise MediQDataError(f"--n-val must be in 1..{total - 1} ({total} usable cases, both splits non-empty), got {n_val}")
        return int(n_val)
    if not 0.0 < val_fraction < 1.0:  # also refuses NaN
        raise MediQDataError(f"--val-fraction must be strictly between 0 and 1, got {val_fraction}")
    count = int(round(total * val_fraction))
    if not 1 <= count <= total - 1:
        raise MediQDataError(
            f"--val-fraction {val_fraction} of {total} usable cases leaves {count} validation and {total - count} "
            "training cases; both splits need at least one (use --n-val)"
        )
    return count


def build_mediq_rows(
    cases: Sequence[MediQCase],
    seed: int,
    n_val: int | None = None,
    val_fraction: float = 0.2,
    max_turns: int = DEFAULT_MAX_TURNS,
    counterfactual_bt: bool = True,
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Rows of both splits (``train`` and ``test`` = validation), split by a seeded shuffle."""
    from tqdm import tqdm

    if isinstance(max_turns, bool) or int(max_turns) != max_turns or max_turns < 2 or max_turns % 2:
        raise MediQDataError(f"max_turns (--max-turns) must be even and >= 2, got {max_turns}")
    check_count(seed, "seed (--seed)", minimum=0)
    order = np.random.default_rng(seed).permutation(len(cases))
    n_test = _n_val(len(cases), n_val, val_fraction)
    split_of = {int(i): ("test" if rank < n_test else "train") for rank, i in enumerate(order)}
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for position in tqdm(order, desc="building mediq", disable=not progress, unit="row"):
        case = cases[int(position)]
        split = split_of[int(position)]
        spec = make_mediq_spec(case, split, max_turns, counterfactual_bt)
        ground_truth = OPTION_LETTERS[case.answer_index]
        rows[split].append(
            dataset_row(
                DATA_SOURCE, mediq_messages(spec), "medical_diagnosis", ground_truth,
                index=len(rows[split]), split=split, spec=spec,
            )
        )
    return rows


def build_mediq_dataset(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_val: int | None = None,
    val_fraction: float = 0.2,
    max_turns: int = DEFAULT_MAX_TURNS,
    counterfactual_bt: bool = True,
    progress: bool = True,
) -> tuple[dict[str, str], Counter[str]]:
    """Write ``train.parquet`` and ``test.parquet`` under ``out_dir``; return their paths and the skip counts."""
    check_out_dir(out_dir)  # before reading anything: a bad --out is refused at once
    cases, skipped = read_cases(resolve_inputs(inputs))
    if not cases:
        raise MediQDataError(f"no usable MediQ case in {list(map(str, inputs))} (skipped: {dict(skipped)})")
    rows = build_mediq_rows(cases, seed, n_val, val_fraction, max_turns, counterfactual_bt, progress)
    return write_splits(rows, out_dir), skipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``verl-selflock data mediq``."""
    parser.add_argument(
        "--input", nargs="+", default=None, help="MediQ jsonl file(s) or folder(s) (every *.jsonl inside)"
    )
    parser.add_argument(
        "--download", action="store_true",
        help="fetch the official files from github.com/stellalisy/mediQ into OUT/raw when --input is not given",
    )
    parser.add_argument("--out", required=True, help="output folder for train.parquet and test.parquet")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--n-val", type=int, default=None, help="validation cases (test.parquet)")
    group.add_argument("--val-fraction", type=float, default=0.2, help="validation share when --n-val is not given")
    parser.add_argument("--seed", type=int, default=0, help="split seed (same input and seed, same files)")
    parser.add_argument("--max-turns", type=int, default=DEFAULT_MAX_TURNS, help="even turn budget (default 8)")
    parser.add_argument(
        "--no-counterfactual-bt", action="store_true",
        help="rows ask for no counterfactual BT branches (BT after new facts then judges whether Psi_hat rose)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Build the dataset described by ``args``; print the paths and what was skipped."""
    inputs = args.input
    check_out_dir(args.out)
    if not inputs:
        if not args.download:
            raise MediQDataError("give --input FILE_OR_FOLDER (the MediQ jsonl files), or --download")
        inputs = [str(p) for p in download_official(Path(args.out) / "raw")]
    paths, skipped = build_mediq_dataset(
        inputs,
        args.out,
        seed=args.seed,
        n_val=args.n_val,
        val_fraction=args.val_fraction,
        max_turns=args.max_turns,
        counterfactual_bt=not args.no_counterfactual_bt,
        progress=not args.no_progress,
    )
    for split, path in paths.items():
        print(f"{split}: {path}")
    print("skipped rows: " + (", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"))
    return 0
