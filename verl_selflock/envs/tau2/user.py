"""The simulated tau2 user's side of the conversation: the user model's messages, its tool calls, degradation.

User model messages (OpenAI chat format): system = :func:`verl_selflock.envs.tau2.prompts.user_system_prompt`
(tau2's ``simulation_guidelines_tools.md`` + the task's user scenario + a one-line signature per user
tool and how to call one, ``<tool_call>{json}</tool_call>``, since the client sends plain chat
messages); agent messages are ``user`` turns, the user's own messages and tool calls ``assistant``
turns, tool results ``user`` turns wrapped in ``<tool_result>``. A user reply with an unparsable
``<tool_call>`` gets an error result and another try (counted as a user step). Replies are cached
under a hash of the messages.

Simulator failure (``ChatReply.ok`` False after the client's retries), or a user that is still
calling tools after ``max_tool_steps``: the user turn degrades to the fixed reply
:data:`DEGRADED_USER_REPLY` (kept in the transcript, so the conversation stays well formed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from verl_selflock.envs.base import ask_simulator
from verl_selflock.envs.tau2.parsing import parse_user_reply

__all__ = ["DEGRADED_USER_REPLY", "MAX_USER_TOOL_STEPS", "STOP_TOKENS", "SimulatedUser", "UserTurn"]

MAX_USER_TOOL_STEPS = 5
"""Most user tool calls in one user turn before the turn degrades (tau2's own loop has no such cap;
a small model can otherwise loop on tool calls)."""
DEGRADED_USER_REPLY = "Sorry, could you repeat that?"
STOP_TOKENS = ("###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###")


@dataclass
class UserTurn:
    """What happened on the user's side after one agent message."""

    text: str
    """The user's message (the degraded reply when the turn degraded)."""
    signals: list[str] = field(default_factory=list)
    tool_calls: int = 0
    degraded: str | None = None
    """``sim_failure`` or ``user_step_cap`` when the turn degraded."""
    stop_token: str | None = None


RunUserTool = Callable[[str, dict[str, Any]], tuple[str, list[str]]]
"""Runs a user tool call ``(name, arguments)`` in tau2's environment and records it; returns the tool's
output and the positive signals it fired."""


class SimulatedUser:
    """The user model's view of one episode's conversation, and how it answers an agent message."""

    def __init__(self, system: str, max_tool_steps: int, cache_scope: tuple[Hashable, ...], task: str) -> None:
        self.system = system
        self.max_tool_steps = max_tool_steps
        self.cache_scope = cache_scope
        self.task = task
        self.messages: list[dict[str, str]] = []  # the user model's view, after the system prompt

    def hear(self, text: str) -> None:
        """The agent's message to the user."""
        self.messages.append({"role": "user", "content": text})

    async def reply(self, simulator: Any, run_tool: RunUserTool, count: Callable[..., None]) -> UserTurn:
        """Let the user model answer the latest agent message (its tool calls go through ``run_tool``;
        ``count(key, n=1)`` counts ``sim_*``, ``user_tool_calls`` and ``user_step_caps``)."""
        signals: list[str] = []
        tool_calls = 0
        for _ in range(self.max_tool_steps + 1):
            messages = [{"role": "system", "content": self.system}, *self.messages]
            digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()
            # ask_simulator turns an exception into a failed reply: both degrade the turn the same way.
            reply = await ask_simulator(simulator, messages, cache_key=(*self.cache_scope, digest), task=self.task)
            count("sim_calls")
            count("sim_cache_hits", int(bool(reply.cached)))
            if not reply.ok or not reply.text:
                count("sim_failures")
                return self._degraded("sim_failure", signals, tool_calls)
            kind, value = parse_user_reply(reply.text)
            if kind == "message":
                text = value or DEGRADED_USER_REPLY
                self.messages.append({"role": "assistant", "content": text})
                stop = next((token for token in STOP_TOKENS if token in text), None)
                return UserTurn(text, signals, tool_calls, stop_token=stop)
            if tool_calls >= self.max_tool_steps:
                break
            tool_calls += 1
            if kind == "bad_tool_call":
                # Not a tau2 message (it has no valid call): the user model sees the error and retries.
                self.messages += [
                    {"role": "assistant", "content": reply.text.strip()},
                    {"role": "user", "content": f"<tool_result>\nError: {value}\n</tool_result>"},
                ]
                continue
            name, arguments = value
            output, tool_signals = run_tool(name, arguments)
            count("user_tool_calls")
            signals.extend(tool_signals)
            call_text = json.dumps({"name": name, "arguments": arguments})
            self.messages += [
                {"role": "assistant", "content": f"<tool_call>{call_text}</tool_call>"},
                {"role": "user", "content": f"<tool_result>\n{output}\n</tool_result>"},
            ]
        count("user_step_caps")
        return self._degraded("user_step_cap", signals, tool_calls)

    def _degraded(self, why: str, signals: list[str], tool_calls: int) -> UserTurn:
        self.messages.append({"role": "assistant", "content": DEGRADED_USER_REPLY})
        return UserTurn(DEGRADED_USER_REPLY, signals, tool_calls, degraded=why)
