"""The one counter of judged turns: critiques, rounds, invalid/repeated actions, information gain, Psi_hat.

Training (the ``active_reasoning`` agent loop) and ``verl-selflock eval`` both count through
:class:`TurnCounter` (via :class:`verl_selflock.episode.runner.EpisodeRunner`), so that both report the
same numbers. Environments label turns (``StepResult.label``); they do not count them. The counts are
the inputs of the self-locking proxies (AS / BT proxies, information gain per action, change of
Psi_hat per Update round: :mod:`verl_selflock.diagnostics.metrics`).

Plain Python: no veRL, no torch at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT
from verl_selflock.contracts.episode import EpisodeStats, finite_or_none

if TYPE_CHECKING:
    from verl_selflock.envs.base import StepResult

ROUND_ACTION = "action"
ROUND_UPDATE = "update"
ROUND_ANSWER = "answer"
ANSWER_TAG = "answer"
"""Closing tag of a final answer: a turn cut at ``</answer>`` is the answer turn in any round."""


def judged_round(planned: str, closing_tag: str | None = None) -> str:
    """The kind of turn the environment actually judged: ``planned`` (the round the turn was played in,
    ``env.next_round().value``) unless the turn ended with an ``<answer>`` block, which makes it the
    answer turn whatever round it came in (an early answer is not an Action or Update round)."""
    return ROUND_ANSWER if closing_tag == ANSWER_TAG else planned


@dataclass
class TurnCounter:
    """Counts judged turns into an :class:`EpisodeStats` record.

    ``stats`` receives ``judged_turns``, ``invalid_actions``, ``repeated_actions``, ``action_rounds``,
    ``update_rounds``, ``as_pos/as_neg``, ``bt_pos/bt_neg``, ``info_gain_*`` and ``psi_delta_*``; the
    other fields (``turns``, outcome, stop reason ...) are written by whoever plays the episode.
    """

    stats: EpisodeStats
    last_psi: float | None = None
    """Psi_hat after the latest Update round that reported one (the previous value for the next one
    when that turn's ``info`` carries no ``psi_prev``)."""

    def count(self, round_kind: str, step: StepResult, closing_tag: str | None = None) -> str:
        """Count one judged turn: ``round_kind`` is the round it was played in (``"action"``, ``"update"``
        or ``"answer"``), ``step`` the environment's :class:`~verl_selflock.envs.StepResult` and
        ``closing_tag`` the tag the turn was cut at (``"answer"`` makes it the answer turn, see
        :func:`judged_round`). Returns the kind of turn it was counted as."""
        stats = self.stats
        kind = judged_round(round_kind, closing_tag)
        stats.judged_turns += 1
        stats.invalid_actions += int(not step.valid)
        stats.repeated_actions += int(bool(step.repeated))
        stats.action_rounds += int(kind == ROUND_ACTION)
        stats.update_rounds += int(kind == ROUND_UPDATE)
        z, channel = step.label.critique, step.label.channel
        if channel == CHANNEL_AS:
            stats.as_pos += int(z > 0)
            stats.as_neg += int(z < 0)
        elif channel == CHANNEL_BT:
            stats.bt_pos += int(z > 0)
            stats.bt_neg += int(z < 0)
        info = step.info if isinstance(step.info, Mapping) else {}
        gain = finite_or_none(info.get("info_gain"))
        if gain is not None:
            stats.info_gain_sum += gain
            stats.info_gain_count += 1
        if kind == ROUND_UPDATE:  # psi_delta is "change of Psi_hat per Update round": an answer's psi is no update
            self._count_psi(info)
        return kind

    def _count_psi(self, info: Mapping[str, Any]) -> None:
        psi = finite_or_none(info.get("psi"))
        if psi is None:
            return
        previous = finite_or_none(info.get("psi_prev"))
        previous = self.last_psi if previous is None else previous
        if previous is not None:
            self.stats.psi_delta_sum += psi - previous
            self.stats.psi_delta_count += 1
        self.last_psi = psi

