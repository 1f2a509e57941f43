"""The per-episode record that the ``active_reasoning`` agent loop hands to training.

The agent loop stores :meth:`EpisodeStats.as_extra_fields` in ``AgentLoopOutput.extra_fields``; veRL
passes that dict to the reward loop as the sample's ``tool_extra_fields`` (and, on the legacy
trainer without streaming reward, spreads its keys as ``non_tensor_batch`` columns). The reward
manager, the diagnostics, IGPO and ``verl-selflock eval`` read it back with
:meth:`EpisodeStats.from_extra_fields`.

Each exported field ``name`` of :class:`EpisodeStats` travels under the key ``selflock_<name>``
(:data:`KEYS`); the writer and the reader are derived from the dataclass fields, so a new field needs
no other change. The field docstrings are the documentation of the keys. Keys written beside the
record by the agent loop: :data:`GT_ANSWER`, :data:`CF_BRANCHES`, :data:`CF_TIME`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

PREFIX = "selflock_"
GT_ANSWER = "selflock_gt_answer"
"""The task's ground-truth answer text (IGPO's scorer), if known."""
CF_BRANCHES = "selflock_cf_branches"
"""Counterfactual side branches generated in the episode (their tokens are not trained on)."""
CF_TIME = "selflock_cf_time_s"
"""Seconds spent on those branches (also included in the agent loop's ``generate_sequences`` time)."""

STOP_ANSWER = "answer"
STOP_DONE = "done"
STOP_MAX_TURNS = "max_turns"
STOP_RESPONSE_LENGTH = "response_length"
STOP_T3 = "t3"
STOP_ABORTED = "aborted"
"""The rollout server aborted the turn's generation (vLLM on a pause or weight sync): the episode ends there."""

@dataclass
class EpisodeStats:
    """What one ``active_reasoning`` episode produced, as the reward manager needs it. The turn counts are
    made by :class:`verl_selflock.episode.counting.TurnCounter` (training and eval alike)."""

    reward: float = 0.0
    """Outcome reward of the answer the episode actually produced (``EpisodeResult.reward``; 0 when it
    never answered)."""
    success: bool = False
    """The answer counts as a success."""
    answered: bool = False
    """The agent produced a well-formed final answer."""
    turns: int = 0
    """Agent turns generated (incl. a turn cut by the length budget)."""
    invalid_actions: int = 0
    """Turns the environment judged invalid (``StepResult.valid`` False: a bad action, guess or answer,
    or a repeated action)."""
    repeated_actions: int = 0
    """Turns that repeated an earlier action."""
    as_pos: int = 0
    """Action-round turns critiqued +1."""
    as_neg: int = 0
    """Action-round turns critiqued -1."""
    bt_pos: int = 0
    """Update-round turns critiqued +1."""
    bt_neg: int = 0
    """Update-round turns critiqued -1."""
    action_rounds: int = 0
    """Action-round turns the environment judged (an ``<answer>`` turn is never one, whatever round it
    came in)."""
    update_rounds: int = 0
    """Update-round turns the environment judged (idem)."""
    judged_turns: int = 0
    """Turns the environment judged: Action + Update rounds + the answer turn if one was played (a turn
    cut by the response budget is not)."""
    info_gain_sum: float = 0.0
    """Sum of ``StepResult.info["info_gain"]`` over the turns that set it."""
    info_gain_count: int = 0
    """Turns that set ``info["info_gain"]`` (0: the task defines none)."""
    psi_delta_sum: float = 0.0
    """Sum over Update rounds of the change of ``info["psi"]`` (Psi_hat, the belief's readout toward the
    truth); other turns' ``psi`` is ignored."""
    psi_delta_count: int = 0
    """Update rounds with such a change (``info["psi_prev"]`` or the previous Update round's ``psi``
    gives the previous value)."""
    truncated: bool = False
    """The episode was cut by ``rollout.response_length``."""
    obs_truncated: int = 0
    """Observations whose text was capped at ``max_obs_tokens``."""
    stop_reason: str = ""
    """``answer`` | ``done`` | ``max_turns`` | ``response_length`` | ``t3`` | ``aborted`` (the ``STOP_*``
    constants)."""
    task: str = ""
    """The environment's task name."""
    env_metrics: dict[str, float] = field(default_factory=dict)
    """``EpisodeResult.metrics``: task-specific scalars (simulator traffic, tool calls ...)."""
    t3_enabled: bool = False
    """T3 watched this episode (``t3.enabled`` and a training row)."""
    t3_truncated: bool = False
    """T3 ended the episode (belief trapped)."""
    t3_turn: int = 0
    """Turns kept when T3 cut (0 if it did not)."""
    t3_budget_saved: int = 0
    """Generation budget T3 left unused: min(tokens left in ``response_length``, turns left x
    ``max_turn_tokens``). An upper bound on the tokens saved (the episode might have ended earlier or
    used shorter turns), not a count of tokens saved."""
    aborted_generations: int = 0
    """Generations the rollout server aborted (vLLM returns no tokens, or a cut turn, with stop reason
    ``aborted``, when it pauses for a weight sync): an aborted real turn ends the episode unjudged
    (stop reason ``aborted``); an aborted counterfactual branch is dropped."""

    def as_extra_fields(self) -> dict[str, Any]:
        """The record as ``extra_fields`` entries: ``selflock_<field>`` -> plain Python value."""
        return {key: _COERCE[_TYPES[name]](getattr(self, name)) for name, key in KEYS.items()}

    @classmethod
    def from_extra_fields(cls, fields: Mapping[str, Any] | None) -> EpisodeStats | None:
        """Read the record back; None if ``fields`` does not carry an outcome (another agent loop).
        Missing keys take the field's default (a record written before ``selflock_judged_turns``
        existed gets its judged turns from its rounds)."""
        if not fields or fields.get(REWARD) is None:
            return None
        values: dict[str, Any] = {}
        for name, key in KEYS.items():
            if key not in fields or fields[key] is None:
                if name == "judged_turns":
                    values[name] = _legacy_judged_turns(fields)
                continue
            value = fields[key]
            # Columns of the legacy trainer arrive as numpy scalars: unwrap them.
            value = value.item() if hasattr(value, "item") else value
            values[name] = _COERCE[_TYPES[name]](value)
        return cls(**values)


_EXPORTED = [f for f in fields(EpisodeStats) if f.metadata.get("exported", True)]
KEYS: dict[str, str] = {f.name: PREFIX + f.name for f in _EXPORTED}
"""Field name -> its ``extra_fields`` key."""
_TYPES: dict[str, str] = {f.name: str(f.type) for f in _EXPORTED}


def _metrics_dict(value: Any) -> dict[str, float]:
    return {str(k): float(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


_COERCE: dict[str, Any] = {"float": float, "bool": bool, "int": int, "str": str, "dict[str, float]": _metrics_dict}
if set(_TYPES.values()) - set(_COERCE):  # a new field of a new type needs its coercion here
    raise TypeError(f"EpisodeStats field types without a coercion: {set(_TYPES.values()) - set(_COERCE)}")

REWARD = KEYS["reward"]
SUCCESS = KEYS["success"]
ANSWERED = KEYS["answered"]
TURNS = KEYS["turns"]
INVALID_ACTIONS = KEYS["invalid_actions"]
REPEATED_ACTIONS = KEYS["repeated_actions"]
AS_POS = KEYS["as_pos"]
AS_NEG = KEYS["as_neg"]
BT_POS = KEYS["bt_pos"]
BT_NEG = KEYS["bt_neg"]
TRUNCATED = KEYS["truncated"]
OBS_TRUNCATED = KEYS["obs_truncated"]
ACTION_ROUNDS = KEYS["action_rounds"]
UPDATE_ROUNDS = KEYS["update_rounds"]
JUDGED_TURNS = KEYS["judged_turns"]
INFO_GAIN_SUM = KEYS["info_gain_sum"]
INFO_GAIN_COUNT = KEYS["info_gain_count"]
PSI_DELTA_SUM = KEYS["psi_delta_sum"]
PSI_DELTA_COUNT = KEYS["psi_delta_count"]
STOP_REASON = KEYS["stop_reason"]
TASK = KEYS["task"]
ENV_METRICS = KEYS["env_metrics"]
T3_ENABLED = KEYS["t3_enabled"]
T3_TRUNCATED = KEYS["t3_truncated"]
T3_TURN = KEYS["t3_turn"]
T3_BUDGET_SAVED = KEYS["t3_budget_saved"]
ABORTED_GENERATIONS = KEYS["aborted_generations"]


def _legacy_judged_turns(fields: Mapping[str, Any]) -> int:
    """Judged turns of a record written before ``selflock_judged_turns`` existed (``episodes.jsonl`` of an
    older eval being resumed): its rounds plus the answer turn when the episode ended on one."""
    rounds = int(finite_or_none(fields.get(ACTION_ROUNDS)) or 0) + int(finite_or_none(fields.get(UPDATE_ROUNDS)) or 0)
    ended_on_answer = fields.get(STOP_REASON) in (STOP_ANSWER, STOP_DONE) or bool(fields.get(ANSWERED))
    return rounds + int(ended_on_answer)


def finite_or_none(value: Any) -> float | None:
    """``value`` as a finite float, or None (absent, not a number, NaN or infinite)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
