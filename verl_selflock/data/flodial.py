"""Build FloDial troubleshooting episodes (Easy / Hard) from the FloDial flowcharts as veRL parquet.

``verl-selflock data flodial --input <FloDial>/knowledge-sources --out data/flodial_hard --difficulty hard``

Input: the 12 flowcharts of FloDial (github dair-iitd/FloDial, ``knowledge-sources/*.json``), read
and checked by :mod:`verl_selflock.data.flodial_charts` (the project never ships them: point
``--input`` at your copy, or at the folder that holds ``knowledge-sources``).

An episode:

* **true fault** = a terminal node; its **reference table** = the non-terminal nodes on its root
  path, in order, each with its ``utterance`` (the question) and the branch toward the fault
  ("yes"/"no"): what the simulated user can answer;
* **candidates** = the true fault + ``n_candidates - 1`` distractor terminals of the same chart
  (default 5 in all; a chart with fewer terminals of distinct text gives all of them), shown by
  their ``utterance`` (the resolution text), in a seeded random order. Terminals whose resolution
  text repeats another's (5 charts reuse a fix on two branches) are never in the same candidate set;
* **separating questions** ``k`` = the number of distinct table rows needed to rule out every
  distractor. In a tree, distractor ``c`` leaves the true fault's path at exactly one node (where
  their root paths split); the answer at that node rules ``c`` out and nothing earlier does. So
  ``k`` = the number of distinct split nodes, 1 <= k <= min(K - 1, table size).

Difficulty (our definition; the paper's rule is not published): **Easy** = ``k <= 2``, **Hard** =
``k >= 3``. Hard episodes need the agent to find at least three of the flowchart's questions in its
five Action rounds (with K = 5, k is at most 4); Easy ones can be settled with one or two. Per
(chart, true fault), the distractor set is drawn uniformly from all sets of that difficulty; the true
fault is drawn uniformly from the terminals that admit such a set (a fault at depth 1-2 can only be
Easy). Hard needs ``n_candidates >= 4``.

Splits (``--split-scheme``):

* ``s-flo`` (default, seen flowcharts): train and test episodes come from all charts; no test
  episode has the same (true fault, candidate set) as a training one.
* ``u-flo`` (unseen flowcharts): test episodes come only from ``--test-charts`` (default
  ``car_steering`` and ``laptop_battery``, the charts of the official U-Flo test split), training
  episodes only from the others.

The official split files (``s-flo.json``, ``u-flo.json``, ``*-test.json``) list *dialog* ids only
(``trn``/``val``/``tst``: S-Flo 1470/374/484, U-Flo 1470/374/498) and the dialogs themselves are not
part of the knowledge sources, so chart membership cannot be read from them: the U-Flo test charts
above come from the FloDial paper.

Defaults: 1000 training and 300 test episodes (the paper's FloDial success rates are multiples of
1/300), ``max_turns`` 10, BT critique ``v1``. Row layout as in :mod:`verl_selflock.data.pe`, with the
environment spec of :class:`verl_selflock.envs.flodial.env.FloDialEnv` in ``extra_info["env"]``.

``--demos N`` (:func:`build_flodial_demos`) also writes ``demos.parquet``: N train episodes (never a test
episode) played by the expert (:mod:`verl_selflock.envs.flodial.expert`), as veRL SFT rows
(:mod:`verl_selflock.data.flodial_demos`, :mod:`verl_selflock.data.demos`).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from verl_selflock.data.demos import DEMOS_SPLIT, check_demo_request, write_demos
from verl_selflock.data.flodial_charts import (  # load_flowchart: importable from here as before the split
    Flowchart,
    load_flowchart,
    load_flowcharts,
    node_order,
    separating_questions,
    split_node,
)
from verl_selflock.data.flodial_demos import flodial_demo_rows, select_demo_rows
from verl_selflock.data.parquet import check_count, check_out_dir, dataset_row, split_rows, write_splits
from verl_selflock.envs.flodial.env import BT_VARIANTS, DEFAULT_MAX_TURNS
from verl_selflock.envs.flodial.prompts import flodial_messages
from verl_selflock.errors import InvalidInput

__all__ = [
    "DIFFICULTIES",
    "SPLIT_SCHEMES",
    "UFLO_TEST_CHARTS",
    "load_flowchart",
    "difficulty_of",
    "FloDialDataConfig",
    "make_flodial_spec",
    "build_flodial_rows",
    "build_flodial_dataset",
    "build_flodial_demos",
    "flodial_messages",
    "add_arguments",
    "run",
]

DIFFICULTIES = ("easy", "hard")
EASY_MAX_SEPARATING = 2  # Easy: k <= 2 separating questions; Hard: k >= 3
SPLIT_SCHEMES = ("s-flo", "u-flo")
UFLO_TEST_CHARTS = ("car_steering", "laptop_battery")
DEFAULT_N_CANDIDATES = 5
_SPLITS = {"train": 0, "test": 1}
MAX_CANDIDATE_SETS = 100_000  # per (chart, fault); the official charts need at most C(18, 9) = 48,620
_MAX_REDRAWS = 1000  # attempts to find an episode not drawn before (train, test)


def difficulty_of(separating: int) -> str:
    """"easy" for at most ``EASY_MAX_SEPARATING`` separating questions, else "hard"."""
    return "easy" if separating <= EASY_MAX_SEPARATING else "hard"


@functools.lru_cache(maxsize=4096)
def _distractor_sets(chart: Flowchart, fault: str, n_distractors: int, difficulty: str) -> tuple[tuple[str, ...], ...]:
    """All distractor sets (sorted ids) of ``difficulty`` for ``fault``, with pairwise distinct texts."""
    texts = chart.faults
    pool = sorted((t for t in chart.faults if t != fault and texts[t] != texts[fault]), key=node_order)
    size = min(n_distractors, len({texts[t] for t in pool}))
    if math.comb(len(pool), size) > MAX_CANDIDATE_SETS:  # every combination is looked at
        raise InvalidInput(
            f"flowchart {chart.name!r}: {math.comb(len(pool), size)} candidate sets for fault {fault!r} with "
            f"{n_distractors + 1} candidates (at most {MAX_CANDIDATE_SETS}); use a smaller --n-candidates"
        )
    split = {c: split_node(chart.paths[fault], chart.paths[c]) for c in pool}
    sets = []
    for combo in itertools.combinations(pool, size):
        if len({texts[c] for c in combo}) != size:
            continue
        if difficulty_of(len({split[c] for c in combo})) == difficulty:
            sets.append(combo)
    return tuple(sets)


@dataclass(frozen=True)
class FloDialDataConfig:
    """What one FloDial dataset is made of."""

    difficulty: str = "easy"
    n_candidates: int = DEFAULT_N_CANDIDATES
    split_scheme: str = "s-flo"
    test_charts: tuple[str, ...] = UFLO_TEST_CHARTS
    """Charts of the test split under ``u-flo``."""
    max_turns: int = DEFAULT_MAX_TURNS
    bt_variant: str = "v1"

    def __post_init__(self) -> None:
        # InvalidInput is a ValueError: the messages name the CLI option too, as the CLI shows them as they are.
        if self.difficulty not in DIFFICULTIES:
            raise InvalidInput(f"difficulty (--difficulty) must be one of {DIFFICULTIES}, got {self.difficulty!r}")
        if self.n_candidates < 2:
            raise InvalidInput(f"n_candidates (--n-candidates) must be >= 2, got {self.n_candidates}")
        if self.difficulty == "hard" and self.n_candidates <= EASY_MAX_SEPARATING + 1:
            raise InvalidInput(
                f"hard episodes need >= {EASY_MAX_SEPARATING + 2} candidates (--n-candidates), got {self.n_candidates}"
            )
        if self.split_scheme not in SPLIT_SCHEMES:
            raise InvalidInput(f"split_scheme (--split-scheme) must be one of {SPLIT_SCHEMES}, got {self.split_scheme!r}")
        if self.split_scheme == "u-flo" and not self.test_charts:
            raise InvalidInput("u-flo needs at least one test chart (--test-charts)")
        if self.max_turns < 2 or self.max_turns % 2:
            raise InvalidInput(f"max_turns (--max-turns) must be even and >= 2, got {self.max_turns}")
        if self.bt_variant not in BT_VARIANTS:
            raise InvalidInput(f"bt_variant (--bt-variant) must be one of {BT_VARIANTS}, got {self.bt_variant!r}")

    @property
    def data_source(self) -> str:
        return f"flodial_{self.difficulty}"

    def charts_of(self, split: str, charts: Mapping[str, Flowchart]) -> list[str]:
        """Chart names a split draws from."""
        if self.split_scheme == "s-flo":
            return sorted(charts)
        missing = sorted(set(self.test_charts) - set(charts))
        if missing:
            raise InvalidInput(f"--test-charts {missing} are not among the flowcharts {sorted(charts)}")
        held_out = set(self.test_charts)
        return sorted(name for name in charts if (name in held_out) == (split == "test"))


def _eligible_faults(
    config: FloDialDataConfig, charts: Mapping[str, Flowchart], names: Sequence[str]
) -> list[tuple[str, str]]:
    """(chart, fault) pairs that admit a distractor set of the configured difficulty."""
    pairs = [
        (name, fault)
        for name in names
        for fault in sorted(charts[name].faults, key=node_order)
        if _distractor_sets(charts[name], fault, config.n_candidates - 1, config.difficulty)
    ]
    if not pairs:
        raise InvalidInput(
            f"no {config.difficulty} episode with {config.n_candidates} candidates can be drawn from the charts "
            f"{list(names)} (--difficulty, --n-candidates)"
        )
    return pairs


def make_flodial_spec(
    config: FloDialDataConfig, chart: Flowchart, fault: str, distractors: Sequence[str], order: Sequence[int],
    *, split: str, seed: int, instance_id: str,
) -> dict[str, Any]:
    """The environment spec (``extra_info["env"]``) of one episode; ``order`` permutes [fault, *distractors]."""
    nodes = [[fault, *distractors][i] for i in order]
    return {
        "task": "flodial",
        "id": instance_id,
        "split": split,
        "max_turns": config.max_turns,
        "chart": chart.name,
        "problem_description": chart.problem_description,
        "candidates": [chart.faults[n] for n in nodes],
        "candidate_nodes": nodes,
        "answer_index": nodes.index(fault),
        "table": chart.table(fault),
        "candidate_paths": [[f"{node}:{branch}" for node, branch in chart.paths[n]] for n in nodes],
        "difficulty": config.difficulty,
        "separating_questions": separating_questions(chart, fault, distractors),
        "bt_variant": config.bt_variant,
        "seed": seed,
    }


def build_flodial_rows(
    charts: Mapping[str, Flowchart], config: FloDialDataConfig, n_train: int, n_test: int, seed: int,
    progress: bool = True,
) -> dict[str, list[dict]]:
    """Rows of both splits. Episode ``k`` of a split depends only on (seed, config, split, k) and the
    episodes before it; an episode equal to an earlier one (same true fault and candidate set) is redrawn."""
    seen: set[tuple[str, str, tuple[str, ...]]] = set()
    counts = {"train": n_train, "test": n_test}
    # split -> its true faults; found before the first row, so a bad chart choice fails before the progress bar
    eligible = {split: _eligible_faults(config, charts, config.charts_of(split, charts)) for split, n in counts.items() if n}
    difficulty_code = DIFFICULTIES.index(config.difficulty)

    def make_row(split: str, index: int) -> dict[str, Any]:
        pairs = eligible[split]
        for attempt in range(_MAX_REDRAWS):
            entropy = [seed, difficulty_code, config.n_candidates, _SPLITS[split], index, attempt]
            rng = np.random.default_rng(entropy)
            name, fault = pairs[int(rng.integers(len(pairs)))]
            sets = _distractor_sets(charts[name], fault, config.n_candidates - 1, config.difficulty)
            distractors = sets[int(rng.integers(len(sets)))]
            key = (name, fault, distractors)
            if key not in seen:
                break
        else:
            raise InvalidInput(
                f"could not draw {counts[split]} distinct {config.difficulty} {split} episodes from {len(pairs)} true "
                f"faults (after {_MAX_REDRAWS} redraws for episode {index}): ask for fewer"
            )
        seen.add(key)
        order = rng.permutation(len(distractors) + 1).tolist()
        spec = make_flodial_spec(
            config, charts[name], fault, distractors, order,
            split=split, seed=seed, instance_id=f"{config.data_source}-{split}-{index:05d}",
        )
        ground_truth = json.dumps(spec["answer_index"])
        return dataset_row(
            config.data_source, flodial_messages(spec), "troubleshooting", ground_truth, index=index, split=split, spec=spec
        )

    return split_rows(counts, make_row, f"building {config.data_source}", progress)


def build_flodial_dataset(
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: FloDialDataConfig,
    n_train: int,
    n_test: int,
    seed: int,
    progress: bool = True,
    demos: int = 0,
) -> dict[str, str]:
    """Read the flowcharts, write ``train.parquet`` and ``test.parquet`` under ``out_dir``; return their paths.

    ``demos`` > 0 also writes ``demos.parquet`` (:func:`build_flodial_demos`, expert seed = ``seed``); all files
    are written together or none."""
    check_count(n_train, "n_train (--train)", minimum=0)  # one empty split is allowed here (tests, eval sets)
    check_count(n_test, "n_test (--test)", minimum=0)
    if n_train + n_test == 0:
        raise InvalidInput("n_train and n_test (--train, --test) are both 0: nothing to build")
    check_count(seed, "seed (--seed)", minimum=0)  # numpy's SeedSequence refuses negative entropy
    check_count(demos, "demos (--demos)", minimum=0)
    check_out_dir(out_dir, ("train", "test", DEMOS_SPLIT) if demos else ("train", "test"))  # before reading charts
    charts = load_flowcharts(input_dir)
    rows = build_flodial_rows(charts, config, n_train, n_test, seed, progress=progress)
    if demos:
        rows[DEMOS_SPLIT] = _demo_rows(charts, config, demos, seed, rows["test"], seed, None, progress)
    return write_splits(rows, out_dir)


def _demo_rows(
    charts: Mapping[str, Flowchart], config: FloDialDataConfig, n: int, seed: int, test_rows: list[dict],
    expert_seed: int, tokenizer: Any, progress: bool,
) -> list[dict[str, Any]]:
    """Expert rows on train episodes ``0, 1, ...`` of ``seed``, skipping any equal to a test episode."""
    kept = select_demo_rows(
        lambda count: build_flodial_rows(charts, config, count, 0, seed, progress=False)["train"], n, test_rows
    )
    return flodial_demo_rows(kept, config.data_source, seed, expert_seed, tokenizer, progress)


def build_flodial_demos(
    config: FloDialDataConfig,
    n: int,
    seed: int,
    out_dir: str | os.PathLike,
    *,
    input_dir: str | os.PathLike,
    n_train: int = 1000,
    n_test: int = 300,
    expert_seed: int | None = None,
    tokenizer: Any = None,
    progress: bool = False,
) -> Path:
    """Write ``<out_dir>/demos.parquet``: ``n`` episodes of the FloDial expert as veRL multi-turn SFT rows.

    The episodes are those of the train split that ``build_flodial_dataset(input_dir, ..., config, n_train,
    n_test, seed)`` writes (index 0, 1, ...; beyond ``n_train``, more draws of the same rule), never one of
    its test split (same chart, true fault and candidate set, in any order).

    Args:
        config: the dataset's configuration.
        n: episodes.
        seed: the dataset seed.
        out_dir: output folder (created).
        input_dir: the FloDial knowledge-sources folder (or the folder that contains it).
        n_train, n_test: the dataset's split sizes (the test split the demos must avoid).
        expert_seed: seeds the expert's final guess when the budget runs out (default: ``seed``).
        tokenizer: the policy's tokenizer, to cap observations as the agent loop does (optional).

    Returns:
        The path of ``demos.parquet``.
    """
    expert_seed = check_demo_request(n, seed, n_train, n_test, expert_seed, out_dir)
    charts = load_flowcharts(input_dir)
    test_rows = build_flodial_rows(charts, config, n_train, n_test, seed, progress=False)["test"]
    return write_demos(_demo_rows(charts, config, n, seed, test_rows, expert_seed, tokenizer, progress), out_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``verl-selflock data flodial``."""
    parser.add_argument(
        "--input", required=True, help="FloDial knowledge-sources folder (or the folder that contains it)"
    )
    parser.add_argument("--out", required=True, help="output folder for train.parquet and test.parquet")
    parser.add_argument("--difficulty", choices=DIFFICULTIES, default="easy", help="easy: <= 2 separating questions")
    parser.add_argument("--n-candidates", type=int, default=DEFAULT_N_CANDIDATES, help="candidate faults per episode")
    parser.add_argument("--split-scheme", choices=SPLIT_SCHEMES, default="s-flo", help="seen or unseen flowcharts")
    parser.add_argument(
        "--test-charts", default=",".join(UFLO_TEST_CHARTS), help="comma-separated chart names held out by u-flo"
    )
    parser.add_argument("--train", type=int, default=1000, help="training rows")
    parser.add_argument("--test", type=int, default=300, help="test rows")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (same seed, same files)")
    parser.add_argument("--max-turns", type=int, default=DEFAULT_MAX_TURNS, help="even turn budget")
    parser.add_argument(
        "--bt-variant", choices=BT_VARIANTS, default="v1", help="BT critique after uninformative feedback"
    )
    parser.add_argument(
        "--demos", type=int, default=0,
        help="also write demos.parquet next to train/test: this many train episodes (never a test episode) played "
        "by the expert (envs/flodial/expert.py: it asks where the remaining candidates' paths part), as veRL "
        "multi-turn SFT rows for a supervised warm start (default 0: none)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Build the dataset described by ``args``; print the paths."""
    check_count(args.train, "--train")  # from the command line both splits are needed (training + validation)
    check_count(args.test, "--test")
    config = FloDialDataConfig(
        difficulty=args.difficulty,
        n_candidates=args.n_candidates,
        split_scheme=args.split_scheme,
        test_charts=tuple(name.strip() for name in args.test_charts.split(",") if name.strip()),
        max_turns=args.max_turns,
        bt_variant=args.bt_variant,
    )
    paths = build_flodial_dataset(
        args.input, args.out, config, args.train, args.test, args.seed, progress=not args.no_progress, demos=args.demos
    )
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0
