"""T3: truncate belief-trapped episodes (arXiv 2510.12264, "Reducing Belief Deviation in RL for
Active Reasoning of LLM Agents": its truncation rule over a window of k turns).

Once an agent's belief stops making progress, later turns are an uninformative tail that biases the
credit of the earlier, useful turns. T3 ends the rollout there. Rule: after turn ``t`` (1-based),
cut the episode if the progress measure ``d`` of each of the last ``k`` *measured* turns is
``<= delta_min`` and ``t >= min_turn``. Only the stopping point of the rollout changes; the episode is
then scored by its environment as it stands (``env.result()``), so T3 composes with any estimator
(PPO, GRPO, GSPO, AREW, IGPO).

Signals come from the environment (``StepResult.progress``, signal name -> value; see
:mod:`verl_selflock.envs.base`). A turn that does not measure progress (an empty entry, e.g. a PE
Action round, whose belief is only written in the following Update round) is skipped: the window
counts measured turns, so "k = 2" in PE means two consecutive Update rounds without progress.

Plain Python (no torch, no veRL): the agent loop calls it once per turn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from verl_selflock.algorithms.config_node import checked_kwargs

CONFIG_PATH = "t3"
"""Key of the settings in the ``active_reasoning`` agent-loop config; errors name ``t3.<field>``."""
AUTO_SIGNAL = "auto"


def t3_cut_turn(
    progress: Sequence[float | None], k: int, delta_min: float = 0.0, min_turn: int = 0
) -> int | None:
    """The first turn after which T3 ends the episode, or None.

    Args:
        progress: per turn, in order (index 0 = turn 1), the progress measure of that turn, or None when
            the turn does not measure progress.
        k: window size (>= 1): number of consecutive *measured* turns that must show no progress.
        delta_min: a measured turn shows no progress when its value is ``<= delta_min``.
        min_turn: never cut before this many turns were played (tau2: 6).

    Returns:
        ``t`` (1-based): keep turns ``1..t``, generate nothing after them. None when the rule never fires.
    """
    if k < 1:
        raise ValueError(f"{CONFIG_PATH}.k must be >= 1, got {k}")
    stalled = 0  # length of the current run of measured turns without progress
    for turn, value in enumerate(progress, start=1):
        if value is not None:
            stalled = stalled + 1 if value <= delta_min else 0
        # Firing only on a measured turn: an unmeasured turn adds no evidence of a trap.
        if value is not None and stalled >= k and turn >= min_turn:
            return turn
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class T3Config:
    """Validated ``t3`` settings of the ``active_reasoning`` agent loop. ``None`` = the task's default."""

    enabled: bool = False
    """Turn T3 on."""
    signal: str = AUTO_SIGNAL
    """Name of the progress signal (``StepResult.progress`` key); ``auto`` = the task's first (default)
    signal. PE: ``psi_gain`` (similarity of the belief to w* rises; default) or ``movement`` (truth-free: the
    estimate's direction moves). MediQ, FloDial and tau2: ``new_information``
    (:data:`verl_selflock.envs.base.NEW_INFORMATION_SIGNAL`, 1.0 when the turn brought new information)."""
    k: int | None = None
    """Window: consecutive measured turns without progress that trigger the cut (>= 1)."""
    delta_min: float | None = None
    """A measured turn makes no progress when its value is <= delta_min."""
    min_turn: int | None = None
    """Never cut before this many turns (>= 0)."""

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"{CONFIG_PATH}.enabled must be true or false, got {self.enabled!r}")
        if not isinstance(self.signal, str) or not self.signal:
            raise ValueError(f"{CONFIG_PATH}.signal must be a signal name or '{AUTO_SIGNAL}', got {self.signal!r}")
        if self.k is not None and (not _is_int(self.k) or self.k < 1):
            raise ValueError(f"{CONFIG_PATH}.k must be an integer >= 1, got {self.k!r}")
        if self.min_turn is not None and (not _is_int(self.min_turn) or self.min_turn < 0):
            raise ValueError(f"{CONFIG_PATH}.min_turn must be an integer >= 0, got {self.min_turn!r}")
        if self.delta_min is not None:
            if isinstance(self.delta_min, bool) or not isinstance(self.delta_min, int | float):
                raise ValueError(f"{CONFIG_PATH}.delta_min must be a number, got {self.delta_min!r}")
            if not math.isfinite(self.delta_min):
                raise ValueError(f"{CONFIG_PATH}.delta_min must be finite, got {self.delta_min!r}")
            object.__setattr__(self, "delta_min", float(self.delta_min))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> T3Config:
        """Build from the ``t3`` mapping of the agent-loop config (None or empty: T3 off).

        Raises:
            ValueError: on an unknown key (listing the known ones) or an invalid value (naming ``t3.<field>``).
        """
        if mapping is None:
            return cls()
        if isinstance(mapping, T3Config):
            return mapping
        return cls(**checked_kwargs(cls, mapping, CONFIG_PATH))

    def check_signal_known(self, known_signals: Sequence[str]) -> None:
        """Raise if ``signal`` is not ``auto`` and no registered task reports it."""
        if self.enabled and self.signal != AUTO_SIGNAL and self.signal not in known_signals:
            raise ValueError(
                f"{CONFIG_PATH}.signal={self.signal!r} is not reported by any registered task; "
                f"known signals: {sorted(set(known_signals))} or '{AUTO_SIGNAL}'"
            )


@dataclass(frozen=True)
class T3Rule:
    """The T3 rule resolved for one task: which signal, window, threshold and minimum turn."""

    signal: str
    k: int
    delta_min: float
    min_turn: int

    @classmethod
    def resolve(cls, config: T3Config, task: str, signals: Mapping[str, Any]) -> T3Rule:
        """Fill the config's ``None`` fields from the task's :class:`~verl_selflock.envs.base.ProgressSignal`.

        Args:
            config: the loop's T3 settings.
            task: task name (for the error message).
            signals: the environment class's ``progress_signals`` (name -> ProgressSignal).
        """
        if not signals:
            raise ValueError(f"{CONFIG_PATH}.enabled is set but task {task!r} reports no T3 progress signal")
        name = next(iter(signals)) if config.signal == AUTO_SIGNAL else config.signal
        if name not in signals:
            raise ValueError(
                f"{CONFIG_PATH}.signal={config.signal!r}: task {task!r} reports only {sorted(signals)}"
            )
        default = signals[name]
        return cls(
            signal=name,
            k=config.k if config.k is not None else int(default.k),
            delta_min=config.delta_min if config.delta_min is not None else float(default.delta_min),
            min_turn=config.min_turn if config.min_turn is not None else int(default.min_turn),
        )


class T3Monitor:
    """Per-episode state of T3: feed each turn's ``StepResult.progress``, ask whether to cut.

    Equivalent to re-running :func:`t3_cut_turn` on the whole history after every turn (tested), in O(1).
    """

    def __init__(self, rule: T3Rule) -> None:
        self.rule = rule
        self.history: list[float | None] = []
        self._stalled = 0

    def observe(self, progress: Mapping[str, float]) -> bool:
        """Record the latest turn's progress; True if the episode must end after this turn."""
        value = progress.get(self.rule.signal)
        value = None if value is None else float(value)
        self.history.append(value)
        if value is None:
            return False
        self._stalled = self._stalled + 1 if value <= self.rule.delta_min else 0
        return self._stalled >= self.rule.k and len(self.history) >= self.rule.min_turn
