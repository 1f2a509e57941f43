"""Our names in veRL's advantage-estimator registry.

``arew`` and ``igpo`` are registered so that ``algorithm.adv_estimator=arew`` is a name veRL knows. The
computation itself happens in our trainer mode (:mod:`verl_selflock.verl_adapter.trainer_mode`), because
veRL's ``compute_advantage`` passes registered estimators neither critic values nor the per-turn
critiques, nor can a registered estimator score turns with the actor as IGPO must. Reaching one of
these functions means the run bypassed our trainer mode: fail loudly rather than train without them.
"""

from __future__ import annotations

from typing import Any

import torch
from verl.trainer.ppo.core_algos import register_adv_est

from verl_selflock.contracts.names import TRAINER_MODE


def _guard(name: str, lacks: str):
    """An estimator that only raises: ``name`` runs inside the ``selflock`` trainer mode, never here."""

    def guard(
        token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config: Any = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError(
            f"algorithm.adv_estimator={name} reached veRL's generic estimator call, which has {lacks}. "
            f"Run it with trainer.use_v1=true trainer.v1.trainer_mode={TRAINER_MODE}."
        )

    guard.__name__ = guard.__qualname__ = f"compute_{name}_outcome_advantage"
    guard.__doc__ = f"Guard: {name} runs inside the ``selflock`` trainer mode's advantage step, never here."
    return guard


compute_arew_outcome_advantage = register_adv_est("arew")(_guard("arew", "no critiques and no critic values"))
compute_igpo_outcome_advantage = register_adv_est("igpo")(
    _guard("igpo", "no turn layout, no ground truth and no actor to score with")
)
