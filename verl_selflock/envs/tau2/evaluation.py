"""tau2's outcome of a transcript: its evaluators, combined over the task's reward basis.

tau2's ``EnvironmentEvaluator``, ``ActionEvaluator`` and ``CommunicateEvaluator`` run on the
transcript (the environment evaluator replays it in a fresh environment) and are combined as
``tau2.evaluator.evaluator`` does; that module itself imports litellm, so the combination is done here:

* **official**: the product of the family rewards in the reward basis, and 0 unless the user ended
  the conversation with a stop token;
* **fractional**: the mean of the atomic checks in the reward basis (the DB-hash check, each env
  assertion, each expected action, each communicate item): the paper's training reward;
* **fractional gain** (our default training reward): the fractional mean's gain over the task's
  *do-nothing* state (its initial state, evaluated once per task: :func:`inaction_evaluation`),
  rescaled so that meeting every check is 1, clipped at 0: ``max(0, (F - F0) / (1 - F0))``. With
  0/1 checks that is (checks newly met - checks already met at the start but broken) / checks not met
  at the start: a check that holds before the agent acts pays nothing (on tau2's official split 11
  of the 74 training tasks pay 0.5 for doing nothing under the plain mean: their "service stays
  off" or "no overdue bill" assertion already holds), and breaking one costs as much as fixing one.
  A task whose checks all hold at the start (F0 = 1; none on the official split) has no gain to
  measure: its reward is the official outcome (1 only if the user ended the call and every check
  still holds), so doing nothing earns 0 there too.

A training reward that pays for inaction rewards the self-locked policy (talk, change nothing).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from verl_selflock.envs.tau2.assets import new_environment, telecom_task

__all__ = [
    "DEFAULT_TRAINING_REWARD",
    "TRAINING_REWARDS",
    "Tau2Evaluation",
    "evaluate_transcript",
    "fractional_gain",
    "inaction_evaluation",
    "training_reward",
]

TRAINING_REWARDS = ("fractional_gain", "fractional", "official")
"""Values of the env spec key ``training_reward`` (training rows; validation rows are always official)."""
DEFAULT_TRAINING_REWARD = "fractional_gain"


@dataclass
class Tau2Evaluation:
    """tau2's checks of one transcript."""

    official: float
    """tau2's reward: product over the reward basis; 0 without a user stop."""
    fractional: float
    """Mean of the atomic checks in the reward basis."""
    families: dict[str, float]
    """Per family in the basis (``db``, ``env_assertion``, ``action``, ``communicate``): fraction met."""
    num_checks: int
    error: str | None = None
    checks: tuple[float, ...] = ()
    """Every atomic check's value, in a fixed order per task (families in basis order, then tau2's order)."""


def evaluate_transcript(task: Any, trajectory: list[Any], user_stopped: bool) -> Tau2Evaluation:
    """Run tau2's evaluators on a transcript of tau2 messages (replayed in a fresh environment)."""
    from tau2.data_model.tasks import RewardType
    from tau2.evaluator.evaluator_action import ActionEvaluator
    from tau2.evaluator.evaluator_communicate import CommunicateEvaluator
    from tau2.evaluator.evaluator_env import EnvironmentEvaluator

    criteria = task.evaluation_criteria
    if criteria is None:
        return Tau2Evaluation(1.0 if user_stopped else 0.0, 1.0, {}, 0)
    basis = set(criteria.reward_basis)
    env_info = EnvironmentEvaluator.calculate_reward(
        environment_constructor=new_environment, task=task, full_trajectory=trajectory, solo_mode=False
    )
    action_info = ActionEvaluator.calculate_reward(task=task, full_trajectory=trajectory)
    communicate_info = CommunicateEvaluator.calculate_reward(task=task, full_trajectory=trajectory)

    official = 1.0
    families: dict[str, list[float]] = {}
    if basis & {RewardType.DB, RewardType.ENV_ASSERTION}:
        official *= env_info.reward
    if RewardType.DB in basis:
        families["db"] = [env_info.db_check.db_reward if env_info.db_check is not None else 0.0]
    if RewardType.ENV_ASSERTION in basis:
        families["env_assertion"] = [check.reward for check in env_info.env_assertions or []]
    if RewardType.ACTION in basis:
        official *= action_info.reward
        families["action"] = [check.action_reward for check in action_info.action_checks or []]
    if RewardType.COMMUNICATE in basis:
        official *= communicate_info.reward
        families["communicate"] = [float(check.met) for check in communicate_info.communicate_checks or []]
    atomic = [value for values in families.values() for value in values]
    fractional = sum(atomic) / len(atomic) if atomic else official
    return Tau2Evaluation(
        official=official if user_stopped else 0.0,
        fractional=float(fractional),
        families={name: (sum(v) / len(v) if v else 1.0) for name, v in families.items()},
        num_checks=len(atomic),
        checks=tuple(float(value) for value in atomic),
    )


@functools.lru_cache(maxsize=4096)
def inaction_evaluation(task_id: str) -> Tau2Evaluation:
    """tau2's checks of a task's do-nothing transcript (its initial message history only)."""
    task = telecom_task(task_id)
    history = list(task.initial_state.message_history or []) if task.initial_state is not None else []
    return evaluate_transcript(task, history, user_stopped=False)


def fractional_gain(evaluation: Tau2Evaluation, baseline: Tau2Evaluation) -> float | None:
    """``max(0, (F - F0) / (1 - F0))`` over the atomic checks (module docstring); None when no check
    is left to gain (all hold at the start, or the task has none)."""
    if evaluation.error is not None or len(evaluation.checks) != len(baseline.checks):
        return 0.0  # a failed evaluation (replay mismatch) pays nothing, as its fractional mean does
    room = sum(1.0 - value for value in baseline.checks)
    if room <= 0.0:
        return None
    gained = sum(evaluation.checks) - sum(baseline.checks)
    return min(1.0, max(0.0, gained / room))


def training_reward(evaluation: Tau2Evaluation, task_id: str, kind: str = DEFAULT_TRAINING_REWARD) -> float:
    """The reward of a training row: ``kind`` is one of :data:`TRAINING_REWARDS`."""
    if kind == "official":
        return evaluation.official
    if kind == "fractional":
        return evaluation.fractional
    if kind != "fractional_gain":
        raise ValueError(f"tau2 training_reward must be one of {TRAINING_REWARDS}, got {kind!r}")
    gain = fractional_gain(evaluation, inaction_evaluation(task_id))
    return evaluation.official if gain is None else gain
