"""Parsing of tau2 turns: the agent's ``<message>`` / ``<tool_call>`` turn and the user model's reply.

The agent turn is cut after its first ``</message>`` or ``</tool_call>`` (:data:`TELECOM_CLOSING_TAGS`),
and the block closed by that tag is the action: a non-empty message, or tool-call JSON of exactly
``{"name": str, "arguments": object}``. Nothing here raises on any ``str`` input, and every step is
linear in the input's length (``str.find``/``rfind``, one JSON parse, one walk over its result).

Strictness (each failure is an invalid turn, critique -1, never sent to the user or a tool):

* **Length.** A message or tool-call block over :data:`MAX_ACTION_CHARS` characters is refused
  before anything else reads it (a simulator that rejects a 30 KB message would otherwise record
  the agent's garbage as the simulator's failure: critique 0, exempt).
* **Strict JSON** (RFC 8259, which Python's ``json`` relaxes): no ``NaN``/``Infinity``/``-Infinity``
  and no number that overflows to infinity (``1e999``), no integer over 4,300 digits (Python's
  conversion limit), no duplicate keys (Python keeps the last silently), no lone UTF-16 surrogates
  (``"\\ud800"``: not Unicode text; it would fail later when encoded), nesting at most
  :data:`MAX_JSON_DEPTH` deep (no tau2 tool takes nested arguments beyond 2 levels).
* **Text.** A message with lone surrogates is refused too: encoding it for the simulator's HTTP
  request would fail and be recorded as a simulator failure.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from verl_selflock.envs.parsing import TOO_LONG, Parsed, cut_after_first_closing_tag, extract_block

__all__ = [
    "MAX_ACTION_CHARS",
    "MAX_JSON_DEPTH",
    "TELECOM_CLOSING_TAGS",
    "AgentAction",
    "parse_agent_turn",
    "parse_user_reply",
    "strict_json",
]

TELECOM_CLOSING_TAGS = ("message", "tool_call")

MAX_ACTION_CHARS = 4_000
"""Longest message to the user or tool-call block (characters, after stripping). About 1,000 tokens:
over twice the English text of a whole 384-token turn (the recipes' ``max_turn_tokens``: ~1,500
characters, ``<think>`` included) and several times a long customer-service message or tool call,
so no real turn is cut; yet far below the user model's context (16k tokens in the recipe's vLLM command, ~2.5k of them the user's
system prompt), which a few 30 KB messages would overflow. Above it the turn is the agent's
invalid turn (-1), never sent to the user model or a tool."""

MAX_JSON_DEPTH = 16
"""Deepest nesting accepted in tool-call JSON (the call object itself is level 1)."""


@dataclass(frozen=True)
class AgentAction:
    """A parsed agent turn: a message to the user or one tool call."""

    kind: str
    """``message`` or ``tool_call``."""
    content: str = ""
    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Identity for repeat detection: normalised message text, or the call with sorted arguments."""
        if self.kind == "message":
            return "message:" + " ".join(self.content.lower().split())
        return "tool:" + self.name + ":" + json.dumps(self.arguments, sort_keys=True, default=str)


class _NotStrictJson(ValueError):
    """JSON that Python's parser accepts but RFC 8259 (or sanity) does not."""


def _reject_constant(name: str) -> Any:
    raise _NotStrictJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotStrictJson(f"number {text[:20]} overflows to infinity")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _NotStrictJson("duplicate key in a JSON object")
    return result


def _is_text(value: str) -> bool:
    """``value`` is Unicode text (no lone surrogates, which only ``\\ud800``-style escapes can make)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_tree(value: Any) -> str | None:
    """Why a parsed JSON value is not acceptable (too deep, a non-text string), or None. Iterative."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(item, str):
            if not _is_text(item):
                return "a string holds a lone surrogate"
        elif isinstance(item, dict):
            stack += [(key, depth) for key in item]
            stack += [(child, depth + 1) for child in item.values()]
        elif isinstance(item, list):
            stack += [(child, depth + 1) for child in item]
    return None


def strict_json(text: str) -> Parsed[Any]:
    """Parse ``text`` as strict RFC 8259 JSON (see the module docstring). Never raises."""
    try:
        value = json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
        )
    except (ValueError, RecursionError) as err:  # JSONDecodeError and the int-digit limit are ValueErrors
        return Parsed.fail(f"tool call is not valid JSON ({str(err)[:80]})")
    problem = _check_tree(value)
    return Parsed.fail(f"tool call is not valid JSON ({problem})") if problem else Parsed(value)


def _parse_tool_json(block: str) -> Parsed[tuple[str, dict[str, Any]]]:
    parsed = strict_json(block)
    if not parsed.ok:
        return Parsed.fail(parsed.error or "bad JSON")
    payload = parsed.value
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str) or not payload["name"].strip():
        return Parsed.fail('tool call must be a JSON object with a "name" string')
    arguments = payload.get("arguments", {})
    if not isinstance(arguments, dict):
        return Parsed.fail('tool call "arguments" must be a JSON object')
    if set(payload) - {"name", "arguments"}:
        return Parsed.fail('tool call JSON may only have the keys "name" and "arguments"')
    return Parsed((payload["name"].strip(), arguments))


def parse_agent_turn(text: str) -> Parsed[AgentAction]:
    """Parse one agent turn (cut after its first ``</message>``/``</tool_call>``). Never raises."""
    cut, tag = cut_after_first_closing_tag(text, TELECOM_CLOSING_TAGS)
    if tag is None:
        return Parsed.fail("no <message>...</message> or <tool_call>...</tool_call> block")
    block = extract_block(cut, tag)
    if block is None:
        return Parsed.fail(f"</{tag}> without an opening <{tag}>")
    content = block.strip()
    if len(content) > MAX_ACTION_CHARS:
        limit = f"<{tag}> block of {len(content):,} characters, over the limit of {MAX_ACTION_CHARS:,}"
        return Parsed.fail(limit, code=TOO_LONG)
    if tag == "message":
        if not content:
            return Parsed.fail("empty message")
        if not _is_text(content):
            return Parsed.fail("message is not valid Unicode text (lone surrogate)")
        return Parsed(AgentAction("message", content=content))
    parsed = _parse_tool_json(content)
    if not parsed.ok:
        return Parsed.fail(parsed.error or "bad tool call")
    name, arguments = parsed.value  # type: ignore[misc]
    return Parsed(AgentAction("tool_call", name=name, arguments=arguments))


def parse_user_reply(text: str) -> tuple[str, Any]:
    """Classify a user-model reply: ``("tool_call", (name, args))``, ``("bad_tool_call", reason)``
    or ``("message", text)``. The user's tool calls are held to the agent's rules (strict JSON, the cap)."""
    if "<tool_call>" in text:
        block = extract_block(text, "tool_call")
        if block is None:
            return "bad_tool_call", "unclosed <tool_call> block"
        if len(block.strip()) > MAX_ACTION_CHARS:  # tools never receive an over-cap call, from either side
            return "bad_tool_call", f"<tool_call> block over the limit of {MAX_ACTION_CHARS:,} characters"
        parsed = _parse_tool_json(block.strip())
        return ("tool_call", parsed.value) if parsed.ok else ("bad_tool_call", parsed.error)
    return "message", text.strip()
