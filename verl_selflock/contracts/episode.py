"""Per-episode scalars that the ``active_reasoning`` agent loop hands to the reward manager.

The agent loop stores :meth:`EpisodeStats.as_extra_fields` in ``AgentLoopOutput.extra_fields``; veRL
passes that dict to the reward loop as the sample's ``tool_extra_fields`` (and, on the legacy
trainer without streaming reward, spreads its keys as ``non_tensor_batch`` columns). The reward
manager reads it back with :meth:`EpisodeStats.from_extra_fields`. Plain Python: no veRL import, so
both sides (and tests) share one definition of the key names.

==============================  =====  ===========================================================
key                             type   meaning
==============================  =====  ===========================================================
``selflock_reward``             float  outcome reward of the answer the episode actually produced
                                       (``EpisodeResult.reward``; 0 when it never answered)
``selflock_success``            bool   the answer counts as a success
``selflock_answered``           bool   the agent produced a well-formed final answer
``selflock_turns``              int    agent turns generated (incl. a turn cut by the length budget)
``selflock_invalid_actions``    int    turns the environment judged invalid (``StepResult.valid`` False:
                                       a bad action, guess or answer, or a repeated action)
``selflock_repeated_actions``   int    turns that repeated an earlier action
``selflock_as_pos``/``_as_neg`` int    Action-round turns critiqued +1 / -1
``selflock_bt_pos``/``_bt_neg`` int    Update-round turns critiqued +1 / -1
``selflock_action_rounds``      int    Action-round turns the environment judged (an ``<answer>`` turn is
                                       never one, whatever round it came in)
``selflock_update_rounds``      int    Update-round turns the environment judged (idem)
``selflock_judged_turns``       int    turns the environment judged: Action + Update rounds + the answer
                                       turn if one was played (a turn cut by the response budget is not)
``selflock_info_gain_sum``      float  sum of ``StepResult.info["info_gain"]`` over the turns that set it
``selflock_info_gain_count``    int    turns that set ``info["info_gain"]`` (0: the task defines none)
``selflock_psi_delta_sum``      float  sum over Update rounds of the change of ``info["psi"]`` (Psi_hat, the
                                       belief's readout toward the truth); other turns' ``psi`` is ignored
``selflock_psi_delta_count``    int    Update rounds with such a change (``info["psi_prev"]`` or the
                                       previous Update round's ``psi`` gives the previous value)
``selflock_truncated``          bool   the episode was cut by ``rollout.response_length``
``selflock_obs_truncated``      int    observations whose text was capped at ``max_obs_tokens``
``selflock_stop_reason``        str    ``answer`` | ``done`` | ``max_turns`` | ``response_length`` | ``t3``
``selflock_task``               str    the environment's task name
``selflock_env_metrics``        dict   ``EpisodeResult.metrics`` (task-specific scalars)
``selflock_t3_enabled``         bool   T3 watched this episode (``t3.enabled`` and a training row)
``selflock_t3_truncated``       bool   T3 ended the episode (belief trapped)
``selflock_t3_turn``            int    turns kept when T3 cut (0 if it did not)
``selflock_t3_budget_saved``    int    generation budget T3 left unused: min(tokens left in
                                       ``response_length``, turns left x ``max_turn_tokens``). An upper
                                       bound on the tokens saved (the episode might have ended earlier
                                       or used shorter turns), not a count of tokens saved
``selflock_gt_answer``          str    the task's ground-truth answer text (IGPO's scorer), if known
==============================  =====  ===========================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PREFIX = "selflock_"
REWARD = "selflock_reward"
SUCCESS = "selflock_success"
ANSWERED = "selflock_answered"
TURNS = "selflock_turns"
INVALID_ACTIONS = "selflock_invalid_actions"
REPEATED_ACTIONS = "selflock_repeated_actions"
AS_POS = "selflock_as_pos"
AS_NEG = "selflock_as_neg"
BT_POS = "selflock_bt_pos"
BT_NEG = "selflock_bt_neg"
TRUNCATED = "selflock_truncated"
OBS_TRUNCATED = "selflock_obs_truncated"
ACTION_ROUNDS = "selflock_action_rounds"
UPDATE_ROUNDS = "selflock_update_rounds"
JUDGED_TURNS = "selflock_judged_turns"
INFO_GAIN_SUM = "selflock_info_gain_sum"
INFO_GAIN_COUNT = "selflock_info_gain_count"
PSI_DELTA_SUM = "selflock_psi_delta_sum"
PSI_DELTA_COUNT = "selflock_psi_delta_count"
STOP_REASON = "selflock_stop_reason"
TASK = "selflock_task"
ENV_METRICS = "selflock_env_metrics"
T3_ENABLED = "selflock_t3_enabled"
T3_TRUNCATED = "selflock_t3_truncated"
T3_TURN = "selflock_t3_turn"
T3_BUDGET_SAVED = "selflock_t3_budget_saved"
GT_ANSWER = "selflock_gt_answer"
CF_BRANCHES = "selflock_cf_branches"
"""Counterfactual side branches generated in the episode (their tokens are not trained on)."""
CF_TIME = "selflock_cf_time_s"
"""Seconds spent on those branches (also included in the agent loop's ``generate_sequences`` time)."""

STOP_ANSWER = "answer"
STOP_DONE = "done"
STOP_MAX_TURNS = "max_turns"
STOP_RESPONSE_LENGTH = "response_length"
STOP_T3 = "t3"

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
class EpisodeStats:
    """What one ``active_reasoning`` episode produced, as the reward manager needs it."""

    reward: float = 0.0
    success: bool = False
    answered: bool = False
    turns: int = 0
    invalid_actions: int = 0
    repeated_actions: int = 0
    as_pos: int = 0
    as_neg: int = 0
    bt_pos: int = 0
    bt_neg: int = 0
    action_rounds: int = 0
    update_rounds: int = 0
    judged_turns: int = 0
    info_gain_sum: float = 0.0
    info_gain_count: int = 0
    psi_delta_sum: float = 0.0
    psi_delta_count: int = 0
    truncated: bool = False
    obs_truncated: int = 0
    stop_reason: str = ""
    task: str = ""
    env_metrics: dict[str, float] = field(default_factory=dict)
    t3_enabled: bool = False
    t3_truncated: bool = False
    t3_turn: int = 0
    t3_budget_saved: int = 0
    last_psi: float | None = field(default=None, repr=False, compare=False)
    """Psi_hat after the latest update that reported one (bookkeeping of :meth:`count_step`, not exported)."""

    def count_step(self, round_kind: str, step: Any, closing_tag: str | None = None) -> str:
        """Count one judged turn: ``round_kind`` is the round it was played in (``"action"``, ``"update"``
        or ``"answer"``), ``step`` a :class:`verl_selflock.envs.StepResult` and ``closing_tag`` the tag the
        turn was cut at (``"answer"`` makes it the answer turn, see :func:`judged_round`). Shared by the
        training loop and ``verl-selflock eval`` so that both report the same numbers. Returns the kind
        of turn it was counted as."""
        from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT

        kind = judged_round(round_kind, closing_tag)
        self.judged_turns += 1
        self.invalid_actions += int(not step.valid)
        self.repeated_actions += int(bool(step.repeated))
        self.action_rounds += int(kind == ROUND_ACTION)
        self.update_rounds += int(kind == ROUND_UPDATE)
        z, channel = step.label.critique, step.label.channel
        if channel == CHANNEL_AS:
            self.as_pos += int(z > 0)
            self.as_neg += int(z < 0)
        elif channel == CHANNEL_BT:
            self.bt_pos += int(z > 0)
            self.bt_neg += int(z < 0)
        info = step.info if isinstance(step.info, Mapping) else {}
        gain = _finite(info.get("info_gain"))
        if gain is not None:
            self.info_gain_sum += gain
            self.info_gain_count += 1
        if kind == ROUND_UPDATE:  # psi_delta is "change of Psi_hat per Update round": an answer's psi is no update
            self._count_psi(info)
        return kind

    def _count_psi(self, info: Mapping[str, Any]) -> None:
        psi = _finite(info.get("psi"))
        if psi is None:
            return
        previous = _finite(info.get("psi_prev"))
        previous = self.last_psi if previous is None else previous
        if previous is not None:
            self.psi_delta_sum += psi - previous
            self.psi_delta_count += 1
        self.last_psi = psi

    def as_extra_fields(self) -> dict[str, Any]:
        return {
            REWARD: float(self.reward),
            SUCCESS: bool(self.success),
            ANSWERED: bool(self.answered),
            TURNS: int(self.turns),
            INVALID_ACTIONS: int(self.invalid_actions),
            REPEATED_ACTIONS: int(self.repeated_actions),
            AS_POS: int(self.as_pos),
            AS_NEG: int(self.as_neg),
            BT_POS: int(self.bt_pos),
            BT_NEG: int(self.bt_neg),
            ACTION_ROUNDS: int(self.action_rounds),
            UPDATE_ROUNDS: int(self.update_rounds),
            JUDGED_TURNS: int(self.judged_turns),
            INFO_GAIN_SUM: float(self.info_gain_sum),
            INFO_GAIN_COUNT: int(self.info_gain_count),
            PSI_DELTA_SUM: float(self.psi_delta_sum),
            PSI_DELTA_COUNT: int(self.psi_delta_count),
            TRUNCATED: bool(self.truncated),
            OBS_TRUNCATED: int(self.obs_truncated),
            STOP_REASON: str(self.stop_reason),
            TASK: str(self.task),
            ENV_METRICS: {str(k): float(v) for k, v in self.env_metrics.items()},
            T3_ENABLED: bool(self.t3_enabled),
            T3_TRUNCATED: bool(self.t3_truncated),
            T3_TURN: int(self.t3_turn),
            T3_BUDGET_SAVED: int(self.t3_budget_saved),
        }

    @classmethod
    def from_extra_fields(cls, fields: Mapping[str, Any] | None) -> EpisodeStats | None:
        """Read the stats back; None if ``fields`` does not carry an outcome (another agent loop)."""
        if not fields or fields.get(REWARD) is None:
            return None

        def scalar(key: str, default: Any) -> Any:
            value = fields.get(key, default)
            # Columns of the legacy trainer arrive as numpy scalars: unwrap them.
            return value.item() if hasattr(value, "item") else value

        env_metrics = fields.get(ENV_METRICS) or {}
        return cls(
            reward=float(scalar(REWARD, 0.0)),
            success=bool(scalar(SUCCESS, False)),
            answered=bool(scalar(ANSWERED, False)),
            turns=int(scalar(TURNS, 0)),
            invalid_actions=int(scalar(INVALID_ACTIONS, 0)),
            repeated_actions=int(scalar(REPEATED_ACTIONS, 0)),
            as_pos=int(scalar(AS_POS, 0)),
            as_neg=int(scalar(AS_NEG, 0)),
            bt_pos=int(scalar(BT_POS, 0)),
            bt_neg=int(scalar(BT_NEG, 0)),
            action_rounds=int(scalar(ACTION_ROUNDS, 0)),
            update_rounds=int(scalar(UPDATE_ROUNDS, 0)),
            judged_turns=int(scalar(JUDGED_TURNS, _legacy_judged_turns(fields))),
            info_gain_sum=float(scalar(INFO_GAIN_SUM, 0.0)),
            info_gain_count=int(scalar(INFO_GAIN_COUNT, 0)),
            psi_delta_sum=float(scalar(PSI_DELTA_SUM, 0.0)),
            psi_delta_count=int(scalar(PSI_DELTA_COUNT, 0)),
            truncated=bool(scalar(TRUNCATED, False)),
            obs_truncated=int(scalar(OBS_TRUNCATED, 0)),
            stop_reason=str(scalar(STOP_REASON, "")),
            task=str(scalar(TASK, "")),
            env_metrics=dict(env_metrics) if isinstance(env_metrics, Mapping) else {},
            t3_enabled=bool(scalar(T3_ENABLED, False)),
            t3_truncated=bool(scalar(T3_TRUNCATED, False)),
            t3_turn=int(scalar(T3_TURN, 0)),
            t3_budget_saved=int(scalar(T3_BUDGET_SAVED, 0)),
        )


def _legacy_judged_turns(fields: Mapping[str, Any]) -> int:
    """Judged turns of a record written before ``selflock_judged_turns`` existed (``episodes.jsonl`` of an
    older eval being resumed): its rounds plus the answer turn when the episode ended on one."""
    rounds = int(_finite(fields.get(ACTION_ROUNDS)) or 0) + int(_finite(fields.get(UPDATE_ROUNDS)) or 0)
    ended_on_answer = fields.get(STOP_REASON) in (STOP_ANSWER, STOP_DONE) or bool(fields.get(ANSWERED))
    return rounds + int(ended_on_answer)


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (absent, not a number, NaN or infinite)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
