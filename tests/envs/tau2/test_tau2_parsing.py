"""tau2 turn parsing: the agent's ``<message>`` / ``<tool_call>`` turn and the user model's reply (no tau2 needed)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from verl_selflock.envs.tau2.parsing import parse_agent_turn, parse_user_reply


def test_parsers_reject_malformed_turns():
    assert parse_agent_turn("<message> hi </message> <tool_call>{}</tool_call>").value.content == "hi"
    assert parse_agent_turn('<tool_call>{"name": "x", "arguments": {"a": 1}}</tool_call>').value.arguments == {"a": 1}
    for bad in (
        "no block",
        "<message>   </message>",
        "</message>",
        '<tool_call>{"name": "x", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "x", "extra": 1}</tool_call>',
        "<tool_call>[1, 2]</tool_call>",
        "<tool_call>" + "[" * 5000 + "</tool_call>",
    ):
        assert not parse_agent_turn(bad).ok, bad
    assert parse_user_reply("fine") == ("message", "fine")
    assert parse_user_reply('<tool_call>{"name": "t"}</tool_call>') == ("tool_call", ("t", {}))
    assert parse_user_reply("<tool_call>oops")[0] == "bad_tool_call"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('<>/{}":, messagtoolcnrbu[]')) | st.characters(), max_size=80))
def test_agent_turn_parser_never_raises(text):
    parsed = parse_agent_turn(text)
    assert parsed.ok or parsed.error
    if parsed.ok:
        assert parsed.value.kind in ("message", "tool_call")
