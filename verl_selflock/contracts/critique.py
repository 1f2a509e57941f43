"""The per-token critique fields that agent loops hand to the advantage step.

This module is the contract between rollout (agent loops) and training (the `arew`
estimator and our v1 trainer mode). It imports neither veRL nor Ray.

An agent loop builds a :class:`ResponseLayout` while it appends tokens to the response
(``response = [turn_0, obs_0, turn_1, obs_1, ..., turn_T]``), labels each finished turn, and
stores ``layout.as_extra_fields()`` in ``AgentLoopOutput.extra_fields``. veRL keeps that dict per
sample (v1: in TransferQueue); our trainer mode fetches it and pads it into tensors
(:func:`verl_selflock.algorithms.critique_batch.collate_critiques`).

Fields (one entry per response token, aligned with ``AgentLoopOutput.response_ids``):

==========================  ======  ===================================================================
key                         dtype   meaning
==========================  ======  ===================================================================
``critique``                int8    the critique z of the turn that generated the token, in {-1, 0, +1};
                                    0 on observation tokens, the answer turn and padding
``critique_channel``        int8    ``CHANNEL_NONE`` (observation / answer turn / padding),
                                    ``CHANNEL_AS`` (Action round) or ``CHANNEL_BT`` (Update round)
``turn_ids``                int32   0-based index of the agent turn that generated the token;
                                    -1 on observation tokens and padding
``fallback_eligible``       int8    the :class:`FallbackRole` of the token's turn: what the
                                    ``step_abs_sum`` fallbacks may do with it if its critique is 0.
                                    0 ``ORDINARY``, 1 ``ELIGIBLE`` (may also become positive: tau2's
                                    warm-up turns), 2 ``EXEMPT`` (never promoted: the zero is not the
                                    agent's doing, e.g. the simulated user failed); 0 off turns
==========================  ======  ===================================================================

The key ``fallback_eligible`` predates the value 2 and keeps its name so that samples written as 0/1
flags read exactly as before (1 = eligible, 0 = ordinary); a sample without any of these keys gets no
AREW bonus at all.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

CRITIQUE = "critique"
CRITIQUE_CHANNEL = "critique_channel"
TURN_IDS = "turn_ids"
FALLBACK_ELIGIBLE = "fallback_eligible"
CRITIQUE_FIELDS = (CRITIQUE, CRITIQUE_CHANNEL, TURN_IDS, FALLBACK_ELIGIBLE)

CHANNEL_NONE = 0
CHANNEL_AS = 1
CHANNEL_BT = 2
CHANNEL_NAMES = {CHANNEL_NONE: "none", CHANNEL_AS: "as", CHANNEL_BT: "bt"}


class FallbackRole(enum.IntEnum):
    """What the ``step_abs_sum`` fallbacks may do with a turn whose critique is 0 (one value per turn).

    The fallbacks give one-sided trajectories a bonus by promoting zero turns: with negative turns but no
    positive one, ``ELIGIBLE`` zero turns become positive; with positive turns but no negative one, the
    ``ORDINARY`` and ``ELIGIBLE`` zero turns become negative. Neither fallback touches the trajectory's
    final turn, whatever its role. The role of a turn with a nonzero critique is never read.
    """

    ORDINARY = 0
    """A zero turn the agent is answerable for: may become negative, never positive."""
    ELIGIBLE = 1
    """May also become positive (tau2's warm-up turns: well formed, answered, no measurable progress yet)."""
    EXEMPT = 2
    """Promoted by neither fallback: the critique is 0 because the turn's outcome was not the agent's doing
    (the simulated user failed or hit its tool-step cap), so it must carry no bonus of either sign."""


@dataclass
class TurnLabel:
    """The critique of one agent turn."""

    critique: int = 0
    """Directional critique z_t in {-1, 0, +1}."""
    channel: int = CHANNEL_NONE
    """Which capability the turn exercised: CHANNEL_AS, CHANNEL_BT or CHANNEL_NONE."""
    fallback: FallbackRole = FallbackRole.ORDINARY
    """What the ``step_abs_sum`` fallbacks may do with this turn if its critique is 0 (a bool reads as
    ``ELIGIBLE`` / ``ORDINARY``, the flag this field replaced)."""

    def __post_init__(self) -> None:
        if self.critique not in (-1, 0, 1):
            raise ValueError(f"critique must be -1, 0 or +1, got {self.critique!r}")
        if self.channel not in CHANNEL_NAMES:
            raise ValueError(f"channel must be one of {sorted(CHANNEL_NAMES)}, got {self.channel!r}")
        if self.fallback not in set(FallbackRole):
            raise ValueError(f"fallback must be one of {[int(r) for r in FallbackRole]}, got {self.fallback!r}")
        self.fallback = FallbackRole(int(self.fallback))

    @property
    def fallback_eligible(self) -> bool:
        """The turn may be promoted to a positive one (role ``ELIGIBLE``)."""
        return self.fallback is FallbackRole.ELIGIBLE


@dataclass
class ResponseLayout:
    """Per-token bookkeeping of a multi-turn response, built while the agent loop runs.

    Tokens are appended in order; each generated span belongs to a turn whose label may be set
    after its tokens were appended (the critique is known only once the environment has answered).
    """

    turn_ids: list[int] = field(default_factory=list)
    labels: dict[int, TurnLabel] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.turn_ids)

    @property
    def num_turns(self) -> int:
        return len(self.labels)

    def add_turn_tokens(self, turn_index: int, num_tokens: int) -> None:
        """Append ``num_tokens`` tokens generated by the agent in turn ``turn_index``."""
        if turn_index < 0:
            raise ValueError("turn_index must be >= 0")
        self.labels.setdefault(turn_index, TurnLabel())
        self.turn_ids.extend([turn_index] * num_tokens)

    def add_observation_tokens(self, num_tokens: int) -> None:
        """Append ``num_tokens`` tokens that the model did not generate (masked out of the loss)."""
        self.turn_ids.extend([-1] * num_tokens)

    def set_label(self, turn_index: int, label: TurnLabel) -> None:
        self.labels[turn_index] = label

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens (the response was cut to the rollout's response length)."""
        del self.turn_ids[length:]

    def as_extra_fields(self) -> dict[str, list[int]]:
        """Per-token lists for ``AgentLoopOutput.extra_fields``."""
        turn_ids = np.asarray(self.turn_ids, dtype=np.int64)
        num_turns = (max(self.labels) + 1) if self.labels else 0
        # Index 0 of each lookup table is the "no turn" entry used by observation tokens (turn id -1).
        critique = np.zeros(num_turns + 1, dtype=np.int64)
        channel = np.zeros(num_turns + 1, dtype=np.int64)
        fallback = np.zeros(num_turns + 1, dtype=np.int64)
        for turn_index, label in self.labels.items():
            critique[turn_index + 1] = label.critique
            channel[turn_index + 1] = label.channel
            fallback[turn_index + 1] = int(label.fallback)
        lookup = turn_ids + 1
        return {
            CRITIQUE: critique[lookup].tolist(),
            CRITIQUE_CHANNEL: channel[lookup].tolist(),
            TURN_IDS: turn_ids.tolist(),
            FALLBACK_ELIGIBLE: fallback[lookup].tolist(),
        }


def iter_turn_labels(fields: Mapping[str, Sequence[int]]) -> Iterable[tuple[int, TurnLabel]]:
    """Recover (turn_index, label) pairs from one sample's per-token lists (for diagnostics, not hot paths)."""
    seen: dict[int, TurnLabel] = {}
    for turn, z, ch, fb in zip(
        fields[TURN_IDS], fields[CRITIQUE], fields[CRITIQUE_CHANNEL], fields[FALLBACK_ELIGIBLE], strict=True
    ):
        if turn >= 0 and turn not in seen:
            seen[turn] = TurnLabel(critique=int(z), channel=int(ch), fallback=FallbackRole(int(fb)))
    return sorted(seen.items())
