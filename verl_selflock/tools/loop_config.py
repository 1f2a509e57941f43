"""Knobs of the ``tool_agent_arew`` agent loop: the keys of its agent-loop YAML entry, validated at
construction time (in the agent-loop worker) and on the driver (:mod:`verl_selflock.verl_adapter.tool_agent_checks`).

Everything else (tools, parser, turn caps, tool-response truncation) is veRL's ``ToolAgentLoop``
configuration, read from ``actor_rollout_ref.rollout.multi_turn`` exactly as veRL reads it. Plain Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from verl_selflock.tools.critique import ToolCritiqueConfig

__all__ = ["TOOL_AGENT_NAME", "TOOL_AGENT_TARGET", "ToolAgentArewConfig"]

TOOL_AGENT_NAME = "tool_agent_arew"
"""Name of the loop in veRL's agent-loop registry (``agent_name`` of a row, ``default_agent_loop``)."""
TOOL_AGENT_TARGET = "verl_selflock.verl_adapter.tool_agent_loop.ArewToolAgentLoop"
"""``_target_`` of the loop in an agent-loop YAML (a string, so the driver's checks import no veRL loop)."""


@dataclass(frozen=True)
class ToolAgentArewConfig:
    """Knobs of ``tool_agent_arew`` on top of veRL's ``ToolAgentLoop``; defaults change nothing in how
    veRL's loop generates (only the per-token critique fields and ``selflock_tool_*`` counts are added)."""

    critique: ToolCritiqueConfig = field(default_factory=ToolCritiqueConfig)
    """The critique rules (:class:`~verl_selflock.tools.critique.ToolCritiqueConfig`)."""
    max_turn_tokens: int | None = None
    """Most tokens one assistant turn may generate (the server's ``max_tokens``); None: as veRL's loop,
    which leaves the cap to the server (the whole ``rollout.response_length``)."""
    stop_after_tool_call: bool = False
    """Also stop a generation at the parser's tool-call end tag (``</tool_call>`` for ``hermes``; vLLM's
    ``stop`` strings, honoured by our CPU rollout too). Saves generating past a call; veRL's loop
    relies on the model's end-of-turn token instead. Needs a parser with such a tag."""

    def __post_init__(self) -> None:
        if isinstance(self.critique, Mapping) or self.critique is None:
            object.__setattr__(self, "critique", ToolCritiqueConfig.from_mapping(self.critique))
        elif not isinstance(self.critique, ToolCritiqueConfig):
            raise TypeError(f"{TOOL_AGENT_NAME}: critique must be a mapping of rules, got {self.critique!r}")
        cap = self.max_turn_tokens
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"{TOOL_AGENT_NAME}: max_turn_tokens must be a positive int or null, got {cap!r}")
        if not isinstance(self.stop_after_tool_call, bool):
            raise TypeError(
                f"{TOOL_AGENT_NAME}: stop_after_tool_call must be true or false, got {self.stop_after_tool_call!r}"
            )

    @classmethod
    def from_mapping(cls, knobs: Mapping[str, Any] | None) -> ToolAgentArewConfig:
        """From the knobs of an agent-loop YAML entry (``name`` / ``_target_`` / Hydra keys ignored)."""
        data = {
            str(k): v
            for k, v in (knobs or {}).items()
            if k not in ("name", "_target_") and not (str(k).startswith("_") and str(k).endswith("_"))
        }
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{TOOL_AGENT_NAME}: unknown agent-loop knob(s) {unknown}; known knobs: {known}")
        return cls(**data)
