"""A small stateful detector of information self-locking during training.

Rule (over the last ``window`` training steps, evaluated every step once the window is full):
fit a least-squares line to each series against the step and take its *rise over the window*
(slope * (window - 1)). The monitor fires when

* the reward rose: ``reward_rise >= min_reward_rise``, and
* every proxy that can be judged is flat or falling: ``rise <= max_proxy_rise`` for the AS proxy
  (share of informative queries) and the BT proxy (share of updates toward the truth).

A proxy can be judged when at least half the window has a value for it (a task without update
rounds has no BT proxy); with neither proxy judged the monitor never fires. A fitted line rather
than first-vs-last difference, so that one noisy batch neither triggers nor hides it.

Defaults: window 10, min_reward_rise 0.05 (reward is a success rate in [0, 1]), max_proxy_rise 0.01.
On firing it logs a WARNING that says what rose and what did not, repeated every ``warn_every``
steps while the condition holds, and the trainer logs ``selflock/self_locking`` (1 while it holds).
Settings: a top-level ``selflock_diagnostics`` node in the veRL config (``+selflock_diagnostics.window=20``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["MonitorConfig", "MonitorSubject", "SelfLockingMonitor", "Verdict", "rise_over_window"]


@dataclass(frozen=True)
class MonitorConfig:
    """Settings of :class:`SelfLockingMonitor` (keys of ``selflock_diagnostics``)."""

    window: int = 10
    """Training steps the trends are fitted over."""
    min_reward_rise: float = 0.05
    """Fitted rise of the mean reward over the window that counts as "reward rises"."""
    max_proxy_rise: float = 0.01
    """A proxy whose fitted rise over the window is at most this counts as "flat or falling"."""
    warn_every: int = 10
    """While the condition holds, repeat the warning every this many steps."""

    def __post_init__(self) -> None:
        # Checked on the driver (verl_selflock.verl_adapter.config_validation) so that a typo fails before Ray starts, not as a
        # TypeError in the trainer's first step or as a monitor that silently never fires (NaN, inf).
        _check_int(self, "window", minimum=3)
        _check_int(self, "warn_every", minimum=1)
        _check_number(self, "min_reward_rise")
        _check_number(self, "max_proxy_rise")
        if not self.min_reward_rise > 0:
            raise ValueError(f"selflock_diagnostics.min_reward_rise must be > 0, got {self.min_reward_rise!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> MonitorConfig:
        data = dict(mapping.items()) if mapping else {}
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"selflock_diagnostics: unknown key(s) {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**data)


def _check_int(config: MonitorConfig, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"selflock_diagnostics.{name} must be an int >= {minimum}, got {value!r}")


def _check_number(config: MonitorConfig, name: str) -> None:
    """``name`` must be a finite real number (an int from the command line is fine); stored as float."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"selflock_diagnostics.{name} must be a finite number, got {value!r}")
    object.__setattr__(config, name, float(value))


@dataclass(frozen=True)
class MonitorSubject:
    """What the monitored series are, for the warning (the rule is the same for every agent)."""

    as_name: str = "AS proxy (share of informative queries)"
    bt_name: str = "BT proxy (share of belief updates toward the truth)"
    advice: str = (
        "The agent may be gaining reward through shortcuts while it stops asking informative questions "
        "and stops using the feedback. Check selflock/as_proxy and selflock/bt_proxy; AREW "
        "(algorithm.adv_estimator=arew) counters this."
    )


@dataclass(frozen=True)
class Verdict:
    """The monitor's judgement after one step."""

    locked: bool
    reward_rise: float
    as_rise: float
    bt_rise: float
    """NaN where the series could not be judged (window not full, too few values)."""
    message: str = ""


def rise_over_window(values: np.ndarray) -> float:
    """Least-squares slope times (len - 1), over the finite entries (positions = steps); NaN if
    fewer than half the entries (or fewer than 2) are finite."""
    values = np.asarray(values, dtype=np.float64)
    steps = np.arange(values.shape[0], dtype=np.float64)
    finite = np.isfinite(values)
    if finite.sum() < max(2, math.ceil(values.shape[0] / 2)):
        return math.nan
    x, y = steps[finite], values[finite]
    x_centred = x - x.mean()
    slope = float((x_centred * (y - y.mean())).sum() / (x_centred**2).sum())
    return slope * (values.shape[0] - 1)


class SelfLockingMonitor:
    """Feed it one step at a time with :meth:`update`; see the module docstring for the rule."""

    def __init__(self, config: MonitorConfig | None = None, subject: MonitorSubject | None = None) -> None:
        self.config = config or MonitorConfig()
        self.subject = subject or MonitorSubject()
        size = self.config.window
        self._reward: deque[float] = deque(maxlen=size)
        self._as: deque[float] = deque(maxlen=size)
        self._bt: deque[float] = deque(maxlen=size)
        self._locked_steps = 0

    def update(self, step: int, reward: float | None, as_proxy: float | None, bt_proxy: float | None) -> Verdict:
        """Add one step's batch means (None/NaN where a value is missing) and judge the window."""
        for series, value in ((self._reward, reward), (self._as, as_proxy), (self._bt, bt_proxy)):
            series.append(math.nan if value is None else float(value))
        cfg = self.config
        if len(self._reward) < cfg.window:
            self._locked_steps = 0
            return Verdict(False, math.nan, math.nan, math.nan)
        reward_rise = rise_over_window(np.asarray(self._reward))
        as_rise = rise_over_window(np.asarray(self._as))
        bt_rise = rise_over_window(np.asarray(self._bt))
        judged = [rise for rise in (as_rise, bt_rise) if not math.isnan(rise)]
        locked = (
            not math.isnan(reward_rise)
            and reward_rise >= cfg.min_reward_rise
            and bool(judged)
            and all(rise <= cfg.max_proxy_rise for rise in judged)
        )
        message = ""
        if locked:
            who = self.subject
            message = (
                f"possible information self-locking at step {step}: over the last {cfg.window} steps the mean "
                f"reward rose by {reward_rise:+.3f} while the {who.as_name} changed by {_fmt(as_rise)} and the "
                f"{who.bt_name} by {_fmt(bt_rise)}. {who.advice}"
            )
            if self._locked_steps % cfg.warn_every == 0:
                logger.warning(message)
            self._locked_steps += 1
        else:
            self._locked_steps = 0
        return Verdict(locked, reward_rise, as_rise, bt_rise, message)


def _fmt(rise: float) -> str:
    return "n/a (no data)" if math.isnan(rise) else f"{rise:+.3f}"
