"""Advantage-side algorithms of verl-selflock as pure torch functions (no veRL import)."""

from verl_selflock.algorithms.arew import apply_critique_noise, compute_arew_bonus, make_noise_generator
from verl_selflock.algorithms.arew_config import ArewConfig

__all__ = ["ArewConfig", "apply_critique_noise", "compute_arew_bonus", "make_noise_generator"]
