"""The AREW step of the advantage computation: base advantages in, reweighted advantages out.

veRL's own advantage code computes the base estimator (GAE with the critic's values, GRPO, RLOO,
...); this module adds the zero-sum critique bonus of AREW on top. Returns (critic targets) are
never touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from verl_selflock.algorithms.arew import ArewConfig, compute_arew_bonus
from verl_selflock.algorithms.critique_batch import collate_critiques


def apply_arew_bonus(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    extra_fields: Sequence[Mapping[str, Any] | None],
    config: ArewConfig,
    global_step: int,
    is_padding: Sequence[bool] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """A_hat = A_base + response_mask * bonus.

    Args:
        advantages: (bs, response_length) base advantages from veRL's estimator.
        response_mask: (bs, response_length), 1 on tokens the policy generated, 0 on observation
            and padding tokens.
        extra_fields: per-sample ``AgentLoopOutput.extra_fields`` dicts in batch order, carrying the
            per-token fields of :mod:`verl_selflock.contracts.critique`. Samples without them get no bonus.
        config: validated ``algorithm.arew`` settings.
        global_step: veRL's global step (1 for the first training step), for the active window and
            the critique-noise seed.
        is_padding: per sample, True for the rows veRL added to pad the batch to a multiple of its
            data-parallel size (not episodes): left out of every ``arew/*`` metric. None: no padding.

    Returns:
        (advantages with the bonus added, ``arew/*`` metrics). ``advantages`` is returned unchanged
        (the same tensor) when lambda is 0, the window is inactive, or no sample has critiques.
    """
    bs, width = advantages.shape
    critiques = collate_critiques(extra_fields, width)
    padding = torch.as_tensor([False] * bs if is_padding is None else list(is_padding), dtype=torch.bool)
    counted = ~padding
    bonus, metrics = compute_arew_bonus(
        critiques.critique,
        critiques.channel,
        critiques.turn_ids,
        critiques.fallback_eligible,
        response_mask,
        config,
        global_step,
        counted_rows=None if is_padding is None else counted,
    )
    missing_rows = ~critiques.has_critique
    missing = int((missing_rows & counted).sum())
    metrics["arew/samples_without_critique"] = float(missing)
    metrics["arew/frac_samples_without_critique"] = missing / max(int(counted.sum()), 1)
    if config.lam == 0 or not metrics.get("arew/active", 0.0) or bool(missing_rows.all()):
        return advantages, metrics
    # compute_arew_bonus already returns exactly 0.0 where response_mask is 0 (A + mask * bonus).
    return advantages + bonus.to(advantages.dtype), metrics
