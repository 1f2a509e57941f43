"""Active-reasoning tasks: plain-Python environments, independent of veRL."""

from verl_selflock.envs.base import (
    ActiveReasoningEnv,
    EpisodeResult,
    RoundKind,
    StepResult,
    make_env,
    register_env,
    registered_envs,
    round_kind,
)

__all__ = [
    "ActiveReasoningEnv",
    "EpisodeResult",
    "RoundKind",
    "StepResult",
    "make_env",
    "register_env",
    "registered_envs",
    "round_kind",
]
