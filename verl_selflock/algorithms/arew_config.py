"""Settings of the AREW critique bonus: the ``algorithm.arew`` node of a veRL config.

Building an :class:`ArewConfig` validates every field and imports nothing from veRL;
:meth:`ArewConfig.validate_base` checks ``base`` against an estimator registry that the caller passes
(veRL's, from :func:`verl_selflock.verl_adapter.config_validation.validate_selflock_config`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from verl_selflock.algorithms.config_node import checked_kwargs
from verl_selflock.contracts.names import SELFLOCK_ESTIMATORS

CONFIG_PATH = "algorithm.arew"
"""Where the node lives in veRL's config; every error message names ``CONFIG_PATH.<field>``."""

TOKEN_LEVEL_MODES = ("minority_fixed", "fixed_pos", "fixed_neg", "abs_sum")
"""Modes that normalise by the number of +1 / -1 *tokens* of a trajectory."""
TURN_LEVEL_MODES = ("turn", "step_abs_sum")
"""Modes that normalise by the number of positive / negative *turns* of a trajectory."""
MODES = TOKEN_LEVEL_MODES + TURN_LEVEL_MODES
CHANNELS = ("both", "as", "bt")
NEG_CAPS = ("none", "prefix", "suffix")
ONE_SIDED = ("zero", "clamp")
BUILTIN_BASES = ("gae", "grpo")
"""Base estimators known without importing veRL (both are registered by veRL itself)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class ArewConfig:
    """Validated ``algorithm.arew`` settings.

    The bonus is ``A_hat = A_base + response_mask * bonus`` (paper: ``A_t + lambda * u_t`` with
    ``u_t = +1/|P|`` on positively critiqued turns and ``-1/|N|`` on negatively critiqued ones), so it
    only moves credit *within* a trajectory; see :func:`verl_selflock.algorithms.arew.compute_arew_bonus`.
    """

    lam: float = 0.2
    """Bonus scale lambda, finite and >= 0. 0 disables the bonus (advantages stay bit-identical to
    the base). Its meaning depends on ``mode``: a per-token magnitude for the token-level modes, a
    per-trajectory budget for the turn-level ones. Paper values (``minority_fixed``): PE-G 0.2, PE-F 1.0,
    MediQ 1.0, FloDial 0.5; tau2 used 50 with ``step_abs_sum``."""

    mode: str = "minority_fixed"
    """How a trajectory's bonus is normalised. S+ / S- are its numbers of +1 / -1 tokens, |P| / |N| its
    numbers of positive / negative turns.

    * ``minority_fixed`` (default, the authors' setting for PE, MediQ, FloDial): the minority class gets
      ``lam`` per token, the majority class ``lam * minority / majority`` per token; the token sum is 0.
    * ``fixed_pos``: ``+lam`` per positive token, ``-lam * S+/S-`` per negative token.
    * ``fixed_neg``: ``-lam`` per negative token, ``+lam * S-/S+`` per positive token.
    * ``abs_sum``: ``+lam / (2 S+)`` per positive token, ``-lam / (2 S-)`` per negative token.
    * ``turn`` (the paper's formula): each positive turn gets ``+lam/|P|`` and each negative turn
      ``-lam/|N|``, spread evenly over the turn's response tokens.
    * ``step_abs_sum`` (the authors' code form of the same formula): ``+lam/(2|P|)`` and
      ``-lam/(2|N|)`` per turn, i.e. ``lam_step_abs_sum = 2 * lam_turn`` gives the same bonus as ``turn``.
      Also the only mode with ``fallbacks``.
    """

    base: str = "gae"
    """Name of the base advantage estimator the bonus is added to: ``gae``, ``grpo`` or any other name
    in veRL's ``ADV_ESTIMATOR_REGISTRY`` (checked by :meth:`validate_base`). Never one of our own
    estimators (``arew``, ``igpo``): they are registered too, but only run as ``algorithm.adv_estimator``."""

    channels: str = "both"
    """Which critiques count: ``both`` (every critique), ``as`` (Action-round critiques only,
    ``contracts.critique.CHANNEL_AS``) or ``bt`` (Update-round critiques only, ``contracts.critique.CHANNEL_BT``). Critiques
    on the other channel are treated as 0 (so they are zero turns for the ``step_abs_sum`` fallbacks)."""

    start_step: int = 0
    """First global step (veRL counts from 1) at which the bonus is active, >= 0."""

    end_step: int = -1
    """First global step at which the bonus is off again; -1 = never. Active iff
    ``start_step <= global_step < end_step``; otherwise > ``start_step``."""

    noise_alpha: float = 0.0
    """Critique-noise ablation of the paper: the probability, in [0, 1], that a nonzero turn critique is
    flipped (+1 <-> -1), drawn independently per turn (all tokens of a turn flip together). 0 = no noise,
    1 = every nonzero critique flipped."""

    noise_seed: int = 0
    """Seed of the critique noise. The generator of step ``s`` is seeded from ``(noise_seed, s)``: steps
    get different flips, reruns get the same ones."""

    neg_cap: str = "none"
    """Turn-level modes only. When a trajectory has more negative than positive turns (|N| > |P|), keep
    only its first (``prefix``) or last (``suffix``) |P| negative turns; the others count as 0. ``none``
    keeps all. Applied after the ``step_abs_sum`` fallbacks."""

    fallbacks: bool = True
    """``step_abs_sum`` only (ignored by the other modes). If a trajectory has negative turns but no
    positive one, its ``ELIGIBLE`` zero turns become positive; if it has positive turns but no negative
    one, its zero turns become negative. Neither fallback touches the trajectory's final turn or its
    ``EXEMPT`` turns (as in the authors' code) (turn roles:
    :class:`verl_selflock.contracts.critique.FallbackRole`; ``EXEMPT`` = 0 through no fault of the agent, e.g. a
    failed simulated user)."""

    one_sided: str = "zero"
    """Trajectories whose critiques (after fallbacks) are all of one sign: ``zero`` (default) gives them no
    bonus, so every trajectory's bonus sums to 0 (the paper's safety argument: the outcome advantage alone
    sets the trajectory's direction). ``clamp`` (a published sketch) clamps the empty side's count to 1,
    so such a trajectory keeps its one-signed bonus and is NOT zero-sum."""

    def __post_init__(self) -> None:
        self._check_choice("mode", MODES)
        self._check_choice("channels", CHANNELS)
        self._check_choice("neg_cap", NEG_CAPS)
        self._check_choice("one_sided", ONE_SIDED)

        if not _is_number(self.lam) or not math.isfinite(self.lam) or self.lam < 0:
            raise ValueError(f"{CONFIG_PATH}.lam must be a finite number >= 0, got {self.lam!r}")

        if not isinstance(self.base, str) or not self.base:
            raise ValueError(f"{CONFIG_PATH}.base must be a non-empty estimator name, got {self.base!r}")
        if self.base in SELFLOCK_ESTIMATORS:
            # Our estimators run only as algorithm.adv_estimator (inside our trainer mode); as a base they
            # would reach veRL's generic estimator call and fail in the first training step.
            raise ValueError(
                f"{CONFIG_PATH}.base must name a base advantage estimator that the bonus is added to "
                f"(e.g. one of {list(BUILTIN_BASES)}, or rloo, reinforce_plus_plus, ...), not {self.base!r}, "
                f"which is one of our own estimators ({', '.join(SELFLOCK_ESTIMATORS)})"
            )

        if not _is_int(self.start_step) or self.start_step < 0:
            raise ValueError(f"{CONFIG_PATH}.start_step must be an integer >= 0, got {self.start_step!r}")
        if not _is_int(self.end_step) or (self.end_step != -1 and self.end_step <= self.start_step):
            raise ValueError(
                f"{CONFIG_PATH}.end_step must be -1 (no end) or an integer > start_step={self.start_step}, "
                f"got {self.end_step!r}"
            )

        if not _is_number(self.noise_alpha) or not 0.0 <= self.noise_alpha <= 1.0:
            raise ValueError(f"{CONFIG_PATH}.noise_alpha must be a number in [0, 1], got {self.noise_alpha!r}")
        if not _is_int(self.noise_seed):
            raise ValueError(f"{CONFIG_PATH}.noise_seed must be an integer, got {self.noise_seed!r}")

        if self.neg_cap != "none" and self.mode not in TURN_LEVEL_MODES:
            raise ValueError(
                f"{CONFIG_PATH}.neg_cap={self.neg_cap} applies to the turn-level modes {list(TURN_LEVEL_MODES)} "
                f"only, got mode={self.mode}"
            )
        if not isinstance(self.fallbacks, bool):
            raise ValueError(f"{CONFIG_PATH}.fallbacks must be true or false, got {self.fallbacks!r}")

        # YAML may spell a float as an int (lam: 1); store floats so the config prints and compares alike.
        object.__setattr__(self, "lam", float(self.lam))
        object.__setattr__(self, "noise_alpha", float(self.noise_alpha))

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise ValueError(f"{CONFIG_PATH}.{name} must be one of {list(allowed)}, got {value!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> ArewConfig:
        """Build from the ``algorithm.arew`` node (an OmegaConf ``DictConfig`` or a dict).

        Args:
            mapping: the node; ``None`` or empty gives the defaults.

        Raises:
            ValueError: on an unknown key (the message lists the known ones) or an invalid value (the
                message names ``algorithm.arew.<field>`` and, for choices, the allowed values).
        """
        if mapping is None:
            return cls()
        return cls(**checked_kwargs(cls, mapping, CONFIG_PATH))

    def validate_base(self, registry: Mapping[str, Any]) -> None:
        """Check that ``base`` names an advantage estimator of ``registry``.

        Args:
            registry: estimator name -> function, e.g. veRL's ``ADV_ESTIMATOR_REGISTRY``
                (:func:`verl_selflock.verl_adapter.private_names.adv_estimator_registry`).

        Raises:
            ValueError: naming the known estimators.
        """
        if self.base not in registry or self.base in SELFLOCK_ESTIMATORS:
            known = sorted(str(name) for name in registry if name not in SELFLOCK_ESTIMATORS)
            raise ValueError(
                f"{CONFIG_PATH}.base must be one of veRL's advantage estimators {known}, got {self.base!r}"
            )

    def is_active(self, global_step: int) -> bool:
        """Whether the bonus applies at ``global_step``: ``start_step <= global_step < end_step``."""
        return self.start_step <= global_step and (self.end_step == -1 or global_step < self.end_step)
