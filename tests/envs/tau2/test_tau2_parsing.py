"""tau2 turn parsing: the agent's ``<message>`` / ``<tool_call>`` turn and the user model's reply (no tau2 needed)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from verl_selflock.envs.tau2.parsing import MAX_ACTION_CHARS, parse_agent_turn, parse_user_reply


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


def call(arguments_json: str, name: str = "refuel_data") -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {arguments_json}}}</tool_call>'


def test_tool_call_json_is_strict():
    """Python's json accepts NaN, Infinity, 1e999 (-> inf), duplicate keys (last wins), lone surrogates
    and 5,000-digit integers (a ValueError that is not a JSONDecodeError); RFC 8259 does not."""
    assert parse_agent_turn(call('{"gb_amount": 2.5, "line_id": "L1"}')).value.arguments["gb_amount"] == 2.5
    for bad, why in (
        ('{"gb_amount": NaN}', "NaN"),
        ('{"gb_amount": Infinity}', "Infinity"),
        ('{"gb_amount": -Infinity}', "-Infinity"),
        ('{"gb_amount": 1e999}', "infinity"),
        ('{"gb_amount": [1, NaN]}', "NaN"),
        ('{"line_id": "L1", "line_id": "L2"}', "duplicate"),
        ('{"line_id": "\\ud800"}', "surrogate"),
        ('{"x": ' + "[" * 30 + "]" * 30 + "}", "nested"),
    ):
        parsed = parse_agent_turn(call(bad))
        assert not parsed.ok and why in parsed.error, (bad[:40], parsed.error)
    # A 5,000-digit integer (under the cap here) is a ValueError that is not a JSONDecodeError: refused, no raise.
    from verl_selflock.envs.tau2.parsing import strict_json

    huge = strict_json('{"n": ' + "1" * 5000 + "}")
    assert not huge.ok and "digits" in huge.error
    assert parse_user_reply(f"<tool_call>{call('{}')[11:-12]}</tool_call>")[0] == "tool_call"
    assert parse_user_reply('<tool_call>{"name": "t", "arguments": {"a": NaN}}</tool_call>')[0] == "bad_tool_call"


def test_messages_and_tool_calls_over_the_cap_are_invalid():
    assert parse_agent_turn(f"<message>{'a' * MAX_ACTION_CHARS}</message>").ok
    assert parse_agent_turn(f"<message>  {'a' * MAX_ACTION_CHARS}\n</message>").ok  # measured after stripping
    long_message = parse_agent_turn(f"<message>{'a' * (MAX_ACTION_CHARS + 1)}</message>")
    assert not long_message.ok and "over the limit" in long_message.error
    padded = '{"summary": "' + "s" * MAX_ACTION_CHARS + '"}'
    assert not parse_agent_turn(call(padded, "transfer_to_human_agents")).ok
    assert parse_user_reply(call(padded, "transfer_to_human_agents"))[0] == "bad_tool_call"  # the user's calls too
    assert not parse_agent_turn("<message>hi \ud800</message>").ok  # not encodable for the simulator's request


# A 1 MB reply of any shape must parse in well under 100 ms (the bound; a quadratic step takes
# minutes at this size). The best of three runs is timed so that a busy machine does not fail the test.
ONE_MB = 1 << 20
SHAPES = {
    "spaces_in_message": "<message>\nhi" + " " * ONE_MB + "x\n</message>",
    "plain_text": "a" * ONE_MB,
    "openings_then_close": "<message>" * (ONE_MB // 9) + "</message>",
    "closings_only": "</tool_call>" * (ONE_MB // 12),
    "lt_soup": "<" * ONE_MB + "</message>",
    "partial_tags": "</message" * (ONE_MB // 9) + "<message>x</message>",
    "json_brackets": "<tool_call>" + "[" * ONE_MB + "</tool_call>",
    "json_string": '<tool_call>{"name": "' + "n" * ONE_MB + '"}</tool_call>',
    "think_then_message": "<think>" + "why " * (ONE_MB // 4) + "</think><message>hello</message>",
}


def test_one_megabyte_replies_parse_in_linear_time():
    import time

    for name, text in SHAPES.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            parse_agent_turn(text)
            parse_user_reply(text)
            best = min(best, time.perf_counter() - start)
        assert best < 0.1, f"{name}: {best * 1000:.0f} ms for a 1 MB reply"
