"""``active_reasoning`` reward manager: the environment's outcome score, from the agent loop's fields.

Select it with ``reward.reward_manager.name=active_reasoning`` (source ``register``, veRL's default;
the ``verl.plugins`` entry point registers it in every process). It runs in veRL's
``RewardLoopWorker`` and gets one trajectory at a time as a DataProto whose ``non_tensor_batch``
holds the dataset columns plus ``tool_extra_fields`` = the agent loop's ``extra_fields``.

The score is ``selflock_reward``: the outcome the environment computed for the answer the episode
actually produced (:mod:`verl_selflock.contracts.episode`). The decoded transcript is never
searched for an ``<answer>`` block: the instructions themselves show one (``<answer>w1,...,wD</answer>``),
and the fork scored that when the model never answered.

A sample without the fields (another agent loop wrote it) scores 0.0 with a logged warning and
``selflock/missing_outcome = 1`` in ``reward_extra_info``; it never raises.

Paths where this manager is not reached (documented, not worked around): veRL skips the reward loop
for a sample whose agent loop set ``reward_score`` itself (ours does not), and with
``reward.reward_model.enable=True`` it scores with the reward model instead of any manager.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from verl import DataProto
from verl.experimental.reward_loop.reward_manager import register
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from verl_selflock.contracts.episode import PREFIX, REWARD, EpisodeStats
from verl_selflock.contracts.names import REWARD_MANAGER_NAME
from verl_selflock.diagnostics.metrics import METRIC_PREFIX, RATIO_METRICS, SIMULATOR_METRICS

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

_WARN_FIRST, _WARN_EVERY = 10, 100

MISSING_OUTCOME = "selflock/missing_outcome"
_REPORTED_FIELDS = (
    "success", "answered", "turns", "invalid_actions", "repeated_actions", "as_pos", "as_neg", "bt_pos", "bt_neg", "truncated"
)
""":class:`EpisodeStats` fields reported per sample as ``selflock/<field>``."""
_EPISODE_PROXIES = ("as_proxy", "bt_proxy")
"""Proxies of :data:`verl_selflock.diagnostics.metrics.RATIO_METRICS` reported per episode."""
EXTRA_INFO_KEYS = (
    "acc",
    *(METRIC_PREFIX + name for name in _REPORTED_FIELDS + SIMULATOR_METRICS + _EPISODE_PROXIES),
    MISSING_OUTCOME,
)
"""``reward_extra_info`` keys, identical for every sample (veRL stacks them by the first sample's
keys). ``acc`` = success, so veRL's ``val-core`` metrics report the success rate. ``sim_*`` come from the
environment's metrics of the same name (:data:`SIMULATOR_METRICS`; 0 for tasks without a simulator).

``as_proxy`` / ``bt_proxy`` are the episode's own proxies (AS +1 / Action rounds, BT +1 / Update rounds),
None where the episode has no such round: veRL's validation metrics drop None values before averaging
(``process_validation_metrics``), where a NaN would turn the whole mean into NaN. Validation thus reports
the mean of the per-episode proxies (veRL averages per prompt, then over prompts), where training's
``selflock/*`` pools rounds over the batch. No T3 keys: T3 never acts on evaluation rows (``split: test``), so they would always be 0."""


def _proxy(stats: EpisodeStats, name: str) -> float | None:
    """One episode's proxy; None (skipped by veRL's validation means) when it had no such round."""
    positive, rounds = (getattr(stats, column) for column in RATIO_METRICS[name])
    return positive / rounds if rounds > 0 else None


def reward_extra_info(stats: EpisodeStats | None) -> dict[str, float | None]:
    """Scalars for validation metrics; zero (proxies None, ``missing_outcome`` 1) when ``stats`` is None."""
    if stats is None:
        info: dict[str, float | None] = dict.fromkeys(EXTRA_INFO_KEYS, 0.0)
        info.update({METRIC_PREFIX + name: None for name in _EPISODE_PROXIES})
        info[MISSING_OUTCOME] = 1.0
        return info
    return {
        "acc": float(stats.success),
        **{METRIC_PREFIX + name: float(getattr(stats, name)) for name in _REPORTED_FIELDS},
        **{METRIC_PREFIX + key: float(stats.env_metrics.get(key, 0.0)) for key in SIMULATOR_METRICS},
        **{METRIC_PREFIX + name: _proxy(stats, name) for name in _EPISODE_PROXIES},
        MISSING_OUTCOME: 0.0,
    }


def episode_fields_of(non_tensor: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The agent loop's fields of one sample: ``tool_extra_fields`` (reward loop), else the sample's own
    columns (the legacy trainer spreads ``extra_fields`` keys into ``non_tensor_batch``)."""
    fields = non_tensor.get("tool_extra_fields")
    if isinstance(fields, Mapping) and fields.get(REWARD) is not None:
        return fields
    if non_tensor.get(REWARD) is not None:
        return {key: value for key, value in non_tensor.items() if key.startswith(PREFIX)}
    return None


@register(REWARD_MANAGER_NAME)
class ActiveReasoningRewardManager(RewardManagerBase):
    """Scores a trajectory with the outcome its environment computed (see the module docstring)."""

    def __init__(self, config: Any, tokenizer: Any, compute_score: Any = None, **kwargs: Any) -> None:
        # ``compute_score`` (veRL's default rule-based scorer) and reward-model kwargs are not used.
        super().__init__(config, tokenizer, compute_score)
        self.missing_outcome_count = 0

    async def run_single(self, data: DataProto) -> dict[str, Any]:
        # Multi-output agent loops: the last output carries the episode's outcome.
        item = data[len(data) - 1]
        stats = EpisodeStats.from_extra_fields(episode_fields_of(item.non_tensor_batch))
        if stats is None:
            self.missing_outcome_count += 1
            count = self.missing_outcome_count
            if count <= _WARN_FIRST or count % _WARN_EVERY == 0:  # loud at first, then sampled
                self._warn_missing(item.non_tensor_batch)
            return {"reward_score": 0.0, "reward_extra_info": reward_extra_info(None)}
        return {"reward_score": float(stats.reward), "reward_extra_info": reward_extra_info(stats)}

    def _warn_missing(self, non_tensor: Mapping[str, Any]) -> None:
        logger.warning(
            "active_reasoning reward manager: sample of data_source=%r has no %r in its agent-loop fields "
            "(was it produced by the active_reasoning agent loop? agent_name=%r); scoring 0.0 "
            "(%d such samples in this worker so far; logged for the first %d, then every %d-th)",
            non_tensor.get("data_source"),
            REWARD,
            non_tensor.get("agent_name"),
            self.missing_outcome_count,
            _WARN_FIRST,
            _WARN_EVERY,
        )
