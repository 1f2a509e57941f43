"""Settings of the IGPO estimator: the ``algorithm.igpo`` node of a veRL config (no veRL import)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from verl_selflock.algorithms.config_node import checked_kwargs

CONFIG_PATH = "algorithm.igpo"
INFO_GAIN_TYPES = ("prob_diff", "log_prob_diff")
NORM_MODES = ("joint", "separate")
UNFINISHED_MODES = ("outcome_only", "score")
SCORING_MODES = ("auto", "packed", "prefix")
PACKED_STRATEGIES = ("fsdp", "fsdp2")
"""Actor strategies whose engine runs the model's own ``transformers`` forward, which packed scoring calls."""
DEFAULT_BRIDGE = "<scratch>I now have enough information to give my final answer.</scratch>\n<answer>"
DEFAULT_SCORING_CHUNK_TOKENS = 2_097_152
"""2M tokens: ~120 MB of per-token fields on the driver and in TransferQueue per chunk (ids, positions,
masks, log-probs), against ~100M tokens for all prefixes of a PE-G paper step (512 prompts x 5, 10 turns),
while still filling one log-prob micro-batch of 16k tokens on each of 128 GPUs per call."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class IgpoConfig:
    """Validated ``algorithm.igpo`` settings (IGPO, arXiv 2510.14967, and its authors' code).

    Turn reward: the information gain ``p_t - p_{t-1}`` of the policy's belief in the ground-truth
    answer (``p`` = geometric-mean probability of the answer tokens, teacher-forced after the dialogue
    prefix), the outcome reward on the last turn; group z-scored by prompt, discounted backwards over
    turns, broadcast over each turn's tokens.
    """

    info_gain_type: str = "prob_diff"
    """``prob_diff`` (the paper: differences of ``p = exp(mean log-prob)``) or ``log_prob_diff``
    (differences of the mean log-probs; the authors' shipped script)."""
    norm_mode: str = "joint"
    """``joint``: z-score IG and outcome rewards of a prompt group together (the paper); ``separate``:
    outcome rewards among themselves, IG rewards among themselves (the authors' script)."""
    norm_by_std: bool = True
    """Divide by the group's standard deviation (+ ``epsilon``); False only subtracts the mean."""
    epsilon: float = 1e-6
    """Added to the standard deviation before dividing (> 0)."""
    gamma: float = 1.0
    """Discount over turns in [0, 1]: ``A_t = r~_t + gamma * A_{t+1}`` (1.0 in all the authors' configs)."""
    ig_weight: float = 1.0
    """Scale of the IG rewards before normalisation (>= 0)."""
    outcome_weight: float = 1.0
    """Scale of the outcome reward before normalisation (>= 0)."""
    unfinished: str = "outcome_only"
    """Rows whose episode stopped before a final turn (T3 cut, turn cap, response budget):
    ``outcome_only`` (the reference: its gains no longer line up with the turns, so the row gets the
    outcome alone) or ``score`` (their turns are scored like any other; the outcome still sits on the
    last turn kept)."""
    bridge: str = DEFAULT_BRIDGE
    """Text written between the dialogue prefix (which ends with an assistant header) and the
    ground-truth answer: a short statement that the agent is ready, then the opening ``<answer>``. Not
    scored. Nothing follows the answer: the reference's closing tag and end-of-turn token are never
    scored and, under causal attention, cannot change the answer tokens' log-probs."""
    scoring: str = "auto"
    """How the actor scores: ``packed`` (one forward per trajectory: its turn prefixes share the dialogue
    under a tree attention mask, ~1 trajectory of tokens), ``prefix`` (one causal forward per turn prefix
    through veRL's ``compute_log_prob``, ~T/2 trajectories), or ``auto``: packed wherever the actor's
    engine allows it (FSDP, no fused kernels), else prefix. Both give the same scores up to float
    summation order."""
    scoring_chunk_tokens: int = DEFAULT_SCORING_CHUNK_TOKENS
    """Most tokens of scoring sequences built on the driver and put into TransferQueue at once: the
    step's sequences are scored in consecutive chunks of at most this many tokens, one
    ``compute_log_prob`` call each (a sequence longer than this is a chunk of its own). Bounds driver
    memory and the scoring partition; results do not depend on it."""

    def __post_init__(self) -> None:
        if self.info_gain_type not in INFO_GAIN_TYPES:
            raise ValueError(f"{CONFIG_PATH}.info_gain_type must be one of {list(INFO_GAIN_TYPES)}, got {self.info_gain_type!r}")
        if self.norm_mode not in NORM_MODES:
            raise ValueError(f"{CONFIG_PATH}.norm_mode must be one of {list(NORM_MODES)}, got {self.norm_mode!r}")
        if not isinstance(self.norm_by_std, bool):
            raise ValueError(f"{CONFIG_PATH}.norm_by_std must be true or false, got {self.norm_by_std!r}")
        if not _is_number(self.epsilon) or not math.isfinite(self.epsilon) or self.epsilon <= 0:
            raise ValueError(f"{CONFIG_PATH}.epsilon must be a finite number > 0, got {self.epsilon!r}")
        if not _is_number(self.gamma) or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"{CONFIG_PATH}.gamma must be a number in [0, 1], got {self.gamma!r}")
        for name in ("ig_weight", "outcome_weight"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{CONFIG_PATH}.{name} must be a finite number >= 0, got {value!r}")
        if self.unfinished not in UNFINISHED_MODES:
            raise ValueError(f"{CONFIG_PATH}.unfinished must be one of {list(UNFINISHED_MODES)}, got {self.unfinished!r}")
        if self.scoring not in SCORING_MODES:
            raise ValueError(f"{CONFIG_PATH}.scoring must be one of {list(SCORING_MODES)}, got {self.scoring!r}")
        if not isinstance(self.bridge, str):
            raise ValueError(f"{CONFIG_PATH}.bridge must be a string, got {self.bridge!r}")
        if not isinstance(self.scoring_chunk_tokens, int) or isinstance(self.scoring_chunk_tokens, bool) or (
            self.scoring_chunk_tokens < 1
        ):
            raise ValueError(
                f"{CONFIG_PATH}.scoring_chunk_tokens must be a whole number of tokens >= 1 "
                f"(default {DEFAULT_SCORING_CHUNK_TOKENS}), got {self.scoring_chunk_tokens!r}"
            )
        for name in ("epsilon", "gamma", "ig_weight", "outcome_weight"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> IgpoConfig:
        """Build from the ``algorithm.igpo`` node (a dict or an OmegaConf ``DictConfig``; None: defaults).

        Raises:
            ValueError: on an unknown key (listing the known ones) or an invalid value (naming
                ``algorithm.igpo.<field>``).
        """
        if mapping is None:
            return cls()
        return cls(**checked_kwargs(cls, mapping, CONFIG_PATH))


def resolve_scoring_mode(requested: str, strategy: str, fused_kernels: bool) -> str:
    """``packed`` or ``prefix``: how the actor scores for ``algorithm.igpo.scoring`` = ``requested``.

    Packed scoring runs the actor's own ``transformers`` forward with a tree attention mask
    (:mod:`verl_selflock.verl_adapter.igpo_worker`): not on other engines (Megatron), nor with
    ``model.use_fused_kernels`` (veRL then replaces the forward with one that returns no logits).
    ``auto`` picks packed wherever it is available.

    Args:
        requested: ``auto``, ``packed`` or ``prefix``.
        strategy: ``actor_rollout_ref.actor.strategy``.
        fused_kernels: ``actor_rollout_ref.model.use_fused_kernels``.

    Raises:
        ValueError: ``packed`` where it is not available, saying what to change.
    """
    reasons = []
    if strategy not in PACKED_STRATEGIES:
        reasons.append(f"actor_rollout_ref.actor.strategy={strategy} (packed scoring needs one of {list(PACKED_STRATEGIES)})")
    if fused_kernels:
        reasons.append("actor_rollout_ref.model.use_fused_kernels=true (the fused forward returns no logits)")
    if requested == "prefix" or (requested == "auto" and reasons):
        return "prefix"
    if reasons:
        raise ValueError(
            f"{CONFIG_PATH}.scoring=packed is not available with " + "; ".join(reasons)
            + f": set {CONFIG_PATH}.scoring=prefix (one causal forward per turn prefix, ~T/2 times the tokens) or auto"
        )
    return "packed"
