"""Active-reasoning tasks: plain-Python environments, independent of veRL."""

# Built-in tasks register themselves on import (make_env imports this package first).
from verl_selflock.envs import flodial as _flodial  # noqa: E402,F401  registers "flodial"
from verl_selflock.envs import mediq as _mediq  # noqa: E402,F401  registers "mediq"
from verl_selflock.envs import pe as _pe  # noqa: E402,F401  registers "pe"
from verl_selflock.envs import tau2 as _tau2  # noqa: E402,F401  registers "tau2_telecom" (tau2 imported lazily)
from verl_selflock.envs.base import (
    ActiveReasoningEnv,
    EnvContext,
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

__all__ = [
    "ActiveReasoningEnv",
    "EnvContext",
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
