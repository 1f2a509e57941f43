"""FloDial: the agent troubleshoots a fault by questioning a simulated user, guided by a flowchart."""

from verl_selflock.envs.flodial import env as _env  # noqa: F401  registers "flodial"
