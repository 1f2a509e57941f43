"""tau2-bench telecom (dual control): the agent and a simulated user share a phone's state."""

from verl_selflock.envs.tau2 import env as _env  # noqa: F401  registers "tau2_telecom"
