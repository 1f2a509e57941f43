"""Clients for the LLMs an episode talks to: simulated users/patients, or a policy under evaluation."""

from verl_selflock.simulators.client import (
    ChatClient,
    ChatReply,
    SimulatorConfig,
    SimulatorConfigError,
    shared_client,
)
from verl_selflock.simulators.preflight import SimulatorUnreachableError, ensure_reachable

__all__ = [
    "ChatClient",
    "ChatReply",
    "SimulatorConfig",
    "SimulatorConfigError",
    "SimulatorUnreachableError",
    "ensure_reachable",
    "shared_client",
]
