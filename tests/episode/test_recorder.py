"""The public critique API: a loop's token appends in, exactly AREW's per-token fields out."""

from __future__ import annotations

import pytest

from verl_selflock.algorithms.critique_batch import collate_critiques
from verl_selflock.contracts.critique import (
    CHANNEL_AS,
    CHANNEL_BT,
    CHANNEL_NONE,
    CRITIQUE,
    CRITIQUE_CHANNEL,
    FALLBACK_ELIGIBLE,
    TURN_IDS,
    FallbackRole,
    ResponseLayout,
    TurnLabel,
)
from verl_selflock.episode.recorder import CritiqueRecorder


def test_a_custom_loop_gets_the_fields_the_estimator_reads():
    rec = CritiqueRecorder()
    assert rec.begin_turn() == 0
    rec.generated(3)
    rec.observe(1)  # the template's closing token, inside the open turn
    rec.end_turn(+1)
    rec.observe(2)  # a tool's output
    assert rec.begin_turn() == 1
    rec.generated(2)
    rec.end_turn(-1, CHANNEL_BT, FallbackRole.ELIGIBLE)
    fields = rec.as_extra_fields()
    assert fields[TURN_IDS] == [0, 0, 0, -1, -1, -1, 1, 1]
    assert fields[CRITIQUE] == [1, 1, 1, 0, 0, 0, -1, -1]
    assert fields[CRITIQUE_CHANNEL] == [CHANNEL_AS] * 3 + [CHANNEL_NONE] * 3 + [CHANNEL_BT] * 2
    assert fields[FALLBACK_ELIGIBLE] == [0] * 6 + [1, 1]
    batch = collate_critiques([fields], response_length=10)
    assert bool(batch.has_critique[0]) and batch.critique[0, :8].tolist() == fields[CRITIQUE]


def test_same_fields_as_the_layout_it_wraps():
    rec, layout = CritiqueRecorder(), ResponseLayout()
    rec.begin_turn(), rec.generated(4), rec.end_turn(1, CHANNEL_AS), rec.observe(3)
    layout.add_turn_tokens(0, 4), layout.set_label(0, TurnLabel(1, CHANNEL_AS)), layout.add_observation_tokens(3)
    rec.begin_turn(), rec.generated(2)  # never ended: the episode stopped before the turn was judged
    layout.add_turn_tokens(1, 2)
    assert rec.as_extra_fields() == layout.as_extra_fields()
    assert rec.label(1) == TurnLabel() and rec.open_turn == 1 and rec.num_turns == 2


def test_dropping_and_cutting_tokens_keeps_alignment():
    rec = CritiqueRecorder()
    rec.begin_turn(), rec.generated(3), rec.end_turn(1), rec.observe(4)
    rec.drop_last(2)  # a Continuous Token merge trimmed a stale suffix
    assert len(rec) == 5
    rec.truncate(2)
    assert rec.as_extra_fields()[TURN_IDS] == [0, 0]
    rec.drop_last(10)
    assert len(rec) == 0


def test_misuse_is_an_error():
    rec = CritiqueRecorder()
    with pytest.raises(RuntimeError, match="no open turn"):
        rec.generated(1)
    with pytest.raises(RuntimeError, match="no open turn"):
        rec.end_turn(1)
    rec.begin_turn()
    with pytest.raises(ValueError, match="critique must be"):
        rec.end_turn(2)
    with pytest.raises(ValueError, match="token count"):
        rec.observe(-1)
