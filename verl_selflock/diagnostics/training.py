"""Per-step self-locking diagnostics of a training run (used by the ``selflock`` trainer mode).

veRL 0.9.1's v1 trainer sends ``reward_extra_info`` to *validation* metrics only: its training
metrics (``_compute_metrics`` -> ``compute_data_metrics``) read tensors from TransferQueue, never the
per-sample ``extra_fields``. Our trainer mode therefore fetches the agent loop's ``extra_fields`` of
the step's batch itself and hands them to :meth:`TrainingDiagnostics.record`, which adds the
``selflock/*`` proxies of :mod:`verl_selflock.diagnostics.metrics` and ``selflock/self_locking``
(0/1, :mod:`verl_selflock.diagnostics.monitor`) to the step's metrics, and ``tool/*`` for tool agents: every logger backend
(console, file JSONL, tensorboard, wandb) then gets them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from verl_selflock.contracts.episode import EpisodeStats
from verl_selflock.diagnostics.metrics import (
    METRIC_PREFIX,
    SIMULATOR_METRICS,
    batch_metrics,
    counts_of,
    stats_of_fields,
)
from verl_selflock.diagnostics.monitor import MonitorConfig, SelfLockingMonitor
from verl_selflock.diagnostics.tool_use import ToolDiagnostics

__all__ = ["SELF_LOCKING_KEY", "TrainingDiagnostics", "simulator_metrics"]

SELF_LOCKING_KEY = METRIC_PREFIX + "self_locking"
CONFIG_NODE = "selflock_diagnostics"


def simulator_metrics(stats: Sequence[EpisodeStats]) -> dict[str, float]:
    """The step's simulated-user traffic (tasks with a simulator only; empty otherwise): questions put to
    it, the share answered from the client's cache, and calls degraded after all retries."""
    calls, hits, failures = (sum(float(item.env_metrics.get(key, 0.0)) for item in stats) for key in SIMULATOR_METRICS)
    if calls <= 0:
        return {}
    return {
        METRIC_PREFIX + "sim_calls": calls,
        METRIC_PREFIX + "sim_cache_hit_rate": hits / calls,
        METRIC_PREFIX + "sim_failures": failures,
    }


class TrainingDiagnostics:
    """Turns one training step's agent-loop fields into metrics and feeds the self-locking monitor."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        """``config``: the full veRL config (its optional ``selflock_diagnostics`` node) or None."""
        node = config.get(CONFIG_NODE) if config is not None and hasattr(config, "get") else None
        monitor_config = MonitorConfig.from_mapping(node)
        self.monitor = SelfLockingMonitor(monitor_config)
        self.tools = ToolDiagnostics(monitor_config)

    def record(self, extra_fields: Sequence[Mapping[str, Any] | None], metrics: dict[str, Any], step: int) -> None:
        """Add ``selflock/*`` metrics of the samples in ``extra_fields`` (batch order, padding removed), and
        ``tool/*`` of tool-agent samples (:mod:`verl_selflock.diagnostics.tool_use`; ``metrics`` must already
        hold veRL's own step metrics, whose mean score the tool monitor reads)."""
        self.tools.record(extra_fields, metrics, step)
        stats = stats_of_fields(extra_fields)
        step_metrics = batch_metrics([counts_of(item) for item in stats])
        metrics.update(step_metrics)
        metrics.update(simulator_metrics(stats))
        # Generations the rollout server aborted (vLLM pauses for weight syncs): those episodes ended early.
        metrics[METRIC_PREFIX + "aborted_generations"] = float(sum(item.aborted_generations for item in stats))
        verdict = self.monitor.update(
            step,
            step_metrics.get(METRIC_PREFIX + "reward"),
            step_metrics.get(METRIC_PREFIX + "as_proxy"),
            step_metrics.get(METRIC_PREFIX + "bt_proxy"),
        )
        metrics[SELF_LOCKING_KEY] = float(verdict.locked)
