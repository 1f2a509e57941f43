"""Our v1 trainer mode: veRL's sync trainer whose advantage step adds the AREW bonus.

The bonus is the paper's reweighting ``A_hat_t = A_t + lambda * u_t`` (AREW, arXiv 2603.12109; computed by
:func:`verl_selflock.algorithms.advantage.apply_arew_bonus`); this module is only its veRL wiring.

veRL's ``compute_advantage`` hands registered estimators neither critic values nor per-sample
fields, and the v1 trainer fetches a fixed list of fields from TransferQueue. veRL 0.9.1 lets a
plugin register a trainer mode (``trainer.v1.trainer_mode``); ours runs veRL's own advantage step
with the *base* estimator (so GAE gets its values, GRPO its multi-trajectory grouping, KL-in-reward
and rollout correction stay veRL's), then fetches the agent loops' ``extra_fields`` and the base
advantages, adds the bonus and writes the advantages back. ``igpo`` replaces veRL's advantage step
(:mod:`verl_selflock.verl_adapter.igpo_step`). With any estimator it logs the T3 metrics (``t3/*``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import transfer_queue as tq
from omegaconf import open_dict
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from verl_selflock.algorithms.advantage import apply_arew_bonus
from verl_selflock.contracts.names import SELFLOCK_ESTIMATORS, TRAINER_MODE
from verl_selflock.diagnostics.training import TrainingDiagnostics
from verl_selflock.verl_adapter.config_validation import (
    arew_config_of,
    igpo_config_of,
    igpo_scoring_mode_of,
    validate_selflock_config,
)
from verl_selflock.verl_adapter.igpo_step import igpo_advantage, t3_metrics
from verl_selflock.verl_adapter.jagged import padded
from verl_selflock.verl_adapter.private_names import metrics_file_path, padding_flags, response_to_nested

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))


@register_trainer(TRAINER_MODE)
class SelflockTrainer(PPOTrainerSync):
    """Synchronous PPO trainer (colocated rollout) with critique-aware advantage estimators."""

    def __init__(self, config) -> None:
        # Validated again here: the driver-side check does not run when a user builds the
        # TaskRunner themselves.
        validate_selflock_config(config)
        super().__init__(config=config)
        self.selflock_diagnostics = TrainingDiagnostics(config)

    def _init_resource_pool_mgr(self) -> None:
        """veRL's roles, with IGPO's packed scoring method on the actor's worker where IGPO scores packed
        (as veRL's own ``trainer_separate_async`` swaps in ``DetachActorWorker``)."""
        super()._init_resource_pool_mgr()
        if str(self.config.algorithm.adv_estimator) != "igpo" or igpo_scoring_mode_of(self.config) != "packed":
            return
        import ray
        from verl.trainer.ppo.utils import Role

        from verl_selflock.verl_adapter.igpo_worker import SelflockActorWorker

        for role in (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef):
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(SelflockActorWorker)
                break

    def fit(self, agent_loop_manager) -> None:
        super().fit(agent_loop_manager)
        self._print_outputs()

    def _print_outputs(self) -> None:
        """Say where this run's metrics and checkpoints went (veRL prints them scattered in its log)."""
        metrics_path = metrics_file_path(self)
        lines = [f"[verl-selflock] finished {self.global_steps - 1} training steps"]
        if metrics_path:
            lines.append(f"[verl-selflock] metrics (JSONL, one line per step): {os.path.abspath(metrics_path)}")
        if self.config.trainer.get("save_freq", -1) and self.config.trainer.save_freq > 0:
            lines.append(f"[verl-selflock] checkpoints: {os.path.abspath(self.config.trainer.default_local_dir)}")
        print("\n".join(lines), flush=True)

    def _compute_metrics(self, batch: KVBatchMeta, metrics, timing_raw, global_steps, epoch) -> None:
        """veRL's metrics plus the T3 metrics (``t3/*``) and the self-locking diagnostics (``selflock/*``)
        of the step's episodes."""
        super()._compute_metrics(batch, metrics, timing_raw, global_steps=global_steps, epoch=epoch)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        extra_fields = list(data["extra_fields"])
        padding = padding_flags(batch)
        metrics.update(t3_metrics(extra_fields, padding))
        episodes = [item for item, pad in zip(extra_fields, padding, strict=True) if not pad]
        self.selflock_diagnostics.record(episodes, metrics, step=int(global_steps))

    @contextlib.contextmanager
    def _base_estimator(self, name: str) -> Iterator[None]:
        """Let veRL's advantage step run ``name`` (the base) while the config says ``arew``."""
        algorithm = self.config.algorithm
        requested = algorithm.adv_estimator
        with open_dict(algorithm):
            algorithm.adv_estimator = name
        try:
            yield
        finally:
            with open_dict(algorithm):
                algorithm.adv_estimator = requested

    def _compute_advantage(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        estimator = str(self.config.algorithm.adv_estimator)
        if estimator == "igpo":
            return igpo_advantage(self, batch, metrics, igpo_config_of(self.config), igpo_scoring_mode_of(self.config))
        if estimator not in SELFLOCK_ESTIMATORS:
            return super()._compute_advantage(batch, metrics)

        arew = arew_config_of(self.config)
        with self._base_estimator(arew.base):
            batch = super()._compute_advantage(batch, metrics)

        data = tq.kv_batch_get(
            keys=batch.keys,
            partition_id=batch.partition_id,
            select_fields=["advantages", "response_mask", "extra_fields"],
        )
        # Both are jagged (one row per sample, its own response length): pad for the tensor maths.
        response_mask = data["response_mask"]
        advantages = padded(data["advantages"], 0.0)
        padded_mask = padded(response_mask, 0)
        extra_fields = list(data["extra_fields"])
        step = int(self.global_steps)
        advantages, arew_metrics = apply_arew_bonus(
            advantages, padded_mask, extra_fields, arew, global_step=step, is_padding=padding_flags(batch)
        )
        metrics.update(arew_metrics)
        output = TensorDict({"advantages": response_to_nested(advantages, response_mask)}, batch_size=len(batch))
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)
