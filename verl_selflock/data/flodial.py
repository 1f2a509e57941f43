"""Build FloDial troubleshooting episodes (Easy / Hard) from the FloDial flowcharts as veRL parquet.

``verl-selflock data flodial --input <FloDial>/knowledge-sources --out data/flodial_hard --difficulty hard``

Input: the 12 flowcharts of FloDial (github dair-iitd/FloDial, ``knowledge-sources/*.json``; no
licence is published, so the project never ships them: point ``--input`` at your copy, or at the
folder that holds ``knowledge-sources``). Each file has ``name``, ``problem_description``,
``nodes`` (id -> ``label``, ``utterance``, ``terminal``) and ``edges`` (id -> ``{"yes": id, "no": id}``,
some nodes have a single branch); the root is node ``"1"``. Every file must be a tree reachable from
the root (checked; the 12 official charts are).

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
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from verl_selflock.contracts.names import AGENT_NAME
from verl_selflock.envs.flodial.env import (
    BT_VARIANTS,
    DEFAULT_MAX_TURNS,
    action_instruction,
)

__all__ = [
    "DIFFICULTIES",
    "SPLIT_SCHEMES",
    "UFLO_TEST_CHARTS",
    "Flowchart",
    "load_flowchart",
    "load_flowcharts",
    "knowledge_sources_dir",
    "split_node",
    "separating_questions",
    "difficulty_of",
    "FloDialDataConfig",
    "make_flodial_spec",
    "build_flodial_rows",
    "build_flodial_dataset",
    "flodial_messages",
    "add_arguments",
    "run",
]

ROOT = "1"
DIFFICULTIES = ("easy", "hard")
EASY_MAX_SEPARATING = 2  # Easy: k <= 2 separating questions; Hard: k >= 3
SPLIT_SCHEMES = ("s-flo", "u-flo")
UFLO_TEST_CHARTS = ("car_steering", "laptop_battery")
DEFAULT_N_CANDIDATES = 5
_SPLITS = {"train": 0, "test": 1}
_MAX_REDRAWS = 1000  # attempts to find an episode not drawn before (train, test)

Path_ = tuple[tuple[str, str], ...]
"""A root path: ((node id, branch taken), ...) from the root down to (not including) a terminal."""


@dataclass(frozen=True, eq=False)  # hashed by identity: the distractor-set cache keys on it
class Flowchart:
    """One troubleshooting flowchart, reduced to what episodes need."""

    name: str
    problem_description: str
    questions: dict[str, str]
    """Non-terminal node id -> its question (``utterance``)."""
    faults: dict[str, str]
    """Terminal node id -> its resolution text (``utterance``)."""
    paths: dict[str, Path_]
    """Terminal node id -> its root path."""

    def table(self, fault: str) -> list[dict[str, str]]:
        """The reference table of ``fault``: its root path's questions with the answers toward it."""
        return [
            {"node": node, "question": self.questions[node], "answer": branch} for node, branch in self.paths[fault]
        ]


def load_flowchart(data: Mapping[str, Any], name: str | None = None) -> Flowchart:
    """Validate one FloDial knowledge-source dict and extract the root path of every terminal.

    Raises:
        ValueError: naming the chart and the problem (no root, dangling edge, cycle, a terminal with
            edges, a question without edges, an unreachable node, an empty utterance).
    """
    name = str(data.get("name") or name or "?")

    def fail(why: str) -> ValueError:
        return ValueError(f"flowchart {name!r}: {why}")

    nodes, edges = data.get("nodes"), data.get("edges")
    if not isinstance(nodes, Mapping) or not isinstance(edges, Mapping):
        raise fail("needs 'nodes' and 'edges' objects")
    if ROOT not in nodes:
        raise fail(f"has no root node {ROOT!r}")
    for node_id, node in nodes.items():
        if not isinstance(node, Mapping) or not str(node.get("utterance", "")).strip():
            raise fail(f"node {node_id!r} has no utterance")
        terminal = bool(node.get("terminal"))
        out = edges.get(node_id) or {}
        if terminal and out:
            raise fail(f"terminal node {node_id!r} has outgoing edges")
        if not terminal and not out:
            raise fail(f"question node {node_id!r} has no outgoing edge")
        if set(out) - {"yes", "no"}:
            raise fail(f"node {node_id!r} has branches {sorted(out)}; only 'yes'/'no' are allowed")
        for target in out.values():
            if str(target) not in nodes:
                raise fail(f"edge {node_id!r} -> {target!r} points to no node")
    paths: dict[str, Path_] = {}
    visited: set[str] = set()
    stack: list[tuple[str, Path_]] = [(ROOT, ())]
    while stack:
        node_id, path = stack.pop()
        if node_id in visited:
            raise fail(f"node {node_id!r} is reached twice (the chart must be a tree)")
        visited.add(node_id)
        if nodes[node_id].get("terminal"):
            paths[node_id] = path
            continue
        for branch, target in sorted((edges.get(node_id) or {}).items()):
            stack.append((str(target), (*path, (node_id, branch))))
    unreachable = sorted(set(nodes) - visited)
    if unreachable:
        raise fail(f"nodes {unreachable[:5]} are not reachable from the root")
    if len(paths) < 2:
        raise fail("needs at least two terminal nodes")
    return Flowchart(
        name=name,
        problem_description=str(data.get("problem_description", "")).strip(),
        questions={k: str(v["utterance"]).strip() for k, v in nodes.items() if not v.get("terminal")},
        faults={k: str(v["utterance"]).strip() for k, v in nodes.items() if v.get("terminal")},
        paths=paths,
    )


def knowledge_sources_dir(path: str | os.PathLike) -> Path:
    """``path`` itself, or its ``knowledge-sources`` subfolder when it has one."""
    folder = Path(path).expanduser()
    if (folder / "knowledge-sources").is_dir():
        folder = folder / "knowledge-sources"
    if not folder.is_dir():
        raise FileNotFoundError(f"FloDial knowledge sources: {folder} is not a folder")
    return folder


def load_flowcharts(path: str | os.PathLike) -> dict[str, Flowchart]:
    """Every ``*.json`` flowchart in the folder, keyed by chart name (sorted, so seeds are stable)."""
    folder = knowledge_sources_dir(path)
    charts: dict[str, Flowchart] = {}
    for file in sorted(folder.glob("*.json")):
        with open(file, encoding="utf-8") as handle:
            chart = load_flowchart(json.load(handle), name=file.stem)
        if chart.name in charts:
            raise ValueError(f"two flowcharts are named {chart.name!r}")
        charts[chart.name] = chart
    if not charts:
        raise FileNotFoundError(f"no FloDial flowcharts (*.json) in {folder}")
    return charts


def split_node(a: Path_, b: Path_) -> str:
    """The node where two terminals' root paths part (same node, different branch)."""
    for (node_a, branch_a), (node_b, branch_b) in zip(a, b, strict=False):
        if branch_a != branch_b:
            assert node_a == node_b, "paths in a tree share every node before they split"
            return node_a
    raise ValueError("one terminal's path is a prefix of the other's: not a tree of terminals")


def separating_questions(chart: Flowchart, fault: str, distractors: Sequence[str]) -> int:
    """How many of ``fault``'s table questions it takes to rule out every distractor (module docstring)."""
    return len({split_node(chart.paths[fault], chart.paths[c]) for c in distractors})


def difficulty_of(separating: int) -> str:
    """"easy" for at most ``EASY_MAX_SEPARATING`` separating questions, else "hard"."""
    return "easy" if separating <= EASY_MAX_SEPARATING else "hard"


@functools.lru_cache(maxsize=4096)
def _distractor_sets(chart: Flowchart, fault: str, n_distractors: int, difficulty: str) -> tuple[tuple[str, ...], ...]:
    """All distractor sets (sorted ids) of ``difficulty`` for ``fault``, with pairwise distinct texts."""
    texts = chart.faults
    pool = sorted((t for t in chart.faults if t != fault and texts[t] != texts[fault]), key=_node_order)
    size = min(n_distractors, len({texts[t] for t in pool}))
    split = {c: split_node(chart.paths[fault], chart.paths[c]) for c in pool}
    sets = []
    for combo in itertools.combinations(pool, size):
        if len({texts[c] for c in combo}) != size:
            continue
        if difficulty_of(len({split[c] for c in combo})) == difficulty:
            sets.append(combo)
    return tuple(sets)


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), node_id) if node_id.isdigit() else (1 << 30, node_id)


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
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {self.difficulty!r}")
        if self.n_candidates < 2:
            raise ValueError(f"n_candidates must be >= 2, got {self.n_candidates}")
        if self.difficulty == "hard" and self.n_candidates <= EASY_MAX_SEPARATING + 1:
            raise ValueError(f"hard episodes need >= {EASY_MAX_SEPARATING + 2} candidates, got {self.n_candidates}")
        if self.split_scheme not in SPLIT_SCHEMES:
            raise ValueError(f"split_scheme must be one of {SPLIT_SCHEMES}, got {self.split_scheme!r}")
        if self.max_turns < 2 or self.max_turns % 2:
            raise ValueError(f"max_turns must be even and >= 2, got {self.max_turns}")
        if self.bt_variant not in BT_VARIANTS:
            raise ValueError(f"bt_variant must be one of {BT_VARIANTS}, got {self.bt_variant!r}")

    @property
    def data_source(self) -> str:
        return f"flodial_{self.difficulty}"

    def charts_of(self, split: str, charts: Mapping[str, Flowchart]) -> list[str]:
        """Chart names a split draws from."""
        if self.split_scheme == "s-flo":
            return sorted(charts)
        missing = sorted(set(self.test_charts) - set(charts))
        if missing:
            raise ValueError(f"u-flo test charts {missing} are not among the flowcharts {sorted(charts)}")
        held_out = set(self.test_charts)
        return sorted(name for name in charts if (name in held_out) == (split == "test"))


def _eligible_faults(
    config: FloDialDataConfig, charts: Mapping[str, Flowchart], names: Sequence[str]
) -> list[tuple[str, str]]:
    """(chart, fault) pairs that admit a distractor set of the configured difficulty."""
    pairs = [
        (name, fault)
        for name in names
        for fault in sorted(charts[name].faults, key=_node_order)
        if _distractor_sets(charts[name], fault, config.n_candidates - 1, config.difficulty)
    ]
    if not pairs:
        raise ValueError(f"no {config.difficulty} episode can be drawn from the charts {list(names)}")
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
    from tqdm import tqdm

    seen: set[tuple[str, str, tuple[str, ...]]] = set()
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    bar = tqdm(total=n_train + n_test, desc=f"building {config.data_source}", disable=not progress, unit="row")
    difficulty_code = DIFFICULTIES.index(config.difficulty)
    for split, count in (("train", n_train), ("test", n_test)):
        pairs = _eligible_faults(config, charts, config.charts_of(split, charts)) if count else []
        for index in range(count):
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
                raise ValueError(
                    f"could not draw {count} distinct {config.difficulty} {split} episodes from {len(pairs)} true "
                    f"faults (after {_MAX_REDRAWS} redraws for episode {index}): ask for fewer"
                )
            seen.add(key)
            order = rng.permutation(len(distractors) + 1).tolist()
            spec = make_flodial_spec(
                config, charts[name], fault, distractors, order,
                split=split, seed=seed, instance_id=f"{config.data_source}-{split}-{index:05d}",
            )
            rows[split].append(
                {
                    "data_source": config.data_source,
                    "prompt": flodial_messages(spec),
                    "ability": "troubleshooting",
                    "agent_name": AGENT_NAME,
                    "reward_model": {"style": "rule", "ground_truth": json.dumps(spec["answer_index"])},
                    "extra_info": {"index": index, "split": split, "env": spec},
                }
            )
            bar.update(1)
    bar.close()
    return rows


# --- the agent's prompt (our own wording of the protocol) -------------------------------------


def flodial_system_prompt(spec: Mapping[str, Any]) -> str:
    """System message: the problem, the candidate faults, the rounds and every format. Never the table."""
    candidates = list(spec["candidates"])
    K, max_turns = len(candidates), int(spec["max_turns"])
    listing = "\n".join(f"Fault {i}: {text}" for i, text in enumerate(candidates, start=1))
    actions = ", ".join(map(str, range(1, max_turns, 2)))
    updates = ", ".join(map(str, range(2, max_turns, 2)))
    return "\n".join(
        [
            "You are a troubleshooting assistant. A user reports this problem: "
            f"{spec['problem_description']}",
            "",
            f"Exactly one of these {K} candidate faults (numbered 1 to {K}) is the cause; each is described by "
            "the fix a technician would give:",
            listing,
            "",
            "Find the cause by asking the user yes/no diagnostic questions about their situation. The user only "
            "knows the answers to the questions of a fixed troubleshooting checklist: a question that asks the "
            "same thing as a checklist item gets Yes or No; anything else (vague, combined, or not on the "
            "checklist) gets Unknown, and so does a question you already asked. Ask concrete questions that "
            "tell the candidate faults apart.",
            "",
            f"Rounds: {max_turns} in total. Rounds {actions} are Action rounds (ask one question). Rounds {updates} "
            f"are Update rounds (state your current belief). Round {max_turns} is the Answer round. Before any "
            "question, your belief weighs every candidate equally.",
            "",
            "Formats (always think briefly inside <scratch> and </scratch> first):",
            "- Action round: one block\n<interact>\nQuery: your question\n</interact>\nwith one short question "
            "after Query, and nothing else in the block.",
            f"- Update round: <interact>Guess: ...</interact> where ... is {K} non-negative numbers separated by "
            "commas, one weight per candidate fault in order (a larger weight = more likely the cause).",
            "- Answer round: your final weights in the same form, but between the tags <answer> and </answer>.",
            "A turn ends at the first </interact> or </answer> you write; anything after it is ignored. The answer "
            "tags end the game in any round. Your answer is correct if its single largest weight is on the true "
            "fault.",
        ]
    )


def flodial_user_prompt(spec: Mapping[str, Any]) -> str:
    """First user message: start with round 1 (an Action round)."""
    max_turns = int(spec["max_turns"])
    return f"Let's start: you can ask {max_turns // 2} questions. Round 1 of {max_turns} is an Action round: " + (
        action_instruction()
    )


def flodial_messages(spec: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat ``prompt`` column of one FloDial row."""
    return [
        {"role": "system", "content": flodial_system_prompt(spec)},
        {"role": "user", "content": flodial_user_prompt(spec)},
    ]


def build_flodial_dataset(
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: FloDialDataConfig,
    n_train: int,
    n_test: int,
    seed: int,
    progress: bool = True,
) -> dict[str, str]:
    """Read the flowcharts, write ``train.parquet`` and ``test.parquet`` under ``out_dir``; return their paths."""
    import pandas as pd

    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
    rows = build_flodial_rows(load_flowcharts(input_dir), config, n_train, n_test, seed, progress=progress)
    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, str] = {}
    for split, split_rows in rows.items():
        path = os.path.join(os.fspath(out_dir), f"{split}.parquet")
        pd.DataFrame(split_rows).to_parquet(path, index=False)
        paths[split] = path
    return paths


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
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Build the dataset described by ``args``; print the paths."""
    config = FloDialDataConfig(
        difficulty=args.difficulty,
        n_candidates=args.n_candidates,
        split_scheme=args.split_scheme,
        test_charts=tuple(name.strip() for name in args.test_charts.split(",") if name.strip()),
        max_turns=args.max_turns,
        bt_variant=args.bt_variant,
    )
    paths = build_flodial_dataset(
        args.input, args.out, config, args.train, args.test, args.seed, progress=not args.no_progress
    )
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0
