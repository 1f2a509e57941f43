"""The chat client of the policy under evaluation: an empty reply is the model's turn, not a fault.

:class:`~verl_selflock.simulators.ChatClient` serves simulated users, for whom an empty reply is a
failed call: it retries, then reports ``ok=False`` and the task degrades the turn. For the *policy*
that is wrong. A server that answered (HTTP 200) with ``content`` None or blank has run the model, and
the model said nothing: the environment must judge that turn (an invalid action) like any other.
Retrying it wastes calls (at temperature 0 the model says nothing again), and reporting it as an
endpoint error would keep the episode from ever being scored, on every rerun. Timeouts, connection
errors, 429/5xx and bodies that are not a completion stay endpoint failures, retried as before.

How: :class:`PolicyClient` keeps ChatClient's retries, backoff and counters, and only wraps the SDK
call: an answered completion without content leaves the retry loop at once (:class:`AnsweredEmpty`)
and :meth:`PolicyClient.chat` returns it as the model's reply. The wrapper sits at the SDK boundary
(``chat.completions.create``), so it does not depend on how ChatClient represents an attempt.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from verl_selflock.simulators import ChatClient, ChatReply

__all__ = ["AnsweredEmpty", "PolicyClient", "reply_text"]

EMPTY_REPLIES = "empty_replies"
"""Key of :meth:`ChatClient.stats` counting answered replies without content."""


def reply_text(response: Any) -> str | None:
    """The text of a parsed chat completion, ``""`` when the model produced no content (None); None when
    the body is not a completion at all (no choice, no message, content of another type)."""
    try:
        message = response.choices[0].message
    except (AttributeError, IndexError, TypeError):
        return None
    content = getattr(message, "content", None)
    if content is None:
        return ""
    return content if isinstance(content, str) else None


class AnsweredEmpty(Exception):
    """The endpoint answered and the model produced no content (``text`` is ``""`` or blank)."""

    def __init__(self, text: str) -> None:
        super().__init__("the model produced no content")
        self.text = text


class _EmptyIsAnAnswer:
    """The SDK client as ChatClient uses it (``chat.completions.create``, ``close``), except that an
    answered completion without content raises :class:`AnsweredEmpty` instead of being returned."""

    def __init__(self, client: Any) -> None:
        self._inner = client
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    async def _create(self, **request: Any) -> Any:
        response = await self._inner.chat.completions.create(**request)
        text = reply_text(response)
        if text is not None and not text.strip():
            raise AnsweredEmpty(text)
        return response

    async def close(self) -> None:
        await self._inner.close()


class PolicyClient(ChatClient):
    """:class:`ChatClient` whose answered-but-empty replies come back at once with ``ok=True`` (None
    content as ``""``, blank text as it came), counted in ``stats()["empty_replies"]``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client = _EmptyIsAnAnswer(self._client)

    async def chat(self, messages: Any, **kwargs: Any) -> ChatReply:
        try:
            return await super().chat(messages, **kwargs)
        except AnsweredEmpty as answered:
            self._counts[EMPTY_REPLIES] += 1
            return ChatReply(text=answered.text, ok=True)
