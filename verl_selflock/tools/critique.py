"""Per-turn critiques of a tool-using agent, inferred from the interaction itself.

The rules of the tau2 setting of the AREW paper (arXiv 2603.12109), for any tool: each tool call is
classified once, in this order (the first that applies):

==================  ===============================================================  =======
kind                when                                                             default
==================  ===============================================================  =======
``invalid``         the call names no known tool, its arguments are not a JSON        -1
                    object, or the turn opened a tool call that could not be parsed
``error``           the tool raised, or its output matches one of ``error_patterns``  -1
``repeat``          same tool and same arguments as an earlier call of the episode   -1
``informative``     the output was not returned earlier in the episode, or the tool  +1
                    reports that it changed its state (``{"state_changed": true}`` in
                    its metrics dict)
``uninformative``   a valid call whose output the episode has seen already            0
==================  ===============================================================  =======

A turn with several (parallel) calls takes the most negative of its calls' critiques if any is
negative, else the most positive. A turn with no tool call (the final answer) gets ``final`` (0), or
``unaided_answer`` (0 by default) when the episode made no tool call at all.

``source`` picks where critiques come from: ``interaction`` (the rules above), ``tool_reward`` (the sign
of the step reward the tools return from ``execute``, or of ``turn_scores[t]`` where the loop fills
it), or ``auto`` (the tool's sign where it is nonzero, the rules elsewhere). Plain Python: no veRL.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "CALL_KINDS",
    "TOOL_KEY_PREFIX",
    "CallVerdict",
    "ToolCritic",
    "ToolCritiqueConfig",
    "tool_counts_of",
    "tool_record",
    "turn_critique",
]

CALL_KINDS = ("invalid", "error", "repeat", "informative", "uninformative")
SOURCES = ("interaction", "tool_reward", "auto")
CHANNELS = ("as", "bt")
CONFIG_PATH = "tool_agent_arew critique"


@dataclass(frozen=True)
class ToolCritiqueConfig:
    """The critique rules of the ``tool_agent_arew`` loop (its ``critique`` knob); every key optional."""

    source: str = "interaction"
    """``interaction`` | ``tool_reward`` | ``auto`` (see the module docstring)."""
    informative: int = 1
    """A call whose output is new to the episode, or that changed the tool's state."""
    uninformative: int = 0
    """A valid call whose output the episode has seen already (not an exact repeat)."""
    invalid: int = -1
    """Unknown tool, arguments that are not a JSON object, or an unparsable tool call."""
    error: int = -1
    """The tool raised, or its output matches ``error_patterns``."""
    repeat: int = -1
    """The same tool with the same arguments as an earlier call of the episode."""
    final: int = 0
    """A turn without a tool call (the final answer), or whose calls were never run (a turn cap)."""
    unaided_answer: int = 0
    """Instead of ``final``: the answer of an episode that made no tool call at all. For a task that needs
    its tool, answering unaided is the tool-use drop itself (the calculator recipe sets -1)."""
    error_patterns: tuple[str, ...] = (r"^\s*error\b",)
    """Regular expressions (case-insensitive, searched in the tool's output text) that mark an output as
    an error of the tool. veRL's own message for a tool that raised is always one."""
    channel: str = "as"
    """Channel of the tool turns' critiques: ``as`` (acting; the default) or ``bt``."""
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"{CONFIG_PATH}.source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.channel not in CHANNELS:
            raise ValueError(f"{CONFIG_PATH}.channel must be one of {list(CHANNELS)}, got {self.channel!r}")
        for name in (*CALL_KINDS, "final", "unaided_answer"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in (-1, 0, 1):
                raise ValueError(f"{CONFIG_PATH}.{name} must be -1, 0 or +1, got {value!r}")
        patterns = (self.error_patterns,) if isinstance(self.error_patterns, str) else tuple(self.error_patterns)
        try:
            compiled = tuple(re.compile(str(p), re.IGNORECASE) for p in patterns)
        except re.error as err:
            raise ValueError(f"{CONFIG_PATH}.error_patterns: not a regular expression ({err})") from None
        object.__setattr__(self, "error_patterns", tuple(str(p) for p in patterns))
        object.__setattr__(self, "_compiled", compiled)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> ToolCritiqueConfig:
        data = dict(mapping.items()) if mapping else {}
        known = [f.name for f in fields(cls) if f.init]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{CONFIG_PATH}: unknown key(s) {unknown}; known: {known}")
        if "error_patterns" in data and not isinstance(data["error_patterns"], str):
            data["error_patterns"] = tuple(data["error_patterns"])
        return cls(**data)

    def is_error(self, text: str) -> bool:
        return any(pattern.search(text) for pattern in self._compiled)


@dataclass(frozen=True)
class CallVerdict:
    """One tool call as the critic judged it."""

    kind: str
    """One of :data:`CALL_KINDS`."""
    critique: int
    """The call's critique under the configured source."""


def _canonical(arguments: str) -> str:
    """Arguments as sorted JSON (so ``{"a":1,"b":2}`` repeats ``{"b": 2, "a": 1}``); raw text otherwise."""
    try:
        return json.dumps(json.loads(arguments), sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(arguments)


def _normalised(text: str) -> str:
    return " ".join(str(text).split())


def _sign(value: Any) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0
    return 0 if not math.isfinite(number) or number == 0 else (1 if number > 0 else -1)


class ToolCritic:
    """The critique state of one episode: the calls made and the outputs seen so far, and the counts
    the diagnostics read (:meth:`counts`)."""

    def __init__(self, config: ToolCritiqueConfig | None = None) -> None:
        self.config = config or ToolCritiqueConfig()
        self._calls: set[tuple[str, str]] = set()
        self._outputs: set[str] = set()
        self.kinds: dict[str, int] = dict.fromkeys(CALL_KINDS, 0)

    def judge_call(
        self,
        name: str,
        arguments: str,
        output: str,
        *,
        invalid: bool = False,
        raised: bool = False,
        state_changed: bool = False,
        tool_reward: float | None = None,
    ) -> CallVerdict:
        """Classify one call and remember it (later calls see it as earlier in the episode).

        Args:
            name, arguments: the call as the model wrote it (``arguments`` a JSON string).
            output: the text the tool returned (what the model sees next).
            invalid: the loop rejected the call before running it (unknown tool, arguments not JSON).
            raised: the tool raised (the loop shows the model an error message instead).
            state_changed: the tool reports that the call changed its state.
            tool_reward: the step reward the tool returned, if any.
        """
        cfg = self.config
        key = (str(name), _canonical(arguments))
        text = _normalised(output)
        if invalid:
            kind = "invalid"
        elif raised or cfg.is_error(text):
            kind = "error"
        elif key in self._calls:
            kind = "repeat"
        elif state_changed or (text and text not in self._outputs):
            kind = "informative"
        else:
            kind = "uninformative"
        self._calls.add(key)
        if text and kind != "invalid":
            self._outputs.add(text)
        self.kinds[kind] += 1
        return CallVerdict(kind=kind, critique=self._critique(getattr(cfg, kind), tool_reward))

    def judge_unparsed_call(self) -> CallVerdict:
        """A turn that opened a tool call no call could be parsed from (malformed JSON, a bad tag)."""
        self.kinds["invalid"] += 1
        return CallVerdict(kind="invalid", critique=self._critique(self.config.invalid, None))

    def final_critique(self, turn_score: float | None = None, answered: bool = False) -> int:
        """Critique of a turn without a tool call (or whose calls were never run); ``answered``: the turn
        is the episode's answer (it was parsed), which gets ``unaided_answer`` if no call came before."""
        unaided = answered and not any(self.kinds.values())
        return self._critique(self.config.unaided_answer if unaided else self.config.final, turn_score)

    def _critique(self, inferred: int, provided: float | None) -> int:
        source = self.config.source
        if source == "interaction":
            return inferred
        sign = _sign(provided)
        if source == "tool_reward":
            return sign
        return sign if sign else inferred  # auto

    def counts(self) -> dict[str, int]:
        """Calls per kind in this episode, plus ``calls`` (their total)."""
        return {"calls": sum(self.kinds.values()), **self.kinds}


def turn_critique(critiques: Iterable[int], turn_score: float | None = None, source: str = "interaction") -> int:
    """One critique for a turn from its calls' critiques: the most negative if any is negative, else the
    most positive, else 0. Under ``tool_reward`` / ``auto`` a nonzero ``turn_score`` (the loop's
    ``turn_scores[t]``) decides instead."""
    if source != "interaction" and _sign(turn_score):
        return _sign(turn_score)
    values = [int(z) for z in critiques]
    if not values:
        return 0
    return min(values) if min(values) < 0 else max(values)


TOOL_KEY_PREFIX = "selflock_tool_"
"""``extra_fields`` keys of a tool episode's counts: ``selflock_tool_calls``, ``selflock_tool_<kind>`` per
:data:`CALL_KINDS`, and ``selflock_tool_turns`` (assistant turns)."""
TOOL_COUNT_NAMES = ("calls", *CALL_KINDS, "turns")


def tool_record(counts: Mapping[str, int], turns: int) -> dict[str, int]:
    """An episode's tool counts (:meth:`ToolCritic.counts`) as ``extra_fields`` entries."""
    values = {**counts, "turns": turns}
    return {TOOL_KEY_PREFIX + name: int(values.get(name, 0)) for name in TOOL_COUNT_NAMES}


def tool_counts_of(extra_fields: Mapping[str, Any] | None) -> dict[str, int] | None:
    """Read :func:`tool_record` back; None for a sample without it (another agent loop's)."""
    if not isinstance(extra_fields, Mapping) or TOOL_KEY_PREFIX + "calls" not in extra_fields:
        return None
    return {name: int(extra_fields.get(TOOL_KEY_PREFIX + name) or 0) for name in TOOL_COUNT_NAMES}
