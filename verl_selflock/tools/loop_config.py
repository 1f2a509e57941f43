"""Knobs of the ``tool_agent_arew`` agent loop, validated at construction time (in the agent-loop worker)
and on the driver (:mod:`verl_selflock.verl_adapter.tool_agent_checks`).

Where they come from: the top-level ``selflock_tool_agent`` node of the veRL config (:data:`TOOL_CONFIG_KEY`),
which veRL hands whole to every agent loop it builds, on every node, over the keys of the loop's agent-loop
YAML entry (if a YAML declares it), over the defaults below; as ``selflock_agent_loop`` for
``active_reasoning``. Recipes write::

    selflock_tool_agent:
      max_turn_tokens: 48
      critique: {unaided_answer: -1}

and need no ``agent_loop_config_path`` (the plugin registers the loop by name). Knobs used to reach the
workers in a YAML file written to the resolving node's cache (``${selflock.tool_agent_yaml:...}``), which
no other node has.

Everything else (tools, parser, turn caps, tool-response truncation) is veRL's ``ToolAgentLoop``
configuration, read from ``actor_rollout_ref.rollout.multi_turn`` exactly as veRL reads it. Plain Python.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from verl_selflock.tools.critique import ToolCritiqueConfig

__all__ = ["TOOL_AGENT_NAME", "TOOL_AGENT_TARGET", "TOOL_CONFIG_KEY", "ToolAgentArewConfig"]

TOOL_AGENT_NAME = "tool_agent_arew"
"""Name of the loop in veRL's agent-loop registry (``agent_name`` of a row, ``default_agent_loop``)."""
TOOL_AGENT_TARGET = "verl_selflock.verl_adapter.tool_agent_loop.ArewToolAgentLoop"
"""``_target_`` of the loop in an agent-loop YAML (a string, so the driver's checks import no veRL loop)."""
TOOL_CONFIG_KEY = "selflock_tool_agent"
"""Top-level key of the veRL config that holds the loop's knobs."""


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
    def knob_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, knobs: Mapping[str, Any] | None, where: str = "") -> ToolAgentArewConfig:
        """From the knobs of the ``selflock_tool_agent`` node and/or an agent-loop YAML entry (``name`` /
        ``_target_`` / Hydra keys ignored).

        Args:
            knobs: the knobs as plain Python (or a mapping of them).
            where: what an error names first (the config key, the YAML file); nothing if empty.

        Raises:
            ValueError: an unknown knob (with a close match, if any, and the known knobs) or a bad value.
        """
        data = {
            str(k): v
            for k, v in (knobs or {}).items()
            if k not in ("name", "_target_") and not (str(k).startswith("_") and str(k).endswith("_"))
        }
        prefix = f"{where}: " if where else ""
        known = cls.knob_names()
        unknown = sorted(set(data) - set(known))
        if unknown:
            guesses = [match for key in unknown for match in difflib.get_close_matches(key, known, n=1)]
            hint = f" (did you mean {', '.join(repr(g) for g in guesses)}?)" if guesses else ""
            raise ValueError(
                f"{prefix}unknown agent-loop knob(s) {unknown} of {TOOL_AGENT_NAME}{hint}; known knobs: {known}"
            )
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{prefix}{err}") from None
