"""Self-locking diagnostics: per-episode proxies, batch metrics with confidence intervals, the
self-locking monitor, and plots. Pure Python + numpy (matplotlib only for :mod:`.plots`)."""

from verl_selflock.diagnostics.metrics import (
    Estimate,
    batch_metrics,
    bootstrap_ratio_interval,
    counts_of,
    summarize,
    wilson_interval,
)
from verl_selflock.diagnostics.monitor import MonitorConfig, SelfLockingMonitor, Verdict

__all__ = [
    "Estimate",
    "MonitorConfig",
    "SelfLockingMonitor",
    "Verdict",
    "batch_metrics",
    "bootstrap_ratio_interval",
    "counts_of",
    "summarize",
    "wilson_interval",
]
