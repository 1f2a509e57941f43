"""Self-locking proxies, confidence intervals and the monitor, on hand-computed cases."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, CHANNEL_NONE, TurnLabel
from verl_selflock.contracts.episode import EpisodeStats
from verl_selflock.diagnostics.metrics import (
    batch_metrics,
    bootstrap_ratio_interval,
    counts_of,
    summarize,
    wilson_interval,
)
from verl_selflock.diagnostics.monitor import MonitorConfig, SelfLockingMonitor, rise_over_window
from verl_selflock.diagnostics.training import SELF_LOCKING_KEY, TrainingDiagnostics
from verl_selflock.envs import StepResult
from verl_selflock.episode.counting import TurnCounter


def _step(z: int, channel: int, valid: bool = True, repeated: bool = False, **info) -> StepResult:
    return StepResult("obs", TurnLabel(z, channel), done=False, valid=valid, repeated=repeated, info=info)


def _episode_a() -> EpisodeStats:
    """Action +1 (1 bit), Update +1 (psi 0.5 -> 0.7), Action -1 repeated (0 bits), Update 0 (psi 0.7 -> 0.6),
    answer (success)."""
    stats = EpisodeStats(task="pe")
    counter = TurnCounter(stats)
    for kind, step in [
        ("action", _step(1, CHANNEL_AS, info_gain=1.0)),
        ("update", _step(1, CHANNEL_BT, psi=0.7, psi_prev=0.5)),
        ("action", _step(-1, CHANNEL_AS, valid=False, repeated=True, info_gain=0.0)),
        ("update", _step(0, CHANNEL_BT, psi=0.6)),  # no psi_prev: the episode's last psi (0.7) is used
        ("answer", _step(0, CHANNEL_NONE)),
    ]:
        stats.turns += 1
        counter.count(kind, step)
    stats.reward, stats.success, stats.answered, stats.stop_reason = 1.0, True, True, "answer"
    return stats


def _episode_b() -> EpisodeStats:
    """Action -1 (invalid, 0 bits), Update -1 (invalid guess, no psi); cut at the turn cap, no answer."""
    stats = EpisodeStats(task="pe")
    counter = TurnCounter(stats)
    for kind, step in [
        ("action", _step(-1, CHANNEL_AS, valid=False, info_gain=0.0)),
        ("update", _step(-1, CHANNEL_BT, valid=False, psi=float("nan"))),
    ]:
        stats.turns += 1
        counter.count(kind, step)
    stats.stop_reason = "max_turns"
    return stats


def test_count_step_on_a_hand_computed_episode():
    a = _episode_a()
    assert (a.action_rounds, a.update_rounds, a.as_pos, a.as_neg, a.bt_pos, a.bt_neg) == (2, 2, 1, 1, 1, 0)
    assert (a.invalid_actions, a.repeated_actions) == (1, 1)
    assert (a.info_gain_sum, a.info_gain_count) == (1.0, 2)
    assert a.psi_delta_count == 2 and a.psi_delta_sum == pytest.approx(0.2 - 0.1)
    # Round-trips through the agent loop's extra_fields (what the trainer and eval read back).
    back = EpisodeStats.from_extra_fields(a.as_extra_fields())
    assert (back.action_rounds, back.psi_delta_sum, back.info_gain_count) == (2, pytest.approx(0.1), 2)


def test_batch_metrics_pool_rounds_over_episodes():
    metrics = batch_metrics([counts_of(_episode_a()), counts_of(_episode_b())])
    assert metrics == pytest.approx(
        {
            "selflock/as_proxy": 1 / 3,  # 1 AS +1 of 3 action rounds
            "selflock/bt_proxy": 1 / 3,  # 1 BT +1 of 3 update rounds
            "selflock/info_gain_per_action": 1 / 3,  # 1 bit over 3 actions
            "selflock/psi_delta": 0.05,  # (+0.2 - 0.1) / 2 updates with a psi (the NaN one is skipped)
            "selflock/invalid_ratio": 3 / 7,  # 3 invalid of 5 + 2 judged turns
            "selflock/repeat_ratio": 1 / 3,
            "selflock/turns": 3.5,
            "selflock/reward": 0.5,
            "selflock/success_rate": 0.5,
            "selflock/finish_ratio": 0.5,
        }
    )
    assert batch_metrics([]) == {}
    # A batch without update rounds has no BT proxy (left out, not 0 or NaN).
    only_actions = EpisodeStats(turns=1, action_rounds=1, as_pos=1)
    assert "selflock/bt_proxy" not in batch_metrics([counts_of(only_actions)])


def _played(*turns: tuple[str, StepResult, str | None]) -> EpisodeStats:
    """Count turns (planned round, step, closing tag) as the agent loop and eval do."""
    stats = EpisodeStats(task="pe")
    counter = TurnCounter(stats)
    for kind, step, tag in turns:
        stats.turns += 1
        counter.count(kind, step, closing_tag=tag)
    return stats


def _answer(valid: bool = True, **info) -> StepResult:
    return StepResult(None, TurnLabel(0, CHANNEL_NONE), done=True, valid=valid, info=info)


def test_an_early_answer_is_the_answer_turn_only():
    """PE: Action +1, Update +1, then <answer> in the Action round of turn 3: 3 turns, 3 judged, one
    Action round with AS +1 (as_proxy 1.0, not 1/2 with the answer taken for a second Action round)."""
    stats = _played(
        ("action", _step(1, CHANNEL_AS), "interact"),
        ("update", _step(1, CHANNEL_BT, psi=0.6, psi_prev=0.5), "interact"),
        ("action", _answer(early=True), "answer"),
    )
    stats.stop_reason, stats.answered = "answer", True
    assert (stats.action_rounds, stats.update_rounds, stats.judged_turns) == (1, 1, 3)
    counts = counts_of(stats)
    assert counts.judged_turns == 3 == stats.turns
    metrics = batch_metrics([counts])
    assert metrics["selflock/as_proxy"] == 1.0 and metrics["selflock/bt_proxy"] == 1.0
    assert metrics["selflock/invalid_ratio"] == 0.0
    # An early answer in an Update round is no Update round either: no BT proxy at all.
    in_update = _played(("action", _step(1, CHANNEL_AS), "interact"), ("update", _answer(valid=False), "answer"))
    in_update.stop_reason = "answer"
    assert (in_update.action_rounds, in_update.update_rounds, counts_of(in_update).judged_turns) == (1, 0, 2)
    metrics = batch_metrics([counts_of(in_update)])
    assert "selflock/bt_proxy" not in metrics and metrics["selflock/invalid_ratio"] == 0.5


def test_an_episode_that_ends_with_done_counts_each_turn_once():
    """tau2-like: every turn an Action round (AS critiques), the last one ends the episode (done, no
    <answer>): judged turns = turns, and BT has no value (absent, not 0)."""
    last = StepResult(None, TurnLabel(-1, CHANNEL_AS), done=True, valid=True)
    stats = _played(
        ("action", _step(1, CHANNEL_AS), "tool_call"),
        ("action", _step(0, CHANNEL_AS), "message"),
        ("action", last, "message"),
    )
    stats.stop_reason = "done"
    counts = counts_of(stats)
    assert (stats.action_rounds, stats.update_rounds, counts.judged_turns) == (3, 0, 3)
    metrics = batch_metrics([counts])
    assert metrics["selflock/as_proxy"] == pytest.approx(1 / 3) and "selflock/bt_proxy" not in metrics
    assert "bt_proxy" not in summarize([counts])


def test_psi_delta_counts_update_rounds_only():
    """An answer turn that reports a psi (no psi_prev) is no belief update: it must not be counted as a
    change from the last Update round's psi."""
    stats = _played(
        ("action", _step(1, CHANNEL_AS), "interact"),
        ("update", _step(1, CHANNEL_BT, psi=0.4, psi_prev=0.25), "interact"),
        ("answer", _answer(psi=0.9, answer_psi=0.9), "answer"),
    )
    assert stats.psi_delta_count == 1 and stats.psi_delta_sum == pytest.approx(0.15)
    assert batch_metrics([counts_of(stats)])["selflock/psi_delta"] == pytest.approx(0.15)


def test_records_without_judged_turns_read_back_as_before():
    """episodes.jsonl of an older eval (no selflock_judged_turns) still summarises."""
    fields = _episode_a().as_extra_fields()
    del fields["selflock_judged_turns"]
    back = EpisodeStats.from_extra_fields(fields)
    assert back.judged_turns == 5  # 2 + 2 rounds + the answer turn
    assert EpisodeStats.from_extra_fields(_episode_a().as_extra_fields()).judged_turns == 5


def test_wilson_interval_matches_hand_values():
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    # The interval holds the observed rate exactly at the edges (rounding once put low a hair above 0).
    for successes, n in ((0, 3), (3, 3), (0, 1), (1, 1), (7, 7)):
        low, high = wilson_interval(successes, n)
        assert low <= successes / n <= high


def test_bootstrap_interval_covers_the_point_and_is_seeded():
    num = np.array([1, 2, 0, 3, 1, 2], dtype=float)
    den = np.array([2, 3, 2, 4, 2, 3], dtype=float)
    low, high = bootstrap_ratio_interval(num, den, seed=1)
    assert low < num.sum() / den.sum() < high
    assert (low, high) == bootstrap_ratio_interval(num, den, seed=1)
    assert bootstrap_ratio_interval(np.full(5, 2.0)) == (2.0, 2.0)  # constant values: a zero-width interval
    summary = summarize([counts_of(_episode_a()), counts_of(_episode_b())])
    assert list(summary)[:2] == ["success_rate", "reward"]
    assert summary["success_rate"].method == "wilson" and summary["as_proxy"].method == "bootstrap"
    assert summary["as_proxy"].value == pytest.approx(1 / 3)


def _feed(monitor: SelfLockingMonitor, reward, as_proxy, bt_proxy):
    return [monitor.update(step, r, a, b) for step, (r, a, b) in enumerate(zip(reward, as_proxy, bt_proxy), 1)]


def test_rise_over_window_is_the_fitted_rise():
    assert rise_over_window(np.array([0.0, 0.1, 0.2, 0.3])) == pytest.approx(0.3)
    assert rise_over_window(np.array([0.0, np.nan, 0.2, 0.3])) == pytest.approx(0.3, abs=0.02)
    assert math.isnan(rise_over_window(np.array([0.1, np.nan, np.nan, np.nan])))


def test_monitor_fires_on_a_locked_history_and_warns(caplog):
    rng = np.random.default_rng(0)
    steps = 30
    reward = np.linspace(0.1, 0.4, steps) + rng.normal(0, 0.01, steps)  # reward creeps up
    as_proxy = np.linspace(0.8, 0.3, steps) + rng.normal(0, 0.01, steps)  # fewer informative queries
    bt_proxy = np.full(steps, 0.5) + rng.normal(0, 0.005, steps)  # belief tracking flat
    monitor = SelfLockingMonitor(MonitorConfig(window=10, warn_every=10))
    with caplog.at_level(logging.WARNING, logger="verl_selflock.diagnostics.monitor"):
        verdicts = _feed(monitor, reward, as_proxy, bt_proxy)
    assert not any(v.locked for v in verdicts[:9])  # window not full yet
    assert all(v.locked for v in verdicts[9:])
    warnings = [r for r in caplog.records if "self-locking" in r.getMessage()]
    assert len(warnings) == 3  # onset, then every 10 steps while it holds (steps 10, 20, 30)
    assert "AS proxy" in warnings[0].getMessage() and "reward rose" in warnings[0].getMessage()


def test_monitor_stays_quiet_on_healthy_and_flat_histories():
    steps = 30
    rising = np.linspace(0.1, 0.5, steps)
    healthy = _feed(SelfLockingMonitor(), rising, np.linspace(0.5, 0.9, steps), np.linspace(0.4, 0.7, steps))
    assert not any(v.locked for v in healthy)
    # AS falls but BT rises: not both flat/falling -> not self-locking.
    mixed = _feed(SelfLockingMonitor(), rising, np.linspace(0.9, 0.5, steps), np.linspace(0.3, 0.8, steps))
    assert not any(v.locked for v in mixed)
    # Proxies fall but reward does not rise: a collapse, not self-locking.
    flat_reward = _feed(SelfLockingMonitor(), np.full(steps, 0.2), np.linspace(0.9, 0.5, steps), np.full(steps, 0.5))
    assert not any(v.locked for v in flat_reward)
    # A task without update rounds: judged on the AS proxy alone.
    no_bt = _feed(SelfLockingMonitor(), rising, np.linspace(0.9, 0.5, steps), [None] * steps)
    assert no_bt[-1].locked and math.isnan(no_bt[-1].bt_rise)


def test_monitor_config_validation():
    with pytest.raises(ValueError, match="window"):
        MonitorConfig(window=2)
    with pytest.raises(ValueError, match="unknown key"):
        MonitorConfig.from_mapping({"windw": 5})


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"max_proxy_rise": "0.01"}, "max_proxy_rise"),  # a string would fail in the first training step
        ({"max_proxy_rise": float("nan")}, "max_proxy_rise"),  # NaN: the monitor would never fire
        ({"max_proxy_rise": float("inf")}, "max_proxy_rise"),
        ({"max_proxy_rise": True}, "max_proxy_rise"),
        ({"min_reward_rise": float("inf")}, "min_reward_rise"),
        ({"min_reward_rise": "0.1"}, "min_reward_rise"),
        ({"window": 10.0}, "window"),
        ({"window": True}, "window"),
        ({"warn_every": 0}, "warn_every"),
    ],
)
def test_monitor_config_rejects_bad_values(settings, key):
    with pytest.raises(ValueError, match=rf"selflock_diagnostics\.{key}"):
        MonitorConfig.from_mapping(settings)


def test_monitor_config_accepts_ints_for_thresholds():
    config = MonitorConfig.from_mapping({"max_proxy_rise": 0, "min_reward_rise": 1})
    assert config.max_proxy_rise == 0.0 and isinstance(config.max_proxy_rise, float)
    assert MonitorConfig(max_proxy_rise=-0.02).max_proxy_rise == -0.02  # "proxies must have fallen": allowed


def test_monitor_settings_fail_on_the_driver(verl_config):
    """veRL's driver-side validate_config runs our check (verl_selflock.verl_adapter.config_validation) before Ray starts."""
    from verl_selflock.verl_adapter.config_validation import SelflockConfigError, validate_selflock_config

    with pytest.raises(SelflockConfigError, match=r"selflock_diagnostics\.max_proxy_rise"):
        validate_selflock_config(
            verl_config(["algorithm.adv_estimator=grpo", "+selflock_diagnostics.max_proxy_rise=nan"])
        )
    validate_selflock_config(verl_config(["algorithm.adv_estimator=grpo", "+selflock_diagnostics.max_proxy_rise=0"]))


def test_training_diagnostics_record_step_metrics_and_the_lock_flag():
    diagnostics = TrainingDiagnostics({"selflock_diagnostics": {"window": 3, "min_reward_rise": 0.1}})
    metrics: dict = {}
    fields = [_episode_a().as_extra_fields(), _episode_b().as_extra_fields(), {"other_loop": 1}, None]
    diagnostics.record(fields, metrics, step=1)
    assert metrics["selflock/as_proxy"] == pytest.approx(1 / 3) and metrics[SELF_LOCKING_KEY] == 0.0
    assert metrics["selflock/aborted_generations"] == 0.0
    aborted = EpisodeStats(turns=1, judged_turns=1, action_rounds=1, aborted_generations=1, stop_reason="aborted")
    counted: dict = {}
    TrainingDiagnostics().record([aborted.as_extra_fields(), _episode_a().as_extra_fields()], counted, step=1)
    assert counted["selflock/aborted_generations"] == 1.0
    # Reward rises (0 -> 1) while the AS proxy falls (1 -> 0): the third step fires.
    for step, (reward, as_pos) in enumerate([(0.0, 1), (0.5, 1), (1.0, 0)], start=2):
        stats = EpisodeStats(reward=reward, turns=2, action_rounds=1, as_pos=as_pos, update_rounds=1, bt_pos=0)
        metrics = {}
        diagnostics.record([stats.as_extra_fields()], metrics, step=step)
    assert metrics[SELF_LOCKING_KEY] == 1.0


def test_monitor_ignores_bt_when_no_episode_has_update_rounds():
    """A task whose turns are all Action rounds (tau2): the step's metrics have no bt_proxy and the monitor
    judges AS alone (BT's rise is NaN, not a flat 0 that would count as "BT did not rise")."""
    diagnostics = TrainingDiagnostics({"selflock_diagnostics": {"window": 3, "min_reward_rise": 0.1}})
    for step, (reward, as_pos) in enumerate([(0.0, 2), (0.5, 1), (1.0, 0)], start=1):
        stats = EpisodeStats(reward=reward, turns=2, judged_turns=2, action_rounds=2, as_pos=as_pos, stop_reason="done")
        metrics: dict = {}
        diagnostics.record([stats.as_extra_fields()], metrics, step=step)
        assert "selflock/bt_proxy" not in metrics
    verdict = diagnostics.monitor.update(4, 1.5, 0.0, None)
    assert math.isnan(verdict.bt_rise) and not math.isnan(verdict.as_rise)
    assert metrics[SELF_LOCKING_KEY] == 1.0  # fired on AS alone at step 3


def test_training_diagnostics_report_simulator_traffic():
    diagnostics = TrainingDiagnostics(None)
    with_sim = [
        EpisodeStats(turns=2, env_metrics={"sim_calls": 3.0, "sim_cache_hits": 1.0, "sim_failures": 1.0}),
        EpisodeStats(turns=2, env_metrics={"sim_calls": 1.0, "sim_cache_hits": 1.0}),
    ]
    metrics: dict = {}
    diagnostics.record([item.as_extra_fields() for item in with_sim], metrics, step=1)
    assert metrics["selflock/sim_calls"] == 4.0 and metrics["selflock/sim_failures"] == 1.0
    assert metrics["selflock/sim_cache_hit_rate"] == pytest.approx(0.5)
    metrics = {}
    diagnostics.record([EpisodeStats(turns=2).as_extra_fields()], metrics, step=2)  # PE: no simulator
    assert not any(key.startswith("selflock/sim_") for key in metrics)
