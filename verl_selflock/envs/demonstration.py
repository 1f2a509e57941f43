"""What a task's expert policy returns: one episode it played, turn by turn, as the environment judged it.

Shared by the experts that write supervised warm-start demonstrations (:mod:`verl_selflock.envs.pe.expert`,
:mod:`verl_selflock.envs.flodial.expert`) and read by :mod:`verl_selflock.data.demos`, which turns a
:class:`Demonstration` into one veRL multi-turn SFT row. No veRL, no task code here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Demonstration", "ExpertTurn"]


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
