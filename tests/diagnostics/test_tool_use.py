"""``tool/*`` metrics and the self-locking monitor on tool use."""

from __future__ import annotations

from verl_selflock.diagnostics.monitor import MonitorConfig
from verl_selflock.diagnostics.tool_use import REWARD_KEY, ToolDiagnostics, tool_metrics
from verl_selflock.tools.critique import tool_record


def _episode(calls: int, informative: int, repeat: int = 0, error: int = 0) -> dict:
    counts = {"calls": calls, "informative": informative, "repeat": repeat, "error": error}
    return tool_record(counts, turns=calls + 1)


def test_pooled_metrics_and_other_loops_ignored():
    m = tool_metrics([_episode(3, 1, repeat=1), _episode(1, 1, error=0), None, {"selflock_reward": 1.0}])
    assert m["tool/calls_per_episode"] == 2.0 and m["tool/episodes_with_call"] == 1.0
    assert m["tool/informative_ratio"] == 0.5 and m["tool/repeats"] == 1.0 and m["tool/repeat_ratio"] == 0.25
    assert tool_metrics([None]) == {}
    assert "tool/informative_ratio" not in tool_metrics([_episode(0, 0)])


def test_monitor_fires_when_reward_rises_and_informative_calls_fall():
    diagnostics = ToolDiagnostics(MonitorConfig(window=4))
    flags = []
    for step in range(6):
        metrics = {REWARD_KEY: 0.1 * step}
        diagnostics.record([_episode(max(0, 3 - step), max(0, 3 - step))], metrics, step)
        flags.append(metrics["tool/self_locking"])
    assert flags == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    metrics: dict = {}
    diagnostics.record([None], metrics, 7)
    assert metrics == {}  # no tool episode in the step: nothing logged
