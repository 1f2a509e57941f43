"""Self-locking diagnostics of a batch of episodes, with confidence intervals.

The paper's point is that reward can rise while the agent stops asking informative questions and
stops using the answers. These proxies make both visible, from the per-episode counts that the
agent loop and ``verl-selflock eval`` record (:class:`verl_selflock.contracts.episode.EpisodeStats`).

Definitions (pooled over the episodes of a batch: a ratio is total numerator / total denominator,
so long and short episodes weigh by their number of rounds; a key is left out when its denominator
is 0):

=================================  ==============================================================
``selflock/as_proxy``              Action rounds critiqued AS +1 / Action rounds (share of
                                   informative, admissible queries)
``selflock/bt_proxy``              Update rounds critiqued BT +1 / Update rounds (share of belief
                                   updates that moved toward the truth)
``selflock/info_gain_per_action``  information gained per Action round, where the task defines it
                                   (PE: bits under exact Bayesian updating)
``selflock/psi_delta``             mean change of Psi_hat (belief readout toward the truth) per Update
                                   round that reported one
``selflock/turns``                 mean agent turns per episode
``selflock/finish_ratio``          episodes that produced a well-formed final answer / episodes
``selflock/invalid_ratio``         turns judged invalid (bad action, guess or answer, or a repeat) /
                                   judged turns
``selflock/repeat_ratio``          repeated queries / Action rounds
``selflock/success_rate``          episodes whose answer counts as a success / episodes
``selflock/reward``                mean outcome reward
=================================  ==============================================================

Confidence intervals (:func:`summarize`): the success and finish rates are proportions of
independent episodes: Wilson score interval. Pooled ratios of rounds are *not* binomial (rounds of
one episode are correlated), and means have unknown distributions: a percentile bootstrap that
resamples whole episodes (seeded, vectorised), which respects that correlation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from verl_selflock.contracts.episode import EpisodeStats

__all__ = [
    "METRIC_PREFIX",
    "RATIO_METRICS",
    "MEAN_METRICS",
    "RATE_METRICS",
    "SIMULATOR_METRICS",
    "counts_of",
    "batch_metrics",
    "wilson_interval",
    "bootstrap_ratio_interval",
    "Estimate",
    "summarize",
]

METRIC_PREFIX = "selflock/"

# name -> (numerator field, denominator field) of EpisodeStats (counted by :func:`counts_of`)
RATIO_METRICS: dict[str, tuple[str, str]] = {
    "as_proxy": ("as_pos", "action_rounds"),
    "bt_proxy": ("bt_pos", "update_rounds"),
    "info_gain_per_action": ("info_gain_sum", "info_gain_count"),
    "psi_delta": ("psi_delta_sum", "psi_delta_count"),
    "invalid_ratio": ("invalid_actions", "judged_turns"),
    "repeat_ratio": ("repeated_actions", "action_rounds"),
}
MEAN_METRICS: dict[str, str] = {"turns": "turns", "reward": "reward"}
RATE_METRICS: dict[str, str] = {"success_rate": "success", "finish_ratio": "answered"}
"""Proportions of episodes (Wilson intervals)."""
SIMULATOR_METRICS = ("sim_calls", "sim_cache_hits", "sim_failures")
"""Per-episode ``EpisodeResult.metrics`` keys of tasks with a simulated user: questions put to the
simulator, answers served from the client's cache, and calls that failed after all retries (the turn
was degraded to the task's "cannot answer" reply with critique 0)."""

SUMMARY_ORDER = (
    "success_rate",
    "reward",
    "as_proxy",
    "bt_proxy",
    "info_gain_per_action",
    "psi_delta",
    "turns",
    "finish_ratio",
    "invalid_ratio",
    "repeat_ratio",
)

_COLUMNS = (
    "as_pos",
    "action_rounds",
    "bt_pos",
    "update_rounds",
    "info_gain_sum",
    "info_gain_count",
    "psi_delta_sum",
    "psi_delta_count",
    "invalid_actions",
    "judged_turns",
    "repeated_actions",
    "turns",
    "reward",
    "success",
    "answered",
)


def counts_of(stats: EpisodeStats) -> EpisodeStats:
    """The episode's record as the proxies count it. Judged turns are the turns the environment stepped
    (:attr:`EpisodeStats.judged_turns`: each Action, Update and answer turn once; a turn cut by the
    response budget was never judged); never fewer than the rounds or invalid turns counted, for
    stats built by hand."""
    judged = max(stats.judged_turns, stats.action_rounds + stats.update_rounds, stats.invalid_actions)
    return stats if judged == stats.judged_turns else replace(stats, judged_turns=judged)


def _table(episodes: Sequence[EpisodeStats]) -> dict[str, np.ndarray]:
    """Column name -> (n_episodes,) array."""
    rows = [[float(getattr(episode, name)) for name in _COLUMNS] for episode in episodes]
    matrix = np.asarray(rows, dtype=np.float64).reshape(len(episodes), len(_COLUMNS))
    return {name: matrix[:, i] for i, name in enumerate(_COLUMNS)}


def batch_metrics(episodes: Sequence[EpisodeStats], prefix: str = METRIC_PREFIX) -> dict[str, float]:
    """Point estimates of every proxy over a batch (see the module docstring); {} for no episodes."""
    if not episodes:
        return {}
    table = _table(episodes)
    out: dict[str, float] = {}
    for name, (num, den) in RATIO_METRICS.items():
        denominator = table[den].sum()
        if denominator > 0:
            out[prefix + name] = float(table[num].sum() / denominator)
    for name, column in {**MEAN_METRICS, **RATE_METRICS}.items():
        out[prefix + name] = float(table[column].mean())
    return out


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The bounds contain p exactly; rounding would otherwise put the lower bound a hair above p = 0.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def bootstrap_ratio_interval(
    numerator: np.ndarray,
    denominator: np.ndarray | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(numerator) / sum(denominator)`` over episodes.

    Resamples episodes (rows) with replacement, so rounds of one episode stay together. With
    ``denominator`` None it is the interval of the mean of ``numerator``. Resamples whose
    denominator is 0 are dropped; (nan, nan) when nothing is left.

    Args:
        numerator: (n_episodes,) per-episode numerators (or values).
        denominator: (n_episodes,) per-episode denominators, or None for a mean.
    """
    numerator = np.asarray(numerator, dtype=np.float64)
    n = numerator.shape[0]
    if n == 0:
        return math.nan, math.nan
    denominator = np.ones(n) if denominator is None else np.asarray(denominator, dtype=np.float64)
    index = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # (n_boot, n)
    num, den = numerator[index].sum(axis=1), denominator[index].sum(axis=1)
    keep = den > 0
    if not keep.any():
        return math.nan, math.nan
    ratios = num[keep] / den[keep]
    alpha = (1 - level) / 2
    low, high = np.quantile(ratios, [alpha, 1 - alpha])
    return float(low), float(high)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% interval and the number of episodes behind it."""

    value: float
    low: float
    high: float
    n: int
    method: str
    """``wilson`` or ``bootstrap``."""

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high, "n": self.n, "ci": self.method}


def summarize(episodes: Sequence[EpisodeStats], n_boot: int = 2000, seed: int = 0) -> dict[str, Estimate]:
    """Every proxy of :func:`batch_metrics` (without prefix) with a 95% confidence interval."""
    out: dict[str, Estimate] = {}
    n = len(episodes)
    if n == 0:
        return out
    table = _table(episodes)
    for name, column in RATE_METRICS.items():
        hits = float(table[column].sum())
        low, high = wilson_interval(hits, n)
        out[name] = Estimate(hits / n, low, high, n, "wilson")
    for name, column in MEAN_METRICS.items():
        low, high = bootstrap_ratio_interval(table[column], None, n_boot, seed=seed)
        out[name] = Estimate(float(table[column].mean()), low, high, n, "bootstrap")
    for name, (num, den) in RATIO_METRICS.items():
        denominator = table[den].sum()
        if denominator <= 0:
            continue
        low, high = bootstrap_ratio_interval(table[num], table[den], n_boot, seed=seed)
        out[name] = Estimate(float(table[num].sum() / denominator), low, high, n, "bootstrap")
    return {name: out[name] for name in SUMMARY_ORDER if name in out}


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when fewer than 3 pairs or either side is constant."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape[0] < 3 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def stats_of_fields(fields: Sequence[Mapping[str, Any] | None]) -> list[EpisodeStats]:
    """Episode stats of the samples that carry them (other agent loops' samples are skipped)."""
    out = []
    for item in fields:
        stats = EpisodeStats.from_extra_fields(item if isinstance(item, Mapping) else None)
        if stats is not None:
            out.append(stats)
    return out
