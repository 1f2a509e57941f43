"""T3: the truncation rule on hand-built progress histories, its config, and PE's progress signals."""

from __future__ import annotations

import random

import numpy as np
import pytest

from verl_selflock.algorithms.t3 import T3Config, T3Monitor, T3Rule, t3_cut_turn
from verl_selflock.envs import ProgressSignal, make_env
from verl_selflock.envs.pe.env import T3_MOVEMENT, T3_PSI_GAIN, PreferenceEstimationEnv, cosine

N = None  # a turn that measures nothing (e.g. a PE Action round)


@pytest.mark.parametrize(
    "progress, k, delta_min, min_turn, expected",
    [
        # PE-like: only even turns measure; two consecutive non-improving updates -> cut after turn 6
        ([N, 0.10, N, -0.05, N, -0.01, N, 0.30], 2, 0.0, 0, 6),
        # progress in between resets the window
        ([N, -0.1, N, 0.2, N, -0.1, N, -0.2], 2, 0.0, 0, 8),
        ([N, -0.1, N, 0.2, N, -0.1, N, 0.2], 2, 0.0, 0, None),
        # the threshold is inclusive: d <= delta_min is "no progress"
        ([0.0, 0.0], 2, 0.0, 0, 2),
        ([0.05, 0.05], 2, 0.05, 0, 2),
        ([0.0501, 0.05], 2, 0.05, 0, None),
        # k = 1 fires on the first stalled measured turn
        ([N, 0.2, N, -0.3, N], 1, 0.0, 0, 4),
        # unmeasured turns neither reset nor extend the window, and never fire
        ([0.0, N, N, N, 0.0, N], 2, 0.0, 0, 5),
        # no measurement at all: never
        ([N, N, N, N], 1, 0.0, 0, None),
    ],
)
def test_cut_turn_where_the_window_says(progress, k, delta_min, min_turn, expected):
    assert t3_cut_turn(progress, k=k, delta_min=delta_min, min_turn=min_turn) == expected


def test_never_before_the_minimum_turn():
    # tau2-like: no new information from the start; k = 3 would fire after turn 3, min_turn holds it to 6
    stalled = [0.0] * 10
    assert t3_cut_turn(stalled, k=3, min_turn=0) == 3
    assert t3_cut_turn(stalled, k=3, min_turn=6) == 6
    # at the minimum the window must still be full of stalled turns: progress at turn 5 -> cut at 7
    history = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert t3_cut_turn(history, k=3, min_turn=6) == 8
    for min_turn in range(12):
        cut = t3_cut_turn(stalled, k=3, min_turn=min_turn)
        assert cut is None if min_turn > len(stalled) else cut == max(3, min_turn)


@pytest.mark.parametrize("seed", range(5))
def test_monitor_equals_rerunning_the_rule_after_every_turn(seed):
    rng = random.Random(seed)
    for _ in range(50):
        rule = T3Rule(signal="s", k=rng.randint(1, 3), delta_min=rng.choice([0.0, 0.1]), min_turn=rng.randint(0, 6))
        history = [rng.choice([None, -0.2, 0.0, 0.05, 0.1, 0.5]) for _ in range(rng.randint(1, 12))]
        monitor = T3Monitor(rule)
        fired_at = None
        for turn, value in enumerate(history, start=1):
            fired = monitor.observe({} if value is None else {"s": value, "other": 9.0})
            if fired and fired_at is None:
                fired_at = turn
        assert fired_at == t3_cut_turn(history, rule.k, rule.delta_min, rule.min_turn)


def test_config_validation_names_the_key():
    assert not T3Config.from_mapping(None).enabled
    with pytest.raises(ValueError, match=r"t3\.k must be an integer >= 1"):
        T3Config.from_mapping({"enabled": True, "k": 0})
    with pytest.raises(ValueError, match=r"t3\.min_turn"):
        T3Config(enabled=True, min_turn=-1)
    with pytest.raises(ValueError, match=r"t3\.delta_min"):
        T3Config(enabled=True, delta_min=float("nan"))
    with pytest.raises(ValueError, match=r"t3\.enabled"):
        T3Config(enabled="yes")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['t3\.window'\]"):
        T3Config.from_mapping({"window": 2})
    with pytest.raises(ValueError, match=r"t3\.signal='belief'.*known signals"):
        T3Config(enabled=True, signal="belief").check_signal_known(["psi_gain", "movement"])


def test_rule_defaults_come_from_the_task():
    signals = PreferenceEstimationEnv.progress_signals
    rule = T3Rule.resolve(T3Config(enabled=True), "pe", signals)
    assert rule == T3Rule(signal=T3_PSI_GAIN, k=2, delta_min=0.0, min_turn=0)
    truth_free = T3Rule.resolve(T3Config(enabled=True, signal=T3_MOVEMENT, k=3), "pe", signals)
    assert truth_free == T3Rule(signal=T3_MOVEMENT, k=3, delta_min=0.05, min_turn=0)
    with pytest.raises(ValueError, match="reports only"):
        T3Rule.resolve(T3Config(enabled=True, signal="new_info"), "pe", signals)
    with pytest.raises(ValueError, match="reports no T3 progress signal"):
        T3Rule.resolve(T3Config(enabled=True), "x", {})
    assert T3Rule.resolve(T3Config(enabled=True), "x", {"new_info": ProgressSignal(k=4, min_turn=6)}).min_turn == 6


def _pe_spec() -> dict:
    rng = np.random.default_rng(0)
    return {
        "task": "pe",
        "variant": "gated",
        "D": 3,
        "S": 2,
        "movies": rng.uniform(0, 1, (6, 3)).round(3).tolist(),
        "w_star": [0.6, 0.3, 0.1],
        "max_turns": 10,
    }


def test_pe_reports_similarity_gain_and_movement_on_update_rounds():
    env = make_env(_pe_spec())
    w_star = np.array([0.6, 0.3, 0.1])
    action = env.step_sync("<interact>\nFocus: 1,2\nPair: 1,2\n</interact>")
    assert action.progress == {}  # Action rounds do not measure the belief
    guesses = [[0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.2, 0.2, 1.6]]
    previous = np.full(3, 0.5)
    steps = []
    for i, guess in enumerate(guesses):
        if i:
            env.step_sync(f"<interact>\nFocus: 1,3\nPair: {i + 1},{i + 2}\n</interact>")
        step = env.step_sync("<interact>Guess: " + ",".join(map(str, guess)) + "</interact>")
        v, p = np.array(guess), previous
        assert step.progress[T3_PSI_GAIN] == pytest.approx(cosine(v, w_star) - cosine(p, w_star))
        assert step.progress[T3_MOVEMENT] == pytest.approx(np.linalg.norm(v / np.linalg.norm(v) - p / np.linalg.norm(p)))
        previous = v
        steps.append(step)
    assert steps[0].progress[T3_PSI_GAIN] > 0 > steps[1].progress[T3_PSI_GAIN]
    assert steps[2].progress[T3_MOVEMENT] == pytest.approx(0.0, abs=1e-12)  # same direction, twice the scale
    env.step_sync("<interact>\nFocus: 2,3\nPair: 5,6\n</interact>")
    invalid = env.step_sync("<interact>Guess: 1,2</interact>")
    assert not invalid.valid and invalid.progress == {T3_PSI_GAIN: 0.0, T3_MOVEMENT: 0.0}

    # The default PE rule on these steps: update 2 fell, update 3 did not rise (same direction) -> cut
    monitor = T3Monitor(T3Rule.resolve(T3Config(enabled=True), "pe", env.progress_signals))
    fired = [monitor.observe(step.progress) for step in [action, *steps]]
    assert fired == [False, False, False, True]
    assert env.ground_truth_answer() == "0.6,0.3,0.1"


def test_the_signal_documentation_names_signals_tasks_report():
    """``T3Config.signal``'s docstring tells users which names to write: each must be a real signal."""
    import inspect
    import re

    from verl_selflock.envs.base import registered_progress_signals

    source = inspect.getsource(T3Config)
    doc = source[source.index("signal: str") : source.index("k: int | None")]
    named = set(re.findall(r"``([a-z_]+)``", doc)) - {"auto"}
    assert named and named <= set(registered_progress_signals()), named - set(registered_progress_signals())
