"""FloDial environment: hand-computed critiques (AS, BT v1/v0), reply parsing, repeats, and simulator
faults degrading through the real :class:`ChatClient` against real HTTP servers."""

from __future__ import annotations

import asyncio

import pytest
from fixtures.flodial_charts import laptop_chart
from fixtures.openai_servers import FaultServer, down_url

from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, FallbackRole
from verl_selflock.data.flodial import FloDialDataConfig, make_flodial_spec
from verl_selflock.data.flodial_charts import load_flowchart
from verl_selflock.envs import EnvContext, make_env
from verl_selflock.envs.flodial.parsing import normalise_query, parse_simulator_reply
from verl_selflock.simulators import ChatClient, ChatReply, SimulatorConfig

# True fault 8 ("Reseat the graphics card."); candidates shown as [3, 5, 8, 6, 10] -> answer_index 2.
# Its table: 0. power on? -> yes, 1. screen black? -> yes, 2. external monitor? -> no, 3. fan spin? -> yes.
CANDIDATE_ORDER = [1, 2, 0, 3, 4]  # permutes [8, 3, 5, 6, 10]


def episode_spec(bt_variant: str = "v1", max_turns: int = 10) -> dict:
    chart = load_flowchart(laptop_chart())
    config = FloDialDataConfig(difficulty="hard", max_turns=max_turns, bt_variant=bt_variant)
    return make_flodial_spec(
        config, chart, "8", ["3", "5", "6", "10"], CANDIDATE_ORDER, split="train", seed=0, instance_id="t-0"
    )


class ScriptedSimulator:
    """Stands in for the simulator endpoint behind ``chat(...)`` (critique-rule tests only): replies by
    normalised question; counts calls; replays cached replies like the real client."""

    def __init__(self, replies: dict[str, str]) -> None:
        self.replies = {normalise_query(q): r for q, r in replies.items()}
        self.calls: list[list[dict]] = []
        self.cache: set = set()

    async def chat(self, messages, *, cache_key=None, **_: object) -> ChatReply:
        self.calls.append(list(messages))
        cached = cache_key in self.cache
        self.cache.add(cache_key)
        return ChatReply(self.replies.get(normalise_query(messages[-1]["content"]), "Unknown"), ok=True, cached=cached)


def action(query: str) -> str:
    return f"<scratch>ask</scratch><interact>\nQuery: {query}\n</interact> trailing text"


def guess(weights: str) -> str:
    return f"<scratch>update</scratch><interact>Guess: {weights}</interact>"


SCRIPT = [
    action("Does the laptop power on?"),  # "Yes, 0" -> yes: AS +1, rules out fault 3
    guess("0, 1, 2, 1, 1"),  # psi 0.4 > prior 0.2: BT +1
    action("Is the screen completely black?"),  # "No, 1": the table says yes -> yes (mismatch counted), AS +1
    guess("0, 0, 1, 1, 1"),  # psi 1/3 < 0.4: BT -1
    action("Is there power at all?"),  # "Yes, 0": row 0 again -> Unknown + note, repeat, AS -1
    guess("0, 0, 2, 2, 2"),  # same belief after no evidence: v1 +1, v0 0
    action("Is it raining?"),  # "Unknown": AS -1
    guess("0, 0, 3, 1, 1"),  # changed after no evidence: v1 -1, v0 0
    action("Does an external monitor show a picture?"),  # "No, 2" -> no: AS 0, rules out fault 6
    "<scratch>done</scratch><answer>0, 0, 5, 1, 1</answer>",
]
REPLIES = {
    "Does the laptop power on?": "Yes, 0",
    "Is the screen completely black?": "No, 1",
    "Is there power at all?": "**Yes**, 0.",
    "Is it raining?": "Unknown",
    "Does an external monitor show a picture?": "No (2)",
}


def run_script(env, script: list[str]):
    async def main():
        return [await env.step(text) for text in script]

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("bt_variant", "bt_labels"), [("v1", [1, -1, 1, -1]), ("v0", [1, -1, 0, 0])]
)
def test_hand_computed_episode(bt_variant, bt_labels):
    simulator = ScriptedSimulator(REPLIES)
    env = make_env(episode_spec(bt_variant), context=EnvContext(simulator=simulator))
    steps = run_script(env, SCRIPT)

    actions, updates, answer = steps[0:9:2], steps[1:9:2], steps[9]
    assert [s.label.critique for s in actions] == [1, 1, -1, -1, 0]
    assert all(s.label.channel == CHANNEL_AS for s in actions)
    assert [s.label.critique for s in updates] == bt_labels
    assert all(s.label.channel == CHANNEL_BT for s in updates)
    assert [s.info["feedback"] for s in actions] == ["yes", "yes", "unknown", "unknown", "no"]
    assert [s.info["new_information"] for s in actions] == [True, True, False, False, True]
    assert [s.info["info_gain"] for s in actions] == [1.0, 1.0, 0.0, 0.0, 1.0]  # faults 3, 5, 6 ruled out
    assert [s.info["candidates_left"] for s in actions] == [4, 3, 3, 3, 2]
    assert [s.info["psi"] for s in updates] == pytest.approx([0.4, 1 / 3, 1 / 3, 0.6])
    assert [s.repeated for s in actions] == [False, False, True, False, False]

    assert steps[0].observation.startswith("The feedback of your latest query: Yes.\nRound 2 of 10 is an Update")
    assert steps[4].observation.startswith("The feedback of your latest query: Unknown. (You asked this question")
    assert steps[8].observation.startswith("The feedback of your latest query: No.\nThat was your last question.")
    assert "Round 10 of 10 is the Answer round" in steps[8].observation
    assert answer.done and answer.observation is None and answer.label.critique == 0

    result = env.result()
    assert result.reward == 1.0 and result.success and result.answered
    m = result.metrics
    assert (m["answers_yes"], m["answers_no"], m["answers_unknown"], m["repeats"]) == (2, 1, 2, 1)
    assert (m["sim_calls"], m["sim_cache_hits"], m["sim_failures"]) == (5, 0, 0)
    assert (m["sim_answer_mismatch"], m["sim_unparsable"]) == (1, 0)
    assert m["candidates_left"] == 2 and m["psi_final"] == pytest.approx(0.6) and m["turns"] == 10

    # The simulator saw the true fault's table, numbered from 0, and nothing about the candidates.
    system = simulator.calls[0][0]["content"]
    assert "0. Does the laptop power on? -> Yes\n1. Is the screen black? -> Yes\n" in system
    assert "2. Does an external monitor show a picture? -> No\n3. Does the fan spin? -> Yes" in system
    assert "graphics card" not in system


def test_exact_repeat_needs_no_simulator_call_and_tie_answer_fails():
    simulator = ScriptedSimulator(REPLIES)
    env = make_env(episode_spec(max_turns=6), context=EnvContext(simulator=simulator))
    steps = run_script(
        env,
        [
            action("Does the laptop power on?"),
            guess("1,1,1,1,1"),  # unchanged psi after a yes: BT -1
            action("does the laptop   power on"),  # same question, normalised: no call
            guess("1,1,1,1,1"),
            "<answer>0,0,1,1,0</answer>",  # tie between two candidates: not a unique argmax
        ],
    )
    assert len(simulator.calls) == 1
    assert [s.label.critique for s in steps] == [1, -1, -1, 1, 0]
    assert steps[2].repeated and steps[2].info["error"] == "repeated query"
    result = env.result()
    assert result.answered and not result.success and result.reward == 0.0


@pytest.mark.parametrize(
    "block, error",
    [
        ("<interact>Query: a?\nQuery: b?</interact>", "exactly one 'Query:' line"),
        ("<interact>Query: a?\nand also this</interact>", "exactly one 'Query:' line"),
        ("<interact>Query:   </interact>", "empty 'Query:' line"),
        ("<interact>Query: " + "why " * 100 + "</interact>", "longer than 300"),
        ("Query: no tags at all", "no <interact>"),
    ],
)
def test_invalid_actions_and_guesses(block, error):
    simulator = ScriptedSimulator(REPLIES)
    env = make_env(episode_spec(), context=EnvContext(simulator=simulator))
    first, second = run_script(env, [block, guess("1, 2, 3")])
    assert (first.label.critique, first.valid, first.info["new_information"]) == (-1, False, False)
    assert error in first.info["error"] and first.observation.startswith("Invalid query:")
    assert (second.label.critique, second.valid) == (-1, False) and "expected exactly 5" in second.info["error"]
    assert simulator.calls == []


@pytest.mark.parametrize(
    "reply, row, word, parsed",
    [
        ("Yes, 3", 3, "yes", True),
        ("no 0", 0, "no", True),
        ("**No** - row 12.", 12, "no", True),
        ("Yes (4)", 4, "yes", True),
        ("YES, ID: 2\nbecause the table says so", 2, "yes", True),
        ("'Unknown'", None, None, True),
        ("unknown.", None, None, True),
        ("Yes, 1 and 2", None, None, False),
        ("Yes", None, None, False),
        ("3", None, None, False),
        ("I think the answer is yes, 1", None, None, False),
        ("", None, None, False),
    ],
)
def test_simulator_reply_parsing(reply, row, word, parsed):
    verdict = parse_simulator_reply(reply)
    assert (verdict.row, verdict.word, verdict.parsed) == (row, word, parsed)


def test_out_of_range_and_garbled_replies_are_unknown_and_counted():
    simulator = ScriptedSimulator({"Is it on?": "Yes, 9", "Is it off?": "It could be anything"})
    env = make_env(episode_spec(), context=EnvContext(simulator=simulator))
    steps = run_script(env, [action("Is it on?"), guess("1,1,1,1,1"), action("Is it off?")])
    assert [s.label.critique for s in steps] == [-1, 1, -1]
    assert env.result().metrics["sim_unparsable"] == 2


def test_missing_simulator_is_a_clear_error():
    with pytest.raises(ValueError, match="simulator:"):
        make_env(episode_spec(), context=EnvContext(simulator=None))


# --------------------------------------------------------------------------- real client, faulty servers


def _client(base_url: str) -> ChatClient:
    return ChatClient(
        SimulatorConfig(base_url=base_url, model="m", timeout_s=0.5, max_retries=1, backoff_s=0.01, max_tokens=8)
    )


@pytest.mark.parametrize("mode", ["down", "error500", "slow", "garbage"])
def test_simulator_faults_degrade_to_unknown_with_zero_critique(mode):
    """Server down, 500s, too slow, or not speaking JSON: the action gets "Unknown.", AS 0 (not the agent's
    fault), the failure is counted, and the episode goes on (the next update is judged as after no evidence)."""

    async def main():
        server = None if mode == "down" else FaultServer(mode, delay_s=1.5)
        if server is not None:
            server.__enter__()
        try:
            client = _client(down_url() if server is None else server.base_url)
            env = make_env(episode_spec(), context=EnvContext(simulator=client))
            steps = [await env.step(action("Does the laptop power on?")), await env.step(guess("1,1,1,1,1"))]
            return env, steps, server
        finally:
            if server is not None:
                server.__exit__(None, None, None)

    env, (first, second), server = asyncio.run(main())
    assert first.label.critique == 0 and first.info["simulator_failed"] and first.info["feedback"] == "unknown"
    assert first.label.fallback is FallbackRole.EXEMPT  # the simulator's fault: no step_abs_sum fallback
    assert first.observation.startswith("The feedback of your latest query: Unknown.\n")
    assert first.info["new_information"] is False and first.valid
    assert second.label.critique == 1  # unchanged belief after no evidence (v1)
    m = env.result().metrics
    assert (m["sim_calls"], m["sim_failures"], m["sim_cache_hits"], m["answers_unknown"]) == (1, 1, 0, 1)
    if server is not None:
        assert len(server.requests) == 2  # first attempt + one retry


def test_replies_are_cached_across_episodes_with_the_same_table():
    """Two episodes of the same true fault ask the same question: the second costs no request."""
    with FaultServer("ok", reply="Yes, 0") as server:
        client = _client(server.base_url)

        async def main():
            results = []
            for _ in range(2):
                env = make_env(episode_spec(), context=EnvContext(simulator=client))
                step = await env.step(action("Does the laptop power on?"))
                results.append((step, env.result().metrics))
            return results

        (first, m1), (second, m2) = asyncio.run(main())
    assert first.label.critique == second.label.critique == 1
    assert (m1["sim_calls"], m1["sim_cache_hits"]) == (1, 0) and (m2["sim_calls"], m2["sim_cache_hits"]) == (1, 1)
    assert len(server.requests) == 1 and client.stats()["cache_hit_rate"] == 0.5
    assert server.requests[0]["temperature"] == 0.0 and server.requests[0]["max_tokens"] == 8


def test_feedback_ablation_shows_unknown_and_judges_as_usual():
    simulator = ScriptedSimulator(REPLIES)
    env = make_env(episode_spec(), context=EnvContext(simulator=simulator, training=False, withhold_feedback=True))
    steps = run_script(env, SCRIPT[:3])
    assert [s.label.critique for s in steps] == [1, 1, 1]  # the same critiques as with real feedback
    for step in (steps[0], steps[2]):
        assert "The feedback of your latest query: Unknown." in step.observation
        assert "Yes." not in step.observation


def test_t3_signal_and_igpo_answer():
    env = make_env(episode_spec(), context=EnvContext(simulator=ScriptedSimulator(REPLIES)))
    steps = run_script(env, SCRIPT[:7])
    assert [s.progress.get("new_information") for s in steps[0:7:2]] == [1.0, 1.0, 0.0, 0.0]
    assert all(s.progress == {} for s in steps[1:7:2])
    truth = episode_spec()["answer_index"]
    assert env.ground_truth_answer().split(",") == ["1" if i == truth else "0" for i in range(5)]


def test_exact_repeat_of_an_unknown_query_is_a_repeat_without_a_simulator_call():
    """Like MediQ: an exact (normalised) repeat of any answered query is a repeat, whatever the answer was;
    the simulator is not asked again and the AS critique stays -1."""
    simulator = ScriptedSimulator(REPLIES)
    env = make_env(episode_spec(max_turns=6), context=EnvContext(simulator=simulator))
    steps = run_script(
        env,
        [
            action("Is it raining?"),  # "Unknown": AS -1
            guess("1,1,1,1,1"),
            action("is it   RAINING"),  # the same question, normalised: a repeat, no call
            guess("1,1,1,1,1"),
            "<answer>0,0,1,0,0</answer>",
        ],
    )
    first, again = steps[0], steps[2]
    assert len(simulator.calls) == 1
    assert (first.label.critique, first.repeated, first.valid) == (-1, False, True)
    assert (again.label.critique, again.repeated, again.valid) == (-1, True, False)
    assert again.info["error"] == "repeated query" and again.info["feedback"] == "unknown"
    assert again.observation.startswith("The feedback of your latest query: Unknown. (You asked this question already.)")
    assert again.progress == {"new_information": 0.0}
    m = env.result().metrics
    assert (m["repeats"], m["sim_calls"], m["answers_unknown"]) == (1, 1, 2)


def test_a_query_whose_simulator_call_failed_may_be_asked_again():
    """A failed call is not the agent's fault (AS 0) and leaves no answer to repeat: asking again goes to
    the simulator and is judged normally."""

    class FailsOnce(ScriptedSimulator):
        async def chat(self, messages, *, cache_key=None, **kwargs: object) -> ChatReply:
            if not self.calls:
                self.calls.append(list(messages))
                return ChatReply(None, ok=False, error="timeout", attempts=2)
            return await super().chat(messages, cache_key=cache_key, **kwargs)

    simulator = FailsOnce(REPLIES)
    env = make_env(episode_spec(), context=EnvContext(simulator=simulator))
    failed, _, again = run_script(env, [action("Does the laptop power on?"), guess("1,1,1,1,1"), action("Does the laptop power on?")])
    assert (failed.label.critique, failed.info["simulator_failed"], failed.repeated) == (0, True, False)
    assert (again.label.critique, again.repeated, again.info["feedback"]) == (1, False, "yes")
    assert len(simulator.calls) == 2 and env.result().metrics["repeats"] == 0
