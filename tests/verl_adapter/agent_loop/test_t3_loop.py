"""T3 inside the ``active_reasoning`` agent loop (scripted env and server), and its reward metrics."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fixtures.harness import run_episode, scripted_row
from fixtures.scripted_env import ScriptedEnv
from fixtures.servers import ScriptedServer

from verl_selflock.algorithms.t3 import t3_cut_turn
from verl_selflock.contracts import episode as ef

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
    assert fields[ef.T3_ENABLED] is True
    assert fields[ef.T3_TRUNCATED] is True and fields[ef.T3_TURN] == expected_turns
    # Unused budget (an upper bound on tokens saved): the turns left (each <= max_turn_tokens), capped by
    # what is left of response_length.
    room = loop.response_length - len(out.response_ids)
    assert fields[ef.T3_BUDGET_SAVED] == min(room, (MAX_TURNS - expected_turns) * TURN_TOKENS) > 0
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
        assert out.extra_fields[ef.T3_TRUNCATED] is False and out.extra_fields[ef.T3_BUDGET_SAVED] == 0
    assert off.extra_fields[ef.T3_ENABLED] is False and quiet.extra_fields[ef.T3_ENABLED] is True
    assert off.response_ids == quiet.response_ids and off.extra_fields[ef.TURNS] == MAX_TURNS


def test_bad_t3_settings_fail_when_the_loop_is_built(make_config, chatml_tokenizer):
    from hydra.errors import InstantiationException  # how veRL's hydra.instantiate reports a constructor error

    with pytest.raises(InstantiationException, match=r"t3\.k must be an integer >= 1"):
        _run(make_config, chatml_tokenizer, {"enabled": True, "k": 0})
    with pytest.raises(InstantiationException, match=r"t3\.signal='nope'"):
        _run(make_config, chatml_tokenizer, {"enabled": True, "signal": "nope"})


def test_trainer_t3_metrics_come_from_the_episodes_t3_watched(make_config, chatml_tokenizer):
    """``t3/*`` from real loop outputs: a run with T3 off logs none; with T3 on, the turn mean is over the
    cut episodes only and absent (not 0) when nothing was cut; the token figure is the budget bound."""
    from verl_selflock.verl_adapter.igpo_step import t3_metrics

    _, off, _ = _run(make_config, chatml_tokenizer, None)
    _, cut, _ = _run(make_config, chatml_tokenizer, {"enabled": True})  # cut after turn 4
    _, quiet, _ = _run(make_config, chatml_tokenizer, {"enabled": True}, progress=[1.0] * MAX_TURNS)
    assert t3_metrics([off.extra_fields] * 2, [False, False]) == {}
    budget = float(cut.extra_fields[ef.T3_BUDGET_SAVED])
    metrics = t3_metrics([cut.extra_fields, quiet.extra_fields, cut.extra_fields], [False, False, True])
    assert metrics == {
        "t3/frac_truncated": 0.5,  # the padding row is not an episode
        "t3/turn_mean": 4.0,
        "t3/tokens_budget_saved_mean": budget / 2,
        "t3/tokens_budget_saved_total": budget,
    }
    assert t3_metrics([quiet.extra_fields], [False]) == {
        "t3/frac_truncated": 0.0,
        "t3/tokens_budget_saved_mean": 0.0,
        "t3/tokens_budget_saved_total": 0.0,
    }


def test_validation_metrics_carry_no_t3_keys(make_config, chatml_tokenizer):
    """T3 never acts on evaluation rows, so validation (the reward manager's extra info) reports no T3."""
    import torch
    from verl.protocol import DataProto

    from verl_selflock.verl_adapter.reward_manager import ActiveReasoningRewardManager

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
    assert not any("t3" in key for key in info)
    # 4 turns, all valid distinct queries (+1): Action rounds 1, 3 and Update rounds 2, 4.
    assert info["selflock/as_proxy"] == 1.0 and info["selflock/bt_proxy"] == 1.0


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
