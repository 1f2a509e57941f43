"""The rules of one active-reasoning episode, shared by training and evaluation (plain Python).

Whoever plays the episode (the ``active_reasoning`` agent loop on tokens,
:mod:`verl_selflock.verl_adapter.agent_loop`; ``verl-selflock eval`` on chat messages,
:mod:`verl_selflock.eval.episode`) produces each agent turn's text, cut after its first closing tag,
and hands it to :meth:`EpisodeRunner.judge`, which

1. steps the environment with the text (``env.step``);
2. counts the judged turn into the episode's :class:`~verl_selflock.contracts.episode.EpisodeStats`
   (:class:`~verl_selflock.episode.counting.TurnCounter`, the one counter of critiques);
3. decides whether and why the episode stops there, in this order:

   * ``answer``: the turn ended with ``</answer>`` (an early answer ends the episode in any round);
   * ``done``: the environment says the episode is over;
   * ``max_turns``: the turn cap (``env.max_turns``, or a smaller cap of the player) was reached, or
     the player's cap on observations shown;
   * ``done``: the environment has no observation to show;
   * ``t3``: T3 fires on the turn's ``StepResult.progress`` (training rows only; arXiv 2510.12264,
     :mod:`verl_selflock.algorithms.t3`).

The player shows the observation if the episode goes on (and reports it with
:meth:`EpisodeRunner.observation_shown`), or ends the episode itself when its response budget is spent
(:meth:`EpisodeRunner.stop_for_budget`: ``response_length``, a token-level rule of the agent loop).
:meth:`EpisodeRunner.finish` scores the episode as it stands (``env.result()``) into the record.

No veRL, torch or Ray here: the runner takes the environment and text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from verl_selflock.algorithms.t3 import T3Config, T3Monitor, T3Rule
from verl_selflock.contracts.episode import (
    STOP_ABORTED,
    STOP_ANSWER,
    STOP_DONE,
    STOP_MAX_TURNS,
    STOP_RESPONSE_LENGTH,
    STOP_T3,
    EpisodeStats,
)
from verl_selflock.episode.counting import ANSWER_TAG, TurnCounter

if TYPE_CHECKING:
    from verl_selflock.envs.base import ActiveReasoningEnv, StepResult

__all__ = ["EpisodeRunner", "Judgement"]


@dataclass(frozen=True)
class Judgement:
    """The environment's answer to one turn, as the runner counted it."""

    step: StepResult
    """What ``env.step`` returned (observation, critique, info ...)."""
    kind: str
    """The kind of turn it was counted as: ``action``, ``update`` or ``answer`` (an ``</answer>`` turn is
    the answer turn whatever round it came in)."""
    stop: str | None
    """The ``STOP_*`` reason if the episode ends after this turn, else None."""
    step_s: float
    """Seconds ``env.step`` took (simulated users, tool calls)."""


class EpisodeRunner:
    """Steps, counts and stops one episode of ``env``; its record is :attr:`stats`.

    Args:
        env: the episode's environment (built from the row's ``extra_info["env"]``).
        turn_cap: most turns the environment judges; None: ``env.max_turns``.
        max_observations: most observations shown (veRL's ``rollout.multi_turn.max_user_turns``);
            None or 0: no cap beyond the turn cap.
        t3: T3 settings; T3 watches the episode only when they are enabled and the environment plays a
            training row (evaluation rows play to the end so that validation reports untruncated success).
    """

    def __init__(
        self,
        env: ActiveReasoningEnv,
        *,
        turn_cap: int | None = None,
        max_observations: int | None = None,
        t3: T3Config | None = None,
    ) -> None:
        self.env = env
        self.turn_cap = env.max_turns if turn_cap is None else int(turn_cap)
        self.max_observations = max_observations
        self.t3 = None
        if t3 is not None and t3.enabled and env.context.training:
            self.t3 = T3Monitor(T3Rule.resolve(t3, env.task, type(env).progress_signals))
        self.stats = EpisodeStats(task=env.task, t3_enabled=self.t3 is not None)
        self.counter = TurnCounter(self.stats)
        self.observations = 0
        """Observations shown to the agent so far."""

    @property
    def judged(self) -> int:
        """Turns the environment judged so far (the 0-based index of the next turn)."""
        return self.stats.judged_turns

    @property
    def turns_left(self) -> int:
        """Turns the cap still allows (0 once reached)."""
        return max(0, self.turn_cap - self.judged)

    async def judge(self, text: str, closing_tag: str | None) -> Judgement:
        """Step the environment with one turn's ``text`` (already cut after ``closing_tag``, None when the
        turn had no closing tag), count it and decide whether the episode stops after it."""
        planned = self.env.next_round().value
        start = time.perf_counter()
        step = await self.env.step(text)
        step_s = time.perf_counter() - start
        self.stats.turns += 1
        kind = self.counter.count(planned, step, closing_tag=closing_tag)
        stop = self._stop_reason(step, closing_tag)
        if stop is not None:
            self.stats.stop_reason = stop
        return Judgement(step=step, kind=kind, stop=stop, step_s=step_s)

    def _stop_reason(self, step: StepResult, closing_tag: str | None) -> str | None:
        if step.done or closing_tag == ANSWER_TAG:
            return STOP_ANSWER if closing_tag == ANSWER_TAG else STOP_DONE
        if self.judged >= self.turn_cap or (self.max_observations and self.observations >= self.max_observations):
            return STOP_MAX_TURNS
        if not step.observation:
            return STOP_DONE
        if self.t3 is not None and self.t3.observe(step.progress):
            # Belief trapped: end here; finish() scores the episode as it stands.
            self.stats.t3_truncated, self.stats.t3_turn = True, self.judged
            return STOP_T3
        return None

    def observation_shown(self, capped: bool = False) -> None:
        """The player showed the latest turn's observation (``capped``: its text was cut to fit)."""
        self.observations += 1
        self.stats.obs_truncated += int(capped)

    def stop_for_budget(self, unjudged_turn: bool = False) -> None:
        """The episode ends because the player's response budget is spent (``response_length``).
        ``unjudged_turn``: a turn was generated but cut by the budget, so it was not shown to the
        environment (critique 0); it still counts as a turn."""
        self.stats.turns += int(unjudged_turn)
        self.stats.truncated, self.stats.stop_reason = True, STOP_RESPONSE_LENGTH

    def stop_for_abort(self) -> None:
        """The episode ends because the rollout server aborted the next turn's generation: nothing of that
        turn is kept or judged (the turns before it are), and the record counts the abort."""
        self.stats.aborted_generations += 1
        self.stats.stop_reason = STOP_ABORTED

    def branch_aborted(self) -> None:
        """A side generation (a counterfactual branch) was aborted by the server and dropped."""
        self.stats.aborted_generations += 1

    def finish(self) -> EpisodeStats:
        """Score the episode as it stands (``env.result()``: reward, success, answered, task metrics) into
        the record, and return the record."""
        result = self.env.result()
        stats = self.stats
        stats.reward, stats.success, stats.answered = float(result.reward), bool(result.success), bool(result.answered)
        stats.env_metrics = dict(result.metrics)
        return stats
