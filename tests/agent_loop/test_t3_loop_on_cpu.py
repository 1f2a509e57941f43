"""T3 inside the ``active_reasoning`` agent loop (scripted env and server), and its reward metrics."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fixtures.harness import run_episode, scripted_row
from fixtures.scripted_env import ScriptedEnv
from fixtures.servers import ScriptedServer

from verl_selflock.agent_loop import episode_fields as ef
from verl_selflock.algorithms.t3 import t3_cut_turn

IM_END = "<|im_end|>"
MAX_TURNS = 8
TURN_TOKENS = 32
# Distinct valid actions, each ended by the model's own end-of-turn token.
SCRIPT = [f"<interact>query {i}</interact>{IM_END}" for i in range(MAX_TURNS)]
# "new information" per turn: 1 on turn 1, nothing measured on turn 3, none on turns 2, 4, 5, ...
PROGRESS = [1.0, 0.0, None, 0.0, 0.0, 0.0, 0.0, 0.0]


def _run(make_config, tokenizer, t3: dict | None, progress=PROGRESS):
    server = ScriptedServer(tokenizer, SCRIPT, stop_ids={tokenizer.convert_tokens_to_ids(IM_END)})
    knobs = {"max_turn_tokens": TURN_TOKENS}
    if t3 is not None:
        knobs["t3"] = t3
    loop, out = run_episode(
        make_config(), server, tokenizer, scripted_row(answer="1,2", max_turns=MAX_TURNS, progress=progress), knobs=knobs
    )
    return loop, out, server


@pytest.mark.parametrize(
    "t3, expected_turns",
    [
        ({"enabled": True}, 4),  # the task's default window k = 2: turns 2 and 4 stalled (turn 3 unmeasured)
        ({"enabled": True, "k": 3}, 5),
        ({"enabled": True, "min_turn": 6}, 6),  # never before the minimum
        ({"enabled": True, "k": 1, "delta_min": 1.0}, 1),  # every measured turn counts as stalled
    ],
)
def test_t3_ends_the_episode_where_the_window_says(make_config, chatml_tokenizer, t3, expected_turns):
    loop, out, server = _run(make_config, chatml_tokenizer, t3)
    rule = loop.loop_config.t3
    assert t3_cut_turn(PROGRESS, k=rule.k or 2, delta_min=rule.delta_min or 0.0, min_turn=rule.min_turn or 0) == (
        expected_turns
    )
    fields = out.extra_fields
    (env,) = ScriptedEnv.instances
    assert len(server.calls) == expected_turns == env.turn == fields[ef.TURNS]
    assert max(fields["turn_ids"]) == expected_turns - 1
    assert fields[ef.STOP_REASON] == ef.STOP_T3
    assert fields[ef.T3_TRUNCATED] is True and fields[ef.T3_TURN] == expected_turns
    # Unused budget: the turns left (each <= max_turn_tokens), capped by what is left of response_length.
    room = loop.response_length - len(out.response_ids)
    assert fields[ef.T3_TOKENS_SAVED] == min(room, (MAX_TURNS - expected_turns) * TURN_TOKENS) > 0
    # Scored as the task specifies: no answer was given, so env.result() says 0 / not answered.
    assert fields[ef.REWARD] == 0.0 and fields[ef.ANSWERED] is False
    # The response ends with the closed last turn: no observation was appended after the cut.
    assert chatml_tokenizer.decode(out.response_ids).rstrip().endswith(IM_END)
    assert fields[ef.GT_ANSWER] == "1,2"


def test_t3_off_or_never_firing_changes_nothing(make_config, chatml_tokenizer):
    _, off, _ = _run(make_config, chatml_tokenizer, None)
    ScriptedEnv.instances.clear()
    _, quiet, _ = _run(make_config, chatml_tokenizer, {"enabled": True}, progress=[1.0] * MAX_TURNS)
    for out in (off, quiet):
        assert out.extra_fields[ef.STOP_REASON] != ef.STOP_T3
        assert out.extra_fields[ef.T3_TRUNCATED] is False and out.extra_fields[ef.T3_TOKENS_SAVED] == 0
    assert off.response_ids == quiet.response_ids and off.extra_fields[ef.TURNS] == MAX_TURNS


def test_bad_t3_settings_fail_when_the_loop_is_built(make_config, chatml_tokenizer):
    from hydra.errors import InstantiationException  # how veRL's hydra.instantiate reports a constructor error

    with pytest.raises(InstantiationException, match=r"t3\.k must be an integer >= 1"):
        _run(make_config, chatml_tokenizer, {"enabled": True, "k": 0})
    with pytest.raises(InstantiationException, match=r"t3\.signal='nope'"):
        _run(make_config, chatml_tokenizer, {"enabled": True, "signal": "nope"})


def test_reward_manager_surfaces_t3_metrics(make_config, chatml_tokenizer):
    import torch
    from verl.protocol import DataProto

    from verl_selflock.reward.manager import ActiveReasoningRewardManager

    _, out, _ = _run(make_config, chatml_tokenizer, {"enabled": True})
    column = np.empty(1, dtype=object)
    column[0] = out.extra_fields
    data = DataProto.from_dict(
        tensors={"responses": torch.tensor([out.response_ids]), "prompts": torch.tensor([out.prompt_ids])},
        non_tensors={"tool_extra_fields": column},
    )

    async def main():
        manager = ActiveReasoningRewardManager(config=make_config(), tokenizer=chatml_tokenizer, compute_score=None)
        return await manager.run_single(data)

    info = asyncio.run(main())["reward_extra_info"]
    assert info["selflock/t3_truncated"] == 1.0 and info["selflock/t3_turn"] == 4.0
    assert info["selflock/t3_tokens_saved"] == float(out.extra_fields[ef.T3_TOKENS_SAVED])


def test_t3_leaves_evaluation_rows_untruncated(make_config, chatml_tokenizer):
    """Rows of a test split (``split: test``) are validation/eval episodes: they play to the end."""
    server = ScriptedServer(chatml_tokenizer, SCRIPT, stop_ids={chatml_tokenizer.convert_tokens_to_ids(IM_END)})
    row = scripted_row(answer="1,2", max_turns=MAX_TURNS, progress=PROGRESS)
    knobs = {"max_turn_tokens": TURN_TOKENS, "t3": {"enabled": True}}
    for where in (row["extra_info"]["env"], row["extra_info"]):  # MediQ/FloDial/tau2 rows; PE rows
        where["split"] = "test"
        _, out = run_episode(make_config(), server, chatml_tokenizer, row, knobs=knobs)
        assert out.extra_fields[ef.T3_TRUNCATED] is False and out.extra_fields[ef.TURNS] == MAX_TURNS
        del where["split"]
