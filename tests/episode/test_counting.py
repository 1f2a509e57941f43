"""The one counter of judged turns (:class:`verl_selflock.episode.counting.TurnCounter`), hand-computed."""

from __future__ import annotations

import pytest

from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, CHANNEL_NONE, TurnLabel
from verl_selflock.contracts.episode import EpisodeStats
from verl_selflock.envs import StepResult
from verl_selflock.episode.counting import TurnCounter, judged_round


def _step(z: int, channel: int, valid: bool = True, repeated: bool = False, **info) -> StepResult:
    return StepResult("obs", TurnLabel(z, channel), done=False, valid=valid, repeated=repeated, info=info)


def test_counts_of_a_hand_computed_episode():
    """Action +1 (1 bit), Update +1 (psi 0.5 -> 0.7), Action -1 repeated (0 bits), Update 0 (psi 0.7 -> 0.6,
    no psi_prev: the last Update's psi is used), Update with a NaN psi (skipped), early answer."""
    stats = EpisodeStats(task="pe")
    counter = TurnCounter(stats)
    kinds = [
        counter.count("action", _step(1, CHANNEL_AS, info_gain=1.0), closing_tag="interact"),
        counter.count("update", _step(1, CHANNEL_BT, psi=0.7, psi_prev=0.5)),
        counter.count("action", _step(-1, CHANNEL_AS, valid=False, repeated=True, info_gain=0.0)),
        counter.count("update", _step(0, CHANNEL_BT, psi=0.6)),
        counter.count("update", _step(-1, CHANNEL_BT, valid=False, psi=float("nan"))),
        counter.count("action", _step(0, CHANNEL_NONE, psi=0.1), closing_tag="answer"),
    ]
    assert kinds == ["action", "update", "action", "update", "update", "answer"]
    assert (stats.judged_turns, stats.action_rounds, stats.update_rounds) == (6, 2, 3)
    assert (stats.as_pos, stats.as_neg, stats.bt_pos, stats.bt_neg) == (1, 1, 1, 1)
    assert (stats.invalid_actions, stats.repeated_actions) == (2, 1)
    assert (stats.info_gain_sum, stats.info_gain_count) == (1.0, 2)
    # The answer's psi is no update: only (0.7 - 0.5) + (0.6 - 0.7).
    assert stats.psi_delta_count == 2 and stats.psi_delta_sum == pytest.approx(0.1)
    assert counter.last_psi == 0.6
    assert stats.turns == 0  # generated turns are the player's to count


def test_judged_round():
    assert judged_round("update", "answer") == "answer"
    assert judged_round("update", "interact") == "update"
    assert judged_round("action") == "action"
