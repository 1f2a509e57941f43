"""MediQ: the agent diagnoses by questioning a simulated patient."""

from verl_selflock.envs.mediq import env as _env  # noqa: F401  registers "mediq"
