"""A scripted FloDial user for offline demonstrations: the reference table answered by exact question text.

In training and evaluation the FloDial user is an LLM behind an OpenAI-compatible endpoint
(:class:`verl_selflock.simulators.ChatClient`), prompted by
:func:`verl_selflock.envs.flodial.prompts.simulator_messages` to reply ``Yes, <ID>`` / ``No, <ID>`` when
the agent's question asks the same thing as a row of the true fault's reference table, else ``Unknown``.
:class:`ScriptedFloDialUser` has the same interface the environment calls (``async chat(messages, *,
cache_key=None) -> ChatReply``) and answers as that prompt asks for the one case it can decide without a
language model: a question whose text *is* a row's text (compared case-, space- and end-punctuation-
insensitively, :func:`~verl_selflock.envs.flodial.parsing.normalise_query`) gets that row's answer and
number; every other question gets ``Unknown`` (no paraphrase is recognised).

Demonstrations played with it (:mod:`verl_selflock.envs.flodial.expert`) assume that the real simulator
answers an exact-text question the same way. That is what its prompt asks, but an LLM may still reply
``Unknown`` (or name another row) now and then: the demonstrations show the environment's replies to a
perfect user, not a measurement of the endpoint.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from verl_selflock.envs.flodial.parsing import normalise_query
from verl_selflock.simulators.client import ChatReply

__all__ = ["ScriptedFloDialUser"]


class ScriptedFloDialUser:
    """Answers FloDial questions from a reference table by exact (normalised) question text.

    Args:
        table: the episode's reference table (``spec["table"]``: rows ``{"question", "answer"}``, root
            first), the ground truth read from the flowchart by the data builder. When two rows had the
            same text, the first would answer (the official charts have none).
    """

    def __init__(self, table: Sequence[Mapping[str, Any]]) -> None:
        self.rows: dict[str, tuple[int, str]] = {}
        for index, row in enumerate(table):
            answer = str(row["answer"]).lower()
            if answer not in ("yes", "no"):
                raise ValueError(f"table row {index} has answer {row['answer']!r}, not 'yes' or 'no'")
            self.rows.setdefault(normalise_query(str(row["question"])), (index, answer))
        self.calls = 0
        self._seen: set[Hashable] = set()

    def reply_to(self, query: str) -> str:
        """What the user says to ``query``: ``Yes, <ID>`` / ``No, <ID>`` for a row's exact text, else ``Unknown``."""
        hit = self.rows.get(normalise_query(query))
        return "Unknown" if hit is None else f"{hit[1].capitalize()}, {hit[0]}"

    async def chat(
        self, messages: Sequence[Mapping[str, str]], *, cache_key: Hashable | None = None, **_: Any
    ) -> ChatReply:
        """The reply to the last message's question; ``cached`` as the real client marks a repeated key."""
        self.calls += 1
        cached = cache_key is not None and cache_key in self._seen
        if cache_key is not None:
            self._seen.add(cache_key)
        return ChatReply(text=self.reply_to(str(messages[-1]["content"])), ok=True, cached=cached)
