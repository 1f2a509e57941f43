"""The per-episode record: one key per field, written and read back exactly (also as numpy columns)."""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from verl_selflock.contracts import episode as ef
from verl_selflock.contracts.episode import KEYS, EpisodeStats


def _filled() -> EpisodeStats:
    """A record whose every exported field differs from its default."""
    return EpisodeStats(
        reward=0.75, success=True, answered=True, turns=5, invalid_actions=1, repeated_actions=1,
        as_pos=2, as_neg=1, bt_pos=1, bt_neg=1, action_rounds=3, update_rounds=2, judged_turns=6,
        info_gain_sum=1.5, info_gain_count=3, psi_delta_sum=-0.25, psi_delta_count=2, truncated=True,
        obs_truncated=1, stop_reason=ef.STOP_ANSWER, task="pe", env_metrics={"sim_calls": 3.0},
        t3_enabled=True, t3_truncated=True, t3_turn=4, t3_budget_saved=80, aborted_generations=1,
    )


def test_every_exported_field_has_one_key():
    exported = [f.name for f in fields(EpisodeStats) if f.metadata.get("exported", True)]
    assert list(KEYS) == exported
    assert all(key == ef.PREFIX + name for name, key in KEYS.items())
    assert "last_psi" not in KEYS  # bookkeeping, never exported
    defaults = EpisodeStats()
    assert all(getattr(_filled(), name) != getattr(defaults, name) for name in KEYS)


def test_round_trip_is_exact():
    stats = _filled()
    written = stats.as_extra_fields()
    assert set(written) == set(KEYS.values())
    assert EpisodeStats.from_extra_fields(written) == stats


def test_numpy_columns_read_as_plain_python():
    """The legacy trainer spreads the fields into ``non_tensor_batch`` columns of numpy scalars."""
    written = {key: (np.asarray(value)[()] if not isinstance(value, dict) else value)
               for key, value in _filled().as_extra_fields().items()}
    read = EpisodeStats.from_extra_fields(written)
    assert read == _filled()
    assert type(read.turns) is int and type(read.success) is bool and type(read.reward) is float


def test_missing_keys_take_defaults_and_old_records_get_judged_turns():
    old = {ef.REWARD: 1.0, ef.ACTION_ROUNDS: 2, ef.UPDATE_ROUNDS: 1, ef.STOP_REASON: ef.STOP_ANSWER}
    read = EpisodeStats.from_extra_fields(old)
    assert read.judged_turns == 4  # the rounds plus the answer turn it ended on
    assert read.turns == 0 and read.env_metrics == {} and read.task == ""


def test_a_sample_without_an_outcome_is_not_a_record():
    assert EpisodeStats.from_extra_fields(None) is None
    assert EpisodeStats.from_extra_fields({}) is None
    assert EpisodeStats.from_extra_fields({ef.TURNS: 3}) is None
