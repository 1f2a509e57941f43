"""Tool-use diagnostics of a training step (``tool/*``), and the self-locking monitor on them.

The same pathology as in active reasoning, under its tool-agent names ("tool usage drop", tool calls
drifting to zero): the reward rises while the agent stops making informative tool calls. From the
per-episode counts the ``tool_agent_arew`` loop writes (:func:`verl_selflock.tools.critique.tool_record`),
pooled over the step's episodes (a ratio is total / total; a key is left out when its denominator is 0):

=================================  ==============================================================
``tool/calls_per_episode``         tool calls per episode
``tool/episodes_with_call``        share of episodes with at least one tool call
``tool/informative_ratio``         calls that returned new information (or changed state) / calls
``tool/informative_per_episode``   informative calls per episode
``tool/repeats``, ``tool/errors``, total repeated / erroring / invalid calls in the step, and each
``tool/invalid``                   over calls (``tool/repeat_ratio``, ``error_ratio``, ``invalid_ratio``)
``tool/turns``                     assistant turns per episode
``tool/self_locking``              1 while the monitor fires: reward (``critic/score/mean``) rising
                                   over its window while ``tool/informative_per_episode`` is flat or
                                   falling (settings: ``selflock_diagnostics``)
=================================  ==============================================================

The monitor watches informative calls *per episode*, not their share: an agent that stops calling tools
altogether keeps a perfect share of its few calls, and that is exactly the drop to catch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from verl_selflock.diagnostics.monitor import MonitorConfig, MonitorSubject, SelfLockingMonitor
from verl_selflock.tools.critique import TOOL_COUNT_NAMES, tool_counts_of

__all__ = ["REWARD_KEY", "TOOL_PREFIX", "ToolDiagnostics", "tool_metrics"]

TOOL_PREFIX = "tool/"
REWARD_KEY = "critic/score/mean"
"""veRL's batch mean of the outcome score (``compute_data_metrics``), already in a step's metrics."""

_SUBJECT = MonitorSubject(
    as_name="informative tool calls per episode (tool/informative_per_episode)",
    bt_name="(no belief proxy for tool agents)",
    advice=(
        "The agent may be gaining reward through shortcuts while it stops making informative tool calls. "
        "Check tool/calls_per_episode and tool/informative_ratio; AREW (algorithm.adv_estimator=arew with "
        "the tool_agent_arew loop) counters this."
    ),
)


def tool_metrics(extra_fields: Sequence[Mapping[str, Any] | None]) -> dict[str, float]:
    """``tool/*`` point estimates over the samples that carry tool counts; {} when none does."""
    rows = [counts for counts in map(tool_counts_of, extra_fields) if counts is not None]
    if not rows:
        return {}
    table = {name: np.asarray([row[name] for row in rows], dtype=np.float64) for name in TOOL_COUNT_NAMES}
    calls = float(table["calls"].sum())
    out = {
        "calls_per_episode": float(table["calls"].mean()),
        "episodes_with_call": float((table["calls"] > 0).mean()),
        "informative_per_episode": float(table["informative"].mean()),
        "turns": float(table["turns"].mean()),
        "repeats": float(table["repeat"].sum()),
        "errors": float(table["error"].sum()),
        "invalid": float(table["invalid"].sum()),
    }
    if calls > 0:
        out["informative_ratio"] = float(table["informative"].sum()) / calls
        out["repeat_ratio"] = float(table["repeat"].sum()) / calls
        out["error_ratio"] = float(table["error"].sum()) / calls
        out["invalid_ratio"] = float(table["invalid"].sum()) / calls
    return {TOOL_PREFIX + name: value for name, value in out.items()}


class ToolDiagnostics:
    """Adds ``tool/*`` to a step's metrics and feeds the self-locking monitor (steps without tool
    episodes add nothing and leave the monitor untouched)."""

    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.monitor = SelfLockingMonitor(config, subject=_SUBJECT)

    def record(self, extra_fields: Sequence[Mapping[str, Any] | None], metrics: dict[str, Any], step: int) -> None:
        step_metrics = tool_metrics(extra_fields)
        if not step_metrics:
            return
        metrics.update(step_metrics)
        reward = metrics.get(REWARD_KEY)
        verdict = self.monitor.update(
            step, None if reward is None else float(reward), step_metrics[TOOL_PREFIX + "informative_per_episode"], None
        )
        metrics[TOOL_PREFIX + "self_locking"] = float(verdict.locked)
