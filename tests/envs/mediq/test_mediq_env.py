"""MediQ environment: feedback, AS/BT critiques (incl. the counterfactual rule) on hand-computed cases,
and degradation when the patient simulator fails, through the real ChatClient and real HTTP servers."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from fixtures.openai_servers import FaultServer, down_url

from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, FallbackRole
from verl_selflock.envs import EnvContext, make_env
from verl_selflock.envs.mediq.env import MediQEnv, normalise_query, parse_patient_reply
from verl_selflock.envs.mediq.prompts import FIXED_REPLY
from verl_selflock.simulators import ChatClient, ChatReply, SimulatorConfig

FACTS = ["The patient is 40 years old.", "She has a fever.", "She has a rash.", "She smokes.", "Her BP is 120/80."]


class ScriptedPatient:
    """A patient behind the client interface (``chat(messages, *, cache_key, ...) -> ChatReply``):
    replies by the doctor's question, records every call."""

    def __init__(self, replies: dict[str, str], fail: bool = False) -> None:
        self.replies = replies
        self.fail = fail
        self.calls: list[tuple[list[dict[str, str]], Any]] = []

    async def chat(self, messages, *, cache_key=None, max_tokens=None, temperature=None, stop=None) -> ChatReply:
        self.calls.append((list(messages), cache_key))
        if self.fail:
            return ChatReply(None, ok=False, error="timeout", attempts=3)
        question = messages[-1]["content"].removeprefix("Doctor's question: ")
        return ChatReply(self.replies.get(question, "Unknown"), ok=True)


def spec(**overrides: Any) -> dict[str, Any]:
    base = {
        "task": "mediq",
        "id": "case-7",
        "split": "train",
        "max_turns": 8,
        "initial": "A 40-year-old woman comes with a fever.",
        "question": "What is the diagnosis?",
        "options": ["Measles", "Flu", "Lupus", "Gout"],
        "answer_index": 0,
        "facts": FACTS,
    }
    return {**base, **overrides}


def env_with(patient: Any, training: bool = True, **overrides: Any) -> MediQEnv:
    env = make_env(spec(**overrides), context=EnvContext(simulator=patient, training=training))
    assert isinstance(env, MediQEnv)
    return env


def query(text: str) -> str:
    return f"<scratch>ask</scratch><interact>Query: {text}</interact> trailing"


def guess(values: str) -> str:
    return f"<scratch>hm</scratch><interact>Guess: {values}</interact>"


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- patient replies


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("2", [1]),
        ("1,4", [0, 3]),
        (" 3 , 3, 5", [2, 4]),  # distinct
        ("7, 1, 3", [0, 2]),  # 7 is out of range (5 facts); at most two
        ("Facts 2 and 5.", [1, 4]),
        ("Unknown", None),
        ("unknown (maybe 2)", None),
        ("0, 9", None),
        ("I have no idea", None),
        ("2.5", None),  # not an integer fact number
        ("", None),
    ],
)
def test_patient_reply_parsing(reply, expected):
    assert parse_patient_reply(reply, n_facts=5) == expected


def test_query_normalisation():
    assert normalise_query("  Do you   SMOKE?? ") == normalise_query("do you smoke") == "do you smoke"
    assert normalise_query("Do you smoke?") != normalise_query("Did you smoke?")


# --------------------------------------------------------------------------- AS critiques


def test_action_critiques_and_feedback():
    patient = ScriptedPatient({"Age?": "1", "Any fever?": "2,3", "Fever again?": "2", "Favourite food?": "Unknown"})
    env = env_with(patient)

    step = run(env.step(query("Any fever?")))  # facts 2 and 3 are new
    assert step.label.critique == 1 and step.label.channel == CHANNEL_AS
    assert step.observation.startswith("Patient: She has a fever. She has a rash.\nRound 2 of 8 is an Update round")
    assert step.info["new_information"] is True and step.info["info_gain"] == 2.0 and step.info["facts"] == [2, 3]
    run(env.step(guess("1,1,1,1")))

    step = run(env.step(query("Fever again?")))  # fact 2 was revealed already: the fixed reply
    assert step.label.critique == -1 and FIXED_REPLY in step.observation
    assert step.info["new_information"] is False and step.info["info_gain"] == 0.0
    run(env.step(guess("1,1,1,1")))

    step = run(env.step(query("any FEVER")))  # a normalised repeat: no simulator call
    assert step.label.critique == -1 and step.repeated and not step.valid and FIXED_REPLY in step.observation
    assert len(patient.calls) == 2
    run(env.step(guess("1,1,1,1")))

    step = run(env.step(query("Favourite food?")))  # Unknown
    assert step.label.critique == -1 and step.info["new_information"] is False
    assert "Answer round" in step.observation and step.counterfactual_observation is None

    metrics = env.result().metrics
    assert (metrics["repeats"], metrics["unknown_replies"]) == (1, 1)  # the labels above: AS +1 once, -1 three times
    assert (metrics["sim_calls"], metrics["sim_failures"], metrics["facts_revealed"]) == (3, 0, 2)
    # The patient saw every fact, numbered, and only the question in the user message.
    messages, cache_key = patient.calls[0]
    assert "1. The patient is 40 years old." in messages[0]["content"] and "5. Her BP" in messages[0]["content"]
    assert messages[1]["content"] == "Doctor's question: Any fever?"
    assert cache_key == ("mediq", "case-7", "any fever")


@pytest.mark.parametrize(
    "text", ["<interact>Pair: 1,2</interact>", "<interact>Query:   </interact>", "Query: no tags at all", ""]
)
def test_invalid_action_is_negative_and_uninformative(text):
    patient = ScriptedPatient({})
    env = env_with(patient)
    step = run(env.step(text))
    assert step.label.critique == -1 and not step.valid and step.info["new_information"] is False
    assert patient.calls == [] and env.result().metrics["invalid_actions"] == 1


# --------------------------------------------------------------------------- BT critiques


def test_bt_after_uninformative_feedback_needs_an_unchanged_margin():
    patient = ScriptedPatient({"Fever?": "2"})  # truth = A
    env = env_with(patient)
    run(env.step(query("Fever?")))
    step = run(env.step(guess("0.4, 0.2, 0.2, 0.2")))  # psi 0.4, margin 0.2
    assert step.info["psi"] == pytest.approx(0.4)

    run(env.step(query("Unanswerable?")))
    # Different vector, same margin: 0.45 - 0.25 = 0.2 -> +1 (no evidence, no movement of the margin).
    step = run(env.step(guess("45,25,25,5")))
    assert step.label == step.label.__class__(1, CHANNEL_BT) and step.info["bt_rule"] == "no_evidence"

    run(env.step(query("Still unanswerable?")))
    step = run(env.step(guess("0.5,0.25,0.25,0")))  # margin 0.25 != 0.2 -> -1
    assert step.label.critique == -1 and step.info["bt_rule"] == "no_evidence"


def test_bt_counterfactual_rule():
    """v_prev = prior (0.25 each). Real guess (2,1,1,1) -> (0.4,0.2,0.2,0.2): distance sqrt(0.03).
    A counterfactual guess equal to the prior (distance 0) -> +1; one at (0.7,0.1,0.1,0.1)
    (distance sqrt(0.27)) moved further on null evidence -> -1."""
    for cf_text, expected in (("1,1,1,1", 1), ("7,1,1,1", -1)):
        env = env_with(ScriptedPatient({"Fever?": "2"}))
        step = run(env.step(query("Fever?")))
        assert step.counterfactual_observation is not None
        real_follow = step.observation.split("\n", 1)[1]
        assert step.counterfactual_observation == f"Patient: {FIXED_REPLY}\n{real_follow}"
        env.observe_counterfactual(guess(cf_text) + " junk after the tag")
        step = run(env.step(guess("2,1,1,1")))
        assert step.info["bt_rule"] == "counterfactual" and step.label.critique == expected
        assert step.info["distance"] == pytest.approx(math.sqrt(0.03))
        assert step.info["cf_distance"] == pytest.approx(0.0 if expected == 1 else math.sqrt(0.27))
        assert env.result().metrics["cf_branches"] == 1


def test_bt_without_counterfactual_uses_psi_direction():
    # Switched off in the spec, at validation, or when the branch's guess is invalid: +1 iff Psi_hat rose.
    cases = [
        ({"counterfactual_bt": False}, True, None),
        ({}, False, None),
        ({}, True, "<interact>Guess: 1,2</interact>"),
    ]
    for overrides, training, cf_text in cases:
        env = env_with(ScriptedPatient({"Fever?": "2", "Rash?": "3"}), training=training, **overrides)
        step = run(env.step(query("Fever?")))
        assert (step.counterfactual_observation is not None) == (cf_text is not None)
        if cf_text is not None:
            env.observe_counterfactual(cf_text)
        step = run(env.step(guess("2,1,1,1")))  # psi 0.4 > 0.25
        assert step.info["bt_rule"] == "toward_truth" and step.label.critique == 1
        run(env.step(query("Rash?")))
        step = run(env.step(guess("1,2,1,1")))  # psi 0.2 < 0.4
        assert step.label.critique == -1
        assert env.result().metrics["cf_invalid"] == int(cf_text is not None)


@pytest.mark.parametrize(
    "text", [guess("1,2,3"), guess("0,0,0,0"), guess("1,-1,1,1"), guess("nan,1,1,1"), "Guess: 1,1,1,1", ""]
)
def test_invalid_guess_is_negative_and_keeps_the_previous_belief(text):
    env = env_with(ScriptedPatient({"Fever?": "2"}))
    run(env.step(query("Fever?")))
    step = run(env.step(text))
    assert step.label.critique == -1 and not step.valid and "psi" not in step.info
    assert env.prev_belief.tolist() == [0.25] * 4 and env.result().metrics["invalid_guesses"] == 1


# --------------------------------------------------------------------------- outcome


@pytest.mark.parametrize(
    ("answer", "reward", "answered"),
    [("3,1,1,1", 1.0, True), ("1,1,0,0", 0.0, True), ("0,5,1,1", 0.0, True), ("1,1,1", 0.0, False)],
)
def test_outcome_is_a_unique_argmax_on_the_truth(answer, reward, answered):
    env = env_with(ScriptedPatient({}))
    step = run(env.step(f"<answer>{answer}</answer>"))  # an early answer ends the episode
    assert step.done and step.label.critique == 0 and step.info["early"] is True
    result = env.result()
    assert result.reward == reward and result.answered is answered


def test_spec_and_context_errors():
    with pytest.raises(ValueError, match="simulator:"):
        make_env(spec(), context=EnvContext(simulator=None))
    patient = ScriptedPatient({})
    for bad in ({"facts": []}, {"options": ["a", "b"]}, {"answer_index": 4}, {"max_turns": 7}):
        with pytest.raises(ValueError):
            env_with(patient, **bad)


# --------------------------------------------------------------------------- a failing simulator


def _client(base_url: str) -> ChatClient:
    return ChatClient(
        SimulatorConfig(base_url=base_url, model="patient", timeout_s=0.3, max_retries=1, backoff_s=0.01)
    )


@pytest.mark.parametrize("mode", ["down", "error500", "slow", "garbage"])
def test_simulator_faults_degrade_the_turn(mode):
    """Server down, 500s, too slow, garbage: the turn gets the fixed reply, critique 0, is counted, and
    the next BT turn is judged as after uninformative feedback. No exception."""

    def play(base_url: str) -> tuple[Any, Any, dict[str, float]]:
        async def main():
            env = make_env(spec(), context=EnvContext(simulator=_client(base_url)))
            action = await env.step(query("Do you have a fever?"))
            update = await env.step(guess("1,1,1,1"))
            return action, update, env.result().metrics

        return run(main())

    if mode == "down":
        action, update, metrics = play(down_url())
    else:
        with FaultServer(mode, delay_s=1.0) as server:
            action, update, metrics = play(server.base_url)
            assert len(server.requests) == 2  # first attempt + one retry
    assert action.label.critique == 0 and action.label.channel == CHANNEL_AS
    assert action.label.fallback is FallbackRole.EXEMPT  # the simulator's fault: no step_abs_sum fallback
    assert action.observation.startswith(f"Patient: {FIXED_REPLY}") and action.counterfactual_observation is None
    assert action.info["sim_ok"] is False and action.info["new_information"] is False
    assert (metrics["sim_calls"], metrics["sim_failures"], metrics["sim_cache_hits"]) == (1, 1, 0)
    assert update.info["bt_rule"] == "no_evidence" and update.label.critique == 1


def test_answers_are_cached_per_case_and_question():
    """Through the real client and a real HTTP server: the same (case, normalised question) in a second
    episode is served from the cache; another case asks the server again."""
    with FaultServer("ok", reply="2") as server:

        async def main():
            client = _client(server.base_url)
            results = []
            for case_id, text in (("case-1", "Fever?"), ("case-1", "  fever "), ("case-2", "Fever?")):
                env = make_env(spec(id=case_id), context=EnvContext(simulator=client))
                step = await env.step(query(text))
                results.append((step, env.result().metrics))
            return results, client.stats()

        results, stats = run(main())
    assert [m["sim_cache_hits"] for _, m in results] == [0, 1, 0]
    assert all(step.label.critique == 1 and "She has a fever." in step.observation for step, _ in results)
    assert len(server.requests) == 2 and stats["cache_hit_rate"] == pytest.approx(1 / 3)


def test_feedback_ablation_shows_the_null_reply_and_judges_as_usual():
    patient = ScriptedPatient({"Any fever?": "2,3"})
    env = make_env(spec(), context=EnvContext(simulator=patient, training=False, withhold_feedback=True))
    step = run(env.step(query("Any fever?")))
    assert step.label.critique == 1  # the patient did reveal facts 2 and 3: judged as usual
    assert FIXED_REPLY in step.observation and "She has a fever" not in step.observation
    assert MediQEnv.uninformative_feedback == FIXED_REPLY


def test_t3_signal_and_igpo_answer():
    patient = ScriptedPatient({"Any fever?": "2,3", "Age?": "Unknown"})
    env = env_with(patient)
    assert run(env.step(query("Any fever?"))).progress == {"new_information": 1.0}
    assert run(env.step(guess("1,1,1,1"))).progress == {}  # Update rounds do not measure T3 progress
    assert run(env.step(query("Age?"))).progress == {"new_information": 0.0}
    assert env.ground_truth_answer() == "1,0,0,0"  # answer_index 0
    assert set(MediQEnv.progress_signals) == {"new_information"}
