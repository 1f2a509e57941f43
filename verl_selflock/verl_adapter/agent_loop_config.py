"""Knobs of the ``active_reasoning`` agent loop (``agent_loop.yaml`` beside this file documents each one).
Plain Python; validated at construction time.

Where they come from (:func:`loop_config_for`): the top-level ``selflock_agent_loop`` node of the veRL
config, which veRL hands whole to every agent loop it builds (``trainer_config``), in every agent-loop
worker on every node, over the keys of the loop's agent-loop YAML entry, over the defaults below. Recipes
write::

    selflock_agent_loop:
      max_turns: 8
      t3: {enabled: true, k: 2}
      simulator: {base_url: http://sim-node:8000/v1, model: Qwen/Qwen2.5-14B-Instruct}

and need no ``agent_loop_config_path`` (the plugin registers the loop by name). Knobs used to reach the
workers in a YAML file written to the resolving node's cache, which no other node has (issue 14).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from verl_selflock.algorithms.t3 import T3Config
from verl_selflock.envs.base import registered_progress_signals
from verl_selflock.simulators import SimulatorConfig

__all__ = [
    "AGENT_LOOP_YAML",
    "CONFIG_KEY",
    "ActiveReasoningLoopConfig",
    "knob_names",
    "loop_config_for",
    "merged_knobs",
    "plain",
    "pop_entry_knobs",
    "run_knobs",
]

CONFIG_KEY = "selflock_agent_loop"
"""Top-level key of the veRL config that holds the loop's knobs."""
AGENT_LOOP_YAML = str(Path(__file__).with_name("agent_loop.yaml"))
"""The agent-loop YAML shipped inside the package (``${selflock.agent_loop_yaml:}``): present wherever the
package is installed, unlike a file written at run time."""


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


def knob_names() -> list[str]:
    return [field.name for field in fields(ActiveReasoningLoopConfig)]


def pop_entry_knobs(kwargs: MutableMapping[str, Any], names: Iterable[str] | None = None) -> dict[str, Any]:
    """Take the loop's knobs out of the keyword arguments Hydra passed to the loop (the keys of its
    agent-loop YAML entry); what is left (``name``, veRL's own arguments) goes to ``AgentLoopBase``.

    Args:
        kwargs: the loop's keyword arguments, changed in place.
        names: the loop's knob names; default this loop's (:func:`knob_names`). Another of our loops
            (``tool_agent_arew``) passes its own.
    """
    return {name: kwargs.pop(name) for name in (knob_names() if names is None else names) if name in kwargs}


def run_knobs(trainer_config: Any, key: str = CONFIG_KEY) -> dict[str, Any]:
    """The run's ``key`` node (default ``selflock_agent_loop``) as plain Python; {} when the config has none."""
    node = trainer_config.get(key, None) if hasattr(trainer_config, "get") else None
    if node is None:
        return {}
    knobs = plain(node)
    if not isinstance(knobs, Mapping):
        raise TypeError(f"{key} must be a mapping of agent-loop knobs, got {type(knobs).__name__}")
    return {str(name): value for name, value in knobs.items()}


def merged_knobs(trainer_config: Any, entry_knobs: Mapping[str, Any] | None, key: str = CONFIG_KEY) -> dict[str, Any]:
    """The run's ``key`` node over the YAML entry's knobs, as plain Python; a mapping knob set in both
    places is merged key by key (shared by every loop of ours that reads a config node)."""
    knobs = {name: plain(value) for name, value in (entry_knobs or {}).items()}
    for name, value in run_knobs(trainer_config, key).items():
        below = knobs.get(name)
        knobs[name] = {**below, **value} if isinstance(below, Mapping) and isinstance(value, Mapping) else value
    return knobs


def loop_config_for(trainer_config: Any, entry_knobs: Mapping[str, Any] | None = None) -> ActiveReasoningLoopConfig:
    """The loop's knobs for a run: ``selflock_agent_loop`` over the YAML entry's keys over the defaults.

    A mapping knob (``simulator``, ``t3``) set in both places is merged key by key, so a recipe can keep
    the endpoint in a YAML entry and tune ``simulator.timeout_s`` in the config.

    Args:
        trainer_config: the whole veRL config (``AgentLoopBase.config``), as every agent-loop worker gets it.
        entry_knobs: the knobs of the loop's agent-loop YAML entry (:func:`pop_entry_knobs`).
    """
    knobs = merged_knobs(trainer_config, entry_knobs)
    unknown = sorted(set(knobs) - set(knob_names()))
    if unknown:  # the driver names close matches first (config_validation); this is the worker's last word
        raise ValueError(f"{CONFIG_KEY}: unknown active_reasoning agent-loop knob(s) {unknown}; known: {knob_names()}")
    return ActiveReasoningLoopConfig(**knobs)
