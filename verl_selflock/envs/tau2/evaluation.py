"""tau2's outcome of a transcript: its evaluators, combined over the task's reward basis.

tau2's ``EnvironmentEvaluator``, ``ActionEvaluator`` and ``CommunicateEvaluator`` run on the
transcript (the environment evaluator replays it in a fresh environment) and are combined as
``tau2.evaluator.evaluator`` does; that module itself imports litellm, so the combination is done here:

* **official**: the product of the family rewards in the reward basis, and 0 unless the user ended
  the conversation with a stop token;
* **fractional**: the mean of the atomic checks in the reward basis (the DB-hash check, each env
  assertion, each expected action, each communicate item).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from verl_selflock.envs.tau2.assets import new_environment

__all__ = ["Tau2Evaluation", "evaluate_transcript"]


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
    )
