"""Tool-call critiques inferred from the interaction, and the calculator task's pieces."""

from __future__ import annotations

import pytest

from verl_selflock.tools.calculator import CalculatorError, compute_score, evaluate
from verl_selflock.tools.critique import ToolCritic, ToolCritiqueConfig, tool_counts_of, tool_record, turn_critique
from verl_selflock.tools.loop_config import ToolAgentArewConfig


def test_default_rules_in_order():
    critic = ToolCritic()
    assert critic.judge_call("calc", '{"x": 1}', "6").critique == 1
    assert critic.judge_call("calc", '{ "x":1 }', "6").kind == "repeat"  # same arguments, other spacing
    assert critic.judge_call("calc", '{"x": 2}', "6").kind == "uninformative"  # "6" seen already
    assert critic.judge_call("calc", '{"x": 3}', "Error: division by zero").kind == "error"
    assert critic.judge_call("calc", '{"x": 4}', "boom", raised=True).critique == -1
    assert critic.judge_call("nope", '{"x": 5}', "Unknown function", invalid=True).kind == "invalid"
    assert critic.judge_call("db", '{"x": 6}', "ok", state_changed=True).kind == "informative"
    assert critic.judge_call("db", '{"x": 7}', "ok", state_changed=True).kind == "informative"
    assert critic.judge_unparsed_call().critique == -1
    assert critic.counts() == {
        "calls": 9, "invalid": 2, "error": 2, "repeat": 1, "informative": 3, "uninformative": 1
    }


def test_turns_negative_first_and_tool_provided_sources():
    assert turn_critique([1, -1, 0]) == -1 and turn_critique([0, 1]) == 1 and turn_critique([]) == 0
    assert turn_critique([1], turn_score=-0.5, source="auto") == -1
    assert turn_critique([1], turn_score=-0.5, source="interaction") == 1
    by_reward = ToolCritic(ToolCritiqueConfig(source="tool_reward"))
    assert by_reward.judge_call("t", "{}", "new", tool_reward=-2.0).critique == -1
    assert by_reward.judge_call("t", '{"a": 1}', "newer", tool_reward=0.0).critique == 0
    auto = ToolCritic(ToolCritiqueConfig(source="auto"))
    assert auto.judge_call("t", "{}", "new", tool_reward=0.0).critique == 1  # no tool sign: the rules


def test_config_validation():
    assert ToolCritiqueConfig.from_mapping({"repeat": 0, "error_patterns": ["^oops"]}).is_error("oops, no")
    for bad, match in (({"repeat": 2}, "repeat must be"), ({"source": "x"}, "source"), ({"nope": 1}, "unknown")):
        with pytest.raises(ValueError, match=match):
            ToolCritiqueConfig.from_mapping(bad)
    with pytest.raises(ValueError, match="regular expression"):
        ToolCritiqueConfig(error_patterns=("(",))
    knobs = ToolAgentArewConfig.from_mapping({"name": "x", "_target_": "y", "critique": {"final": -1}, "max_turn_tokens": 8})
    assert knobs.critique.final == -1 and knobs.max_turn_tokens == 8
    with pytest.raises(ValueError, match="unknown agent-loop knob"):
        ToolAgentArewConfig.from_mapping({"max_turn_token": 8})
    with pytest.raises(ValueError, match="max_turn_tokens"):
        ToolAgentArewConfig(max_turn_tokens=0)


def test_record_round_trip():
    fields = tool_record({"calls": 2, "informative": 1, "repeat": 1}, turns=3)
    assert tool_counts_of(fields)["calls"] == 2 and tool_counts_of(fields)["turns"] == 3
    assert tool_counts_of({"critique": []}) is None


def test_calculator_and_score():
    assert evaluate("347 * 29") == "10063" and evaluate("(1 + 2) / 4") == "0.75" and evaluate("2^3") == "8"
    for bad in ("", "__import__('os')", "2 ** 99", "1 / 0", "x + 1"):
        with pytest.raises(CalculatorError):
            evaluate(bad)
    assert compute_score("s", "<tool_call>...</tool_call>10063<answer>10063</answer>", "10063") == 1.0
    assert compute_score("s", "<answer>1</answer> then <answer>10,063</answer>", "10063") == 1.0
    assert compute_score("s", "10063", "10063") == 0.0  # a tool output alone never scores
