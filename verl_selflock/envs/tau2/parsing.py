"""Parsing of tau2 turns: the agent's ``<message>`` / ``<tool_call>`` turn and the user model's reply.

The agent turn is cut after its first ``</message>`` or ``</tool_call>`` (:data:`TELECOM_CLOSING_TAGS`),
and the block closed by that tag is the action: a non-empty message, or tool-call JSON of exactly
``{"name": str, "arguments": object}``. Nothing here raises on any ``str`` input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from verl_selflock.envs.parsing import Parsed, cut_after_first_closing_tag, extract_block

__all__ = ["TELECOM_CLOSING_TAGS", "AgentAction", "parse_agent_turn", "parse_user_reply"]

TELECOM_CLOSING_TAGS = ("message", "tool_call")


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


def _parse_tool_json(block: str) -> Parsed[tuple[str, dict[str, Any]]]:
    try:
        payload = json.loads(block)
    except (json.JSONDecodeError, RecursionError) as err:
        return Parsed.fail(f"tool call is not valid JSON ({str(err)[:80]})")
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
    if tag == "message":
        content = block.strip()
        if not content:
            return Parsed.fail("empty message")
        return Parsed(AgentAction("message", content=content))
    parsed = _parse_tool_json(block.strip())
    if not parsed.ok:
        return Parsed.fail(parsed.error or "bad tool call")
    name, arguments = parsed.value  # type: ignore[misc]
    return Parsed(AgentAction("tool_call", name=name, arguments=arguments))


def parse_user_reply(text: str) -> tuple[str, Any]:
    """Classify a user-model reply: ``("tool_call", (name, args))``, ``("bad_tool_call", reason)``
    or ``("message", text)``."""
    if "<tool_call>" in text:
        block = extract_block(text, "tool_call")
        if block is None:
            return "bad_tool_call", "unclosed <tool_call> block"
        parsed = _parse_tool_json(block.strip())
        return ("tool_call", parsed.value) if parsed.ok else ("bad_tool_call", parsed.error)
    return "message", text.strip()
