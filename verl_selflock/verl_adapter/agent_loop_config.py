"""Knobs of the ``active_reasoning`` agent loop: the keys of its agent-loop YAML entry (``agent_loop.yaml``
beside this file documents each one). Plain Python; validated at construction time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from verl_selflock.algorithms.t3 import T3Config
from verl_selflock.envs.base import registered_progress_signals
from verl_selflock.simulators import SimulatorConfig

__all__ = ["ActiveReasoningLoopConfig", "plain"]


@dataclass
class ActiveReasoningLoopConfig:
    """Knobs of the ``active_reasoning`` agent loop (keys of its agent-loop YAML entry)."""

    max_turn_tokens: int = 512
    """Most tokens one agent turn may generate (the papers' "max response per turn"), passed to the
    server as ``max_tokens``; further capped by what is left of ``rollout.response_length``."""
    max_obs_tokens: int = 512
    """Most tokens of one observation's *text* (before the chat template wraps it)."""
    max_turns: int | None = None
    """Override the episode length in the row's env spec (even, >= 2); None: use the row's."""
    min_turn_tokens: int = 16
    """Do not start another turn (do not even append its observation) unless at least this many
    tokens could be generated in it; the episode ends as truncated instead."""
    stop_on_closing_tag: bool = False
    """Also ask the server to stop on the environment's closing tags (``</interact>`` / ``</answer>``; ``stop`` and
    ``include_stop_str_in_output`` sampling params: vLLM understands them; our token-level cut stays
    the authority). Saves generating past the tag; leave off for servers that reject unknown keys.
    Refused with ``rollout.name=sglang`` (veRL runs SGLang without its tokenizer, so stop strings never
    match there)."""
    obs_truncation_marker: str = " ...(truncated)"
    """Appended to a capped observation (counted inside ``max_obs_tokens``)."""
    simulator: dict[str, Any] | None = None
    """OpenAI-compatible endpoint of the simulated user/patient for tasks that have one (MediQ, FloDial,
    tau2): keys of :class:`verl_selflock.simulators.SimulatorConfig`. One client per worker process is
    shared by all its episodes (concurrency limit, reply cache)."""
    counterfactual_bt: bool = True
    """Honour environments' requests for counterfactual branches (``StepResult.counterfactual_observation``,
    MediQ's counterfactual BT critique) in training rollouts: the next turn is also sampled after the
    counterfactual observation, on a side branch whose tokens never enter the response. False: never."""

    t3: T3Config | Mapping[str, Any] | None = None
    """T3 truncation settings (``t3.enabled``, ``signal``, ``k``, ``delta_min``, ``min_turn``); off by default."""

    def __post_init__(self) -> None:
        if self.simulator is not None:
            self.simulator = SimulatorConfig.from_mapping(self.simulator).as_dict()
        self.t3 = T3Config.from_mapping(self.t3)
        self.t3.check_signal_known(registered_progress_signals())
        for name in ("max_turn_tokens", "max_obs_tokens", "min_turn_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"active_reasoning agent loop: {name} must be a positive int, got {value!r}")
        if self.max_turns is not None and (self.max_turns < 2 or self.max_turns % 2):
            raise ValueError(f"active_reasoning agent loop: max_turns must be even and >= 2, got {self.max_turns!r}")


def plain(node: Any) -> Any:
    """An OmegaConf node of the agent-loop YAML as plain Python (Hydra hands nested mappings as DictConfig)."""
    if node is None or isinstance(node, T3Config):
        return node
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover  (omegaconf ships with veRL)
        pass
    return dict(node) if isinstance(node, Mapping) else node
