"""What the tasks that ask a simulated user share (MediQ, FloDial, tau2): the simulator counters, the
T3 new-information signal and, for the round-based ones, :class:`SimulatedUserEnv`.

In MediQ and FloDial, Action rounds put one free-text question to an LLM behind
``EnvContext.simulator``, Update rounds state a belief (one weight per option: MediQ's answers,
FloDial's candidate faults), and the answer is the option with the unique largest weight. Their
mechanics live here so that the two cannot drift apart: the counted simulator call, the Action
round's label and observation (a simulator failure is exempt from every critique fallback), the
Update round's shape and the one-hot answer IGPO scores. The rules stay in each task: how a reply
becomes feedback, the AS critique and the BT critique.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, FallbackRole, TurnLabel
from verl_selflock.envs.base import (
    NEW_INFORMATION_SIGNAL,
    ROUND_COUNTERS,
    ProgressSignal,
    RoundBasedEnv,
    RoundKind,
    StepResult,
    ask_simulator,
)
from verl_selflock.envs.parsing import MAX_QUERY_CHARS, TOO_LONG, Parsed, parse_query_block
from verl_selflock.simulators.client import ChatReply

__all__ = [
    "QUERY_COUNTERS",
    "ROUND_COUNTERS",
    "SIMULATOR_COUNTERS",
    "SimulatedUserEnv",
    "new_information_progress",
    "new_information_signals",
]

SIMULATOR_COUNTERS = ("sim_calls", "sim_cache_hits", "sim_failures")
"""Counters of this episode's simulator calls (the client counts its own, across episodes)."""

QUERY_COUNTERS = ("overlong_queries",)
"""Counters of :meth:`SimulatedUserEnv.parse_query`: Action rounds whose question was over the length
cap (also counted in ``invalid_actions``; this one tells garbage floods from format slips)."""


def new_information_signals(description: str, *, k: int = 2, min_turn: int = 0) -> dict[str, ProgressSignal]:
    """``progress_signals`` of a task whose T3 signal is :data:`NEW_INFORMATION_SIGNAL`: the belief is
    trapped once ``k`` measured turns in a row brought no new information (``description``: what counts)."""
    return {NEW_INFORMATION_SIGNAL: ProgressSignal(k=k, delta_min=0.0, min_turn=min_turn, description=description)}


def new_information_progress(informative: bool) -> dict[str, float]:
    """``StepResult.progress`` of a turn that measured the new-information signal."""
    return {NEW_INFORMATION_SIGNAL: float(informative)}


class SimulatedUserEnv(RoundBasedEnv):
    """A :class:`RoundBasedEnv` whose Action rounds ask ``context.simulator``. A subclass sets
    ``self.truth`` (index of the true option) and ``self.prior`` (the belief before any question, one
    weight per option) and implements the methods below."""

    needs_simulator = True
    truth: int
    prior: np.ndarray

    @abstractmethod
    def round_instructions(self) -> tuple[str, str, str]:
        """What to write in an (Action, Update, Answer) round, as the observations announce it."""

    @abstractmethod
    def parse_belief(self, block: str | None) -> Parsed[np.ndarray]:
        """A guess (the content of an Update round's block) or a final answer."""

    @abstractmethod
    def _record_belief(self, belief: np.ndarray, info: dict[str, Any]) -> int:
        """Keep a valid guess as the current belief and return its BT critique (``info`` gets the details)."""

    def _update_info(self) -> dict[str, Any]:
        """Task-specific ``info`` entries of every Update round, before the guess's."""
        return {}

    def parse_query(self, block: str | None, max_chars: int = MAX_QUERY_CHARS) -> Parsed[str]:
        """An Action round's question (:func:`~verl_selflock.envs.parsing.parse_query_block`: one
        ``Query:`` line, nothing else, at most ``max_chars`` characters), counted when invalid: an
        invalid question is the agent's turn (AS -1) and never reaches the simulator. The task must
        list :data:`QUERY_COUNTERS` in its ``counters``."""
        parsed = parse_query_block(block, "query", max_chars)
        if not parsed.ok:
            self.count("invalid_actions")
            self.count("overlong_queries", int(parsed.code == TOO_LONG))
        return parsed

    def parse_answer(self, block: str | None) -> Parsed[np.ndarray]:
        """A final answer: the same form as a guess (:meth:`parse_belief`)."""
        return self.parse_belief(block)

    def ground_truth_answer(self) -> str:
        """All weight on the true option, as the answer block's content (IGPO scores this text)."""
        return ",".join("1" if option == self.truth else "0" for option in range(len(self.prior)))

    async def _ask_simulator(self, messages: Sequence[Mapping[str, str]], cache_key: Hashable) -> ChatReply:
        """One counted call; a failure (after the client's retries, or an exception) is a reply with
        ``ok`` False, which the task degrades as its rules say."""
        reply = await ask_simulator(self.context.simulator, messages, cache_key=cache_key, task=self.task)
        self.count("sim_calls")
        if reply.ok:
            self.count("sim_cache_hits", int(bool(reply.cached)))
        else:
            self.count("sim_failures")
        return reply

    def _action_result(
        self,
        feedback: str,
        critique: int,
        info: dict[str, Any],
        *,
        parsed: bool,
        repeated: bool,
        informative: bool,
        simulator_failed: bool,
        counterfactual: str | None = None,
    ) -> StepResult:
        """The Action round's answer: ``feedback``, then the next round's instruction; valid iff the query
        ``parsed`` and is no repeat. ``counterfactual``: the feedback line of the training-only side branch
        (see ``StepResult.counterfactual_observation``)."""
        label = TurnLabel(critique, CHANNEL_AS)
        if simulator_failed:  # the simulator's failure, not the agent's: no fallback may give this 0 a sign
            label.fallback = FallbackRole.EXEMPT
        _, update, answer = self.round_instructions()
        follow = self._after_action("question", update, answer)
        return StepResult(
            f"{feedback}\n{follow}",
            label,
            done=False,
            valid=parsed and not repeated,
            repeated=repeated,
            info=info,
            counterfactual_observation=None if counterfactual is None else f"{counterfactual}\n{follow}",
            progress=new_information_progress(informative),
        )

    def _update_turn(self, block: str | None) -> StepResult:
        self.count("update_rounds")
        parsed = self.parse_belief(block)
        info: dict[str, Any] = {"round": RoundKind.UPDATE.value, "turn": self.turn, **self._update_info()}
        if not parsed.ok:
            self.count("invalid_guesses")
            info["error"] = parsed.error
            critique = -1
            head = f"Invalid guess: {parsed.error}. It was not recorded."
        else:
            assert parsed.value is not None
            critique = self._record_belief(parsed.value, info)
            head = "Guess recorded."
        action, _, _ = self.round_instructions()
        follow = self._after_update("question", "questions", action)
        return StepResult(f"{head}\n{follow}", TurnLabel(critique, CHANNEL_BT), done=False, valid=parsed.ok, info=info)
