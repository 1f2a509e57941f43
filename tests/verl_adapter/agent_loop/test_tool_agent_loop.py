"""``tool_agent_arew``: veRL's ToolAgentLoop, unchanged, plus per-turn critiques inferred from its tool calls.

A scripted server plays the model's turns; the calculator tool runs for real; the tokenizer is SmolLM2's.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fixtures.servers import ScriptedServer

from verl_selflock.contracts.critique import CHANNEL_AS, CRITIQUE, CRITIQUE_CHANNEL, TURN_IDS
from verl_selflock.data.calculator import build_calculator_rows
from verl_selflock.tools.critique import tool_counts_of

IM_END = "<|im_end|>"


def _call(expression: str, name: str = "calculator") -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {{"expression": "{expression}"}}}}</tool_call>{IM_END}'


# turn: what the model writes -> the critique it should get
SCRIPT = [
    (_call("2 * 3"), 1),  # new information
    (_call("2 * 3"), -1),  # exact repeat
    (_call("2 * 3", name="calc"), -1),  # unknown tool: invalid
    (_call("2 +* 3"), -1),  # the calculator reports an error
    (_call("3 * 2"), 0),  # valid, but "6" was seen already
]
FINAL = ("<answer>6</answer>" + IM_END, 0)  # no call: veRL's loop ends the episode
UNPARSABLE = ('<tool_call>{"name": calculator}</tool_call>' + IM_END, -1)  # opened a call nobody can parse


def _tools() -> list[Any]:
    from omegaconf import OmegaConf
    from verl.tools.schemas import OpenAIFunctionToolSchema

    from verl_selflock.tools.calculator import TOOL_CONFIG_PATH
    from verl_selflock.verl_adapter.calculator_tool import CalculatorTool

    spec = OmegaConf.to_container(OmegaConf.load(TOOL_CONFIG_PATH), resolve=True)["tools"][0]
    return [CalculatorTool(config=spec["config"], tool_schema=OpenAIFunctionToolSchema.model_validate(spec["tool_schema"]))]


def _run(config, tokenizer, script: list[str], loop_name: str, knobs: dict[str, Any] | None = None):
    import hydra
    from omegaconf import OmegaConf

    import verl_selflock.verl_adapter.tool_agent_loop  # noqa: F401  (registers tool_agent_arew)
    from verl_selflock.verl_adapter.private_names import agent_loop_init_kwargs, agent_loop_registry

    server = ScriptedServer(tokenizer, script, stop_ids={tokenizer.convert_tokens_to_ids(IM_END)})
    row = build_calculator_rows(1, 1, seed=0)["train"][0]
    row = {**row, "raw_prompt": row["prompt"]}
    entry = OmegaConf.create({**dict(agent_loop_registry()[loop_name]), **(knobs or {})})

    async def main():
        loop = hydra.utils.instantiate(
            config=entry, server_manager=server, tokenizer=tokenizer, **agent_loop_init_kwargs(config, _tools())
        )
        sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
        return loop, await loop.run(sampling, **row)

    loop, out = asyncio.run(main())
    return loop, out, server


def _turn_critiques(fields: dict[str, Any]) -> dict[int, int]:
    return {t: z for t, z in zip(fields[TURN_IDS], fields[CRITIQUE], strict=True) if t >= 0}


@pytest.fixture
def tool_config(make_config):
    return make_config(actor_rollout_ref__rollout__multi_turn__max_assistant_turns=len(SCRIPT) + 1)


def test_critiques_follow_the_interaction_and_the_output_is_veRLs(tool_config, chatml_tokenizer):
    script = [text for text, _ in SCRIPT] + [FINAL[0]]
    _, ours, _ = _run(tool_config, chatml_tokenizer, script, "tool_agent_arew")
    _, stock, _ = _run(tool_config, chatml_tokenizer, script, "tool_agent")

    # Exactly veRL's loop: same tokens, mask, log-probs, turns, multi-turn fields.
    assert ours.prompt_ids == stock.prompt_ids and ours.response_ids == stock.response_ids
    assert ours.response_mask == stock.response_mask and ours.response_logprobs == stock.response_logprobs
    assert ours.num_turns == stock.num_turns
    for key in ("turn_scores", "tool_rewards", "global_steps", "max_global_steps"):
        assert ours.extra_fields[key] == stock.extra_fields[key], key

    fields = ours.extra_fields
    n = len(ours.response_ids)
    assert all(len(fields[key]) == n for key in (CRITIQUE, CRITIQUE_CHANNEL, TURN_IDS))
    # Generated tokens belong to turns, everything veRL masked out (tool output, template) does not.
    assert [int(t >= 0) for t in fields[TURN_IDS]] == ours.response_mask
    expected = [z for _, z in SCRIPT] + [FINAL[1]]
    assert _turn_critiques(fields) == dict(enumerate(expected))
    assert {ch for t, ch in zip(fields[TURN_IDS], fields[CRITIQUE_CHANNEL], strict=True) if t >= 0} == {CHANNEL_AS}
    counts = tool_counts_of(fields)
    assert counts == {
        "calls": 5, "invalid": 1, "error": 1, "repeat": 1, "informative": 1, "uninformative": 1, "turns": 6
    }


def test_a_call_that_cannot_be_parsed_is_invalid(tool_config, chatml_tokenizer):
    _, out, _ = _run(tool_config, chatml_tokenizer, [SCRIPT[0][0], UNPARSABLE[0]], "tool_agent_arew")
    assert _turn_critiques(out.extra_fields) == {0: 1, 1: UNPARSABLE[1]}
    assert tool_counts_of(out.extra_fields)["invalid"] == 1


def test_turn_cap_and_rules_are_configurable(make_config, chatml_tokenizer):
    # Two assistant turns at most: the second turn's call is never run, so it gets the final critique.
    config = make_config(actor_rollout_ref__rollout__multi_turn__max_assistant_turns=2)
    knobs = {"critique": {"repeat": 0, "informative": 1}, "max_turn_tokens": 64}
    loop, out, server = _run(config, chatml_tokenizer, [_call("5 * 5"), _call("5 * 5")], "tool_agent_arew", knobs)
    assert _turn_critiques(out.extra_fields) == {0: 1, 1: 0}
    assert all(call.sampling_params["max_tokens"] == 64 for call in server.calls)
    assert loop.arew_config.critique.repeat == 0
    assert tool_counts_of(out.extra_fields)["calls"] == 1


def test_an_unaided_answer_can_be_critiqued(tool_config, chatml_tokenizer):
    knobs = {"critique": {"unaided_answer": -1}}
    _, out, _ = _run(tool_config, chatml_tokenizer, [FINAL[0]], "tool_agent_arew", knobs)
    assert _turn_critiques(out.extra_fields) == {0: -1}
    _, out, _ = _run(tool_config, chatml_tokenizer, [SCRIPT[0][0], FINAL[0]], "tool_agent_arew", knobs)
    assert _turn_critiques(out.extra_fields) == {0: 1, 1: 0}  # answered after a call: ``final``


def test_stop_after_tool_call_asks_the_server_to_stop_at_the_end_tag(tool_config, chatml_tokenizer):
    _, _, server = _run(tool_config, chatml_tokenizer, [FINAL[0]], "tool_agent_arew", {"stop_after_tool_call": True})
    params = server.calls[0].sampling_params
    assert params["stop"] == ["</tool_call>"] and params["include_stop_str_in_output"] is True


def test_bad_knobs_fail_at_construction(tool_config, chatml_tokenizer):
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=r"unknown key\(s\) \['repeats'\]"):
        _run(tool_config, chatml_tokenizer, [FINAL[0]], "tool_agent_arew", {"critique": {"repeats": -1}})


def _with_node(make_config, knobs: dict[str, Any]):
    """veRL's config with the top-level ``selflock_tool_agent`` node, as every agent-loop worker receives it."""
    from omegaconf import open_dict

    from verl_selflock.tools.loop_config import TOOL_CONFIG_KEY

    config = make_config()
    with open_dict(config):
        config[TOOL_CONFIG_KEY] = knobs
    return config


def test_knobs_reach_the_loop_from_the_config_alone(make_config, chatml_tokenizer):
    """No agent-loop YAML anywhere (veRL's registry entry is only the ``_target_``): the config node that every
    worker receives, on every node, is all the loop reads."""
    config = _with_node(make_config, {"max_turn_tokens": 40, "stop_after_tool_call": True, "critique": {"repeat": 0}})
    loop, _, server = _run(config, chatml_tokenizer, [FINAL[0]], "tool_agent_arew")
    assert loop.arew_config.max_turn_tokens == 40 and loop.arew_config.stop_after_tool_call
    assert loop.arew_config.critique.repeat == 0
    params = server.calls[0].sampling_params
    assert params["max_tokens"] == 40 and params["stop"] == ["</tool_call>"]


def test_the_config_node_wins_over_a_yaml_entry_and_critique_rules_merge(make_config, chatml_tokenizer):
    config = _with_node(make_config, {"max_turn_tokens": 40, "critique": {"repeat": 0}})
    entry = {"max_turn_tokens": 64, "critique": {"informative": 0, "repeat": -1}}
    loop, _, _ = _run(config, chatml_tokenizer, [FINAL[0]], "tool_agent_arew", entry)
    assert loop.arew_config.max_turn_tokens == 40
    assert (loop.arew_config.critique.repeat, loop.arew_config.critique.informative) == (0, 0)


def test_a_bad_node_knob_fails_at_construction_naming_the_node(make_config, chatml_tokenizer):
    from hydra.errors import InstantiationException

    config = _with_node(make_config, {"max_turn_token": 40})
    typo = r"selflock_tool_agent: unknown agent-loop knob\(s\) \['max_turn_token'\] of tool_agent_arew"
    with pytest.raises(InstantiationException, match=typo):
        _run(config, chatml_tokenizer, [FINAL[0]], "tool_agent_arew")
