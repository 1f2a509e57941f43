"""Preference Estimation (PE-G gated, PE-F full): the agent elicits a hidden weight vector by pairwise queries."""

from verl_selflock.envs.pe import env as _env  # noqa: F401  registers "pe"
