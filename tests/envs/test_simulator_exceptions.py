"""A simulator that raises (a client bug, an SDK error nobody mapped) degrades the turn exactly like a
failed call in every simulator task, through the one shared guard ``envs.base.ask_simulator``: the
task's "cannot answer" feedback, critique 0, counted in ``sim_failures``, logged, and the rollout goes on."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fixtures.flodial_charts import laptop_chart

from verl_selflock.contracts.critique import CHANNEL_AS
from verl_selflock.data.flodial import FloDialDataConfig, make_flodial_spec
from verl_selflock.data.flodial_charts import load_flowchart
from verl_selflock.envs import EnvContext, make_env
from verl_selflock.envs.base import ask_simulator
from verl_selflock.envs.mediq.prompts import FIXED_REPLY
from verl_selflock.simulators import ChatReply


class RaisingSimulator:
    """The simulator interface, but every call raises."""

    def __init__(self) -> None:
        self.calls = 0

    async def chat(self, messages, *, cache_key=None, max_tokens=None, temperature=None, stop=None) -> ChatReply:
        self.calls += 1
        raise RuntimeError("simulator bug")


class Returning:
    """A simulator that returns a fixed object (for the guard's checks of what comes back)."""

    def __init__(self, value: object) -> None:
        self.value = value

    async def chat(self, messages, *, cache_key=None, **_: object) -> object:
        return self.value


def mediq_spec() -> dict:
    return {
        "task": "mediq",
        "id": "case-1",
        "split": "train",
        "max_turns": 8,
        "options": ["Measles", "Flu", "Lupus", "Gout"],
        "answer_index": 0,
        "facts": ["She has a fever.", "She has a rash."],
    }


def flodial_spec() -> dict:
    config = FloDialDataConfig(difficulty="hard", max_turns=10)
    chart = load_flowchart(laptop_chart())
    return make_flodial_spec(
        config, chart, "8", ["3", "5", "6", "10"], [1, 2, 0, 3, 4], split="train", seed=0, instance_id="t-0"
    )


def play(env, texts: list[str]):
    async def main():
        return [await env.step(text) for text in texts]

    return asyncio.run(main())


def test_the_guard_turns_exceptions_and_odd_replies_into_failed_replies(caplog):
    messages = [{"role": "user", "content": "hi"}]
    with caplog.at_level(logging.WARNING, logger="verl_selflock.envs.base"):
        reply = asyncio.run(ask_simulator(RaisingSimulator(), messages, cache_key=None, task="mediq"))
    assert (reply.ok, reply.text, reply.error) == (False, None, "exception")
    assert "mediq: the simulator raised RuntimeError('simulator bug')" in caplog.text
    no_text = asyncio.run(ask_simulator(Returning(ChatReply(None, ok=True)), messages, cache_key=None, task="t"))
    assert (no_text.ok, no_text.error) == (False, "bad_response")
    not_a_reply = asyncio.run(ask_simulator(Returning("Yes, 0"), messages, cache_key=None, task="t"))
    assert (not_a_reply.ok, not_a_reply.error) == (False, "bad_response")
    good = ChatReply("Yes, 0", ok=True, cached=True)
    assert asyncio.run(ask_simulator(Returning(good), messages, cache_key=None, task="t")) is good
    # Cancellation is not an error to swallow: it must still stop the rollout.
    class Cancelled:
        async def chat(self, messages, **_: object):
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(ask_simulator(Cancelled(), messages, cache_key=None, task="t"))


def test_mediq_degrades_a_raising_patient_like_a_failed_call(caplog):
    simulator = RaisingSimulator()
    env = make_env(mediq_spec(), context=EnvContext(simulator=simulator))
    with caplog.at_level(logging.WARNING, logger="verl_selflock.envs.base"):
        action, update = play(env, ["<interact>Query: Any fever?</interact>", "<interact>Guess: 1,1,1,1</interact>"])
    assert (action.label.critique, action.label.channel) == (0, CHANNEL_AS)
    assert action.observation.startswith(f"Patient: {FIXED_REPLY}")
    assert action.info["sim_ok"] is False and action.info["sim_error"] == "exception"
    assert update.info["bt_rule"] == "no_evidence"  # the episode goes on
    metrics = env.result().metrics
    assert (metrics["sim_calls"], metrics["sim_failures"]) == (1, 1) and simulator.calls == 1
    assert "the simulator raised" in caplog.text
    # Not the agent's fault: the same question may be asked again (no repeat).
    again = play(env, ["<interact>Query: Any fever?</interact>"])[0]
    assert not again.repeated and again.label.critique == 0 and simulator.calls == 2


def test_flodial_degrades_a_raising_user_like_a_failed_call(caplog):
    simulator = RaisingSimulator()
    env = make_env(flodial_spec(), context=EnvContext(simulator=simulator))
    with caplog.at_level(logging.WARNING, logger="verl_selflock.envs.base"):
        action, update = play(
            env, ["<interact>Query: Does it power on?</interact>", "<interact>Guess: 1,1,1,1,1</interact>"]
        )
    assert action.label.critique == 0 and action.info["simulator_failed"] and action.info["feedback"] == "unknown"
    assert action.observation.startswith("The feedback of your latest query: Unknown.\n")
    assert update.label.critique == 1  # judged as after no evidence (v1: unchanged belief)
    metrics = env.result().metrics
    assert (metrics["sim_calls"], metrics["sim_failures"], metrics["answers_unknown"]) == (1, 1, 1)
    assert "the simulator raised" in caplog.text


def test_tau2_degrades_a_raising_user_like_a_failed_call(caplog):
    pytest.importorskip("tau2.domains.telecom.environment", reason="tau2-bench is not installed")
    from verl_selflock.envs.tau2.env import MAX_CONSECUTIVE_SIM_FAILURES
    from verl_selflock.envs.tau2.user import DEGRADED_USER_REPLY

    task_id = "[mobile_data_issue]airplane_mode_on|user_abroad_roaming_enabled_off[PERSONA:None]"
    simulator = RaisingSimulator()
    env = make_env({"task": "tau2_telecom", "task_id": task_id, "split": "train"}, context=EnvContext(simulator))
    turns = [f"<think>t</think><message>Message {i}.</message>" for i in range(MAX_CONSECUTIVE_SIM_FAILURES)]
    with caplog.at_level(logging.WARNING, logger="verl_selflock.envs.base"):
        steps = play(env, turns)
    assert [s.observation for s in steps[:-1]] == [DEGRADED_USER_REPLY] * (MAX_CONSECUTIVE_SIM_FAILURES - 1)
    assert all(s.label.critique == 0 and s.info["rule"] == "sim_failure" and s.info["sim_failed"] for s in steps)
    assert steps[-1].done  # consecutive failures end the episode, as for a dead endpoint
    metrics = env.result().metrics
    assert metrics["sim_failures"] == metrics["sim_calls"] == MAX_CONSECUTIVE_SIM_FAILURES == simulator.calls
    assert caplog.text.count("the simulator raised") == MAX_CONSECUTIVE_SIM_FAILURES
