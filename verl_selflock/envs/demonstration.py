"""What a task's expert policy returns: one episode it played, turn by turn, as the environment judged it.

Shared by the experts that write supervised warm-start demonstrations (:mod:`verl_selflock.envs.pe.expert`,
:mod:`verl_selflock.envs.flodial.expert`) and read by :mod:`verl_selflock.data.demos`, which turns a
:class:`Demonstration` into one veRL multi-turn SFT row. No veRL, no task code here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from verl_selflock.envs.base import ActiveReasoningEnv, RoundKind

__all__ = ["Demonstration", "Expert", "ExpertTurn", "play_turns"]


@dataclass(frozen=True)
class ExpertTurn:
    """One turn of a demonstration, as the environment judged it."""

    round: str
    """``action``, ``update`` or ``answer``: the kind of round the turn was played in (an early answer
    keeps its round's kind)."""
    text: str
    """The assistant turn: one ``<scratch>`` sentence and the block, ending at its closing tag."""
    observation: str | None
    """The environment's reply (the next user message); None after the last turn."""
    critique: int
    """The turn's directional critique (AS on Action rounds, BT on Update rounds, 0 on the answer)."""
    valid: bool


@dataclass(frozen=True)
class Demonstration:
    """One episode played by an expert."""

    spec: dict[str, Any]
    turns: list[ExpertTurn] = field(default_factory=list)
    success: bool = False
    reward: float = 0.0
    answer_cos: float | None = None
    """PE only: the cosine of the answer with ``w*`` (None for other tasks)."""
    seed: int = 0
    """The expert's seed."""


class Expert(Protocol):
    """A policy that plays a round-based task: the text of the next turn, and what it learns from a reply."""

    def turn(self, kind: RoundKind) -> str: ...

    def observe(self, observation: str) -> None: ...


async def play_turns(env: ActiveReasoningEnv, expert: Expert) -> list[ExpertTurn]:
    """Play ``expert`` through ``env`` until the environment ends the episode (or its turn cap); every turn
    as the environment judged it."""
    turns: list[ExpertTurn] = []
    while True:
        kind = env.next_round()
        text = expert.turn(kind)
        step = await env.step(text)
        turns.append(ExpertTurn(kind.value, text, step.observation, int(step.label.critique), bool(step.valid)))
        if step.done or not step.observation or len(turns) >= env.max_turns:
            return turns
        expert.observe(step.observation)
