"""Active-reasoning tasks: plain-Python environments, independent of veRL."""

from verl_selflock.envs.base import (
    ActiveReasoningEnv,
    EpisodeResult,
    ProgressSignal,
    RoundKind,
    StepResult,
    env_class,
    make_env,
    register_env,
    registered_envs,
    round_kind,
)

# Built-in tasks register themselves on import (make_env imports this package first).
from verl_selflock.envs import pe as _pe  # noqa: E402,F401  registers "pe"

__all__ = [
    "ActiveReasoningEnv",
    "EpisodeResult",
    "ProgressSignal",
    "RoundKind",
    "StepResult",
    "env_class",
    "make_env",
    "register_env",
    "registered_envs",
    "round_kind",
]
