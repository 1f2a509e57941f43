"""Per-step self-locking diagnostics of a training run (used by the ``selflock`` trainer mode).

veRL 0.9.1's v1 trainer sends ``reward_extra_info`` to *validation* metrics only: its training
metrics (``_compute_metrics`` -> ``compute_data_metrics``) read tensors from TransferQueue, never the
per-sample ``extra_fields``. Our trainer mode therefore fetches the agent loop's ``extra_fields`` of
the step's batch itself and hands them to :meth:`TrainingDiagnostics.record`, which adds the
``selflock/*`` proxies of :mod:`verl_selflock.diagnostics.metrics` and ``selflock/self_locking``
(0/1, :mod:`verl_selflock.diagnostics.monitor`) to the step's metrics: every logger backend
(console, file JSONL, tensorboard, wandb) then gets them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from verl_selflock.diagnostics.metrics import METRIC_PREFIX, batch_metrics, counts_of, stats_of_fields
from verl_selflock.diagnostics.monitor import MonitorConfig, SelfLockingMonitor

__all__ = ["SELF_LOCKING_KEY", "TrainingDiagnostics"]

SELF_LOCKING_KEY = METRIC_PREFIX + "self_locking"
CONFIG_NODE = "selflock_diagnostics"


class TrainingDiagnostics:
    """Turns one training step's agent-loop fields into metrics and feeds the self-locking monitor."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        """``config``: the full veRL config (its optional ``selflock_diagnostics`` node) or None."""
        node = config.get(CONFIG_NODE) if config is not None and hasattr(config, "get") else None
        self.monitor = SelfLockingMonitor(MonitorConfig.from_mapping(node))

    def record(self, extra_fields: Sequence[Mapping[str, Any] | None], metrics: dict[str, Any], step: int) -> None:
        """Add ``selflock/*`` metrics of the samples in ``extra_fields`` (batch order, padding removed)."""
        episodes = [counts_of(stats) for stats in stats_of_fields(extra_fields)]
        step_metrics = batch_metrics(episodes)
        metrics.update(step_metrics)
        verdict = self.monitor.update(
            step,
            step_metrics.get(METRIC_PREFIX + "reward"),
            step_metrics.get(METRIC_PREFIX + "as_proxy"),
            step_metrics.get(METRIC_PREFIX + "bt_proxy"),
        )
        metrics[SELF_LOCKING_KEY] = float(verdict.locked)
