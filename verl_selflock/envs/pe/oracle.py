"""Exact Bayesian belief tracking for Preference Estimation, by Monte-Carlo over the weight simplex.

A PE answer "Yes."/"No." to a query (pair i, j; focus F for PE-G) says on which side of the
hyperplane ``w_F . (x_i - x_j)_F = 0`` the hidden weights lie. Starting from the prior of the data
builder (``w* ~ Dirichlet(1)``: uniform on the simplex; cosine is scale-free, so the simplex loses
nothing), the posterior after any set of answers is the prior restricted to the cone consistent
with all of them. :class:`PEVersionSpace` represents it by a fixed seeded sample of prior draws
and a mask of the draws still consistent.

Two uses:

* ``info_gain`` of an Action round (:mod:`verl_selflock.envs.pe.env` sets ``StepResult.info["info_gain"]``):
  the information the answer carried, in bits, ``log2(n_consistent_before / n_consistent_after)``
  (the surprisal of the answer under the current posterior). A dominated query gains 0 bits, a query
  that splits the posterior in half gains 1 bit. Invalid or repeated queries, and every query when the
  feedback is withheld, gain 0.
* The oracle-BT analysis of ``verl-selflock eval --oracle-bt``: the agent's own queries, but the belief
  updated exactly: the posterior mean (the centroid of the consistent draws), which maximises the
  expected cosine to first order and is the standard Bayes estimate under squared loss.

The data builder resamples instances whose uniform prior guess would already score, so the true
prior is the Dirichlet(1) minus a small cap around the centre; the Monte-Carlo prior ignores that
(it changes the posterior mean only inside that cap).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from verl_selflock.envs.pe.geometry import COS_THRESHOLD, cosine, focus_diff

__all__ = ["DEFAULT_SAMPLES", "PEVersionSpace", "OracleBelief", "oracle_belief", "seed_of"]

DEFAULT_SAMPLES = 2048
"""Prior draws. After 5 halving queries ~64 remain: enough for a centroid within a few degrees."""

ANSWER_WORDS = ("Yes.", "No.", "Equal.")


def seed_of(spec: Mapping[str, Any]) -> int:
    """A seed that depends only on the episode (its id and dataset seed), so replays agree."""
    key = f"{spec.get('id', '')}|{spec.get('seed', 0)}".encode()
    return zlib.crc32(key)


class PEVersionSpace:
    """Prior draws of the weight vector and the mask of those consistent with the answers so far."""

    def __init__(self, D: int, seed: int, n_samples: int = DEFAULT_SAMPLES) -> None:
        if D < 1 or n_samples < 1:
            raise ValueError(f"need D >= 1 and n_samples >= 1, got D={D}, n_samples={n_samples}")
        self.samples = np.random.default_rng(seed).dirichlet(np.ones(D), size=n_samples)  # (n_samples, D)
        self.consistent = np.ones(n_samples, dtype=bool)

    @property
    def n_consistent(self) -> int:
        return int(self.consistent.sum())

    def observe(self, diff: np.ndarray, word: str) -> float:
        """Condition on the answer ``word`` to a query with difference ``diff`` = ``x_i - x_j``, zero
        outside the focus (shape (D,)). Returns the information gained in bits; NaN (and no update)
        if no draw agrees with the answer (the sample is too small to represent the posterior)."""
        margin = self.samples @ np.asarray(diff, dtype=np.float64)  # (n_samples,)
        if word == "Yes.":
            agrees = margin > 0
        elif word == "No.":
            agrees = margin < 0
        elif word == "Equal.":
            agrees = margin == 0
        else:
            raise ValueError(f"not an answer word: {word!r} (expected one of {ANSWER_WORDS})")
        before = self.n_consistent
        kept = self.consistent & agrees
        after = int(kept.sum())
        if after == 0:
            return math.nan
        self.consistent = kept
        return math.log2(before / after)

    def centroid(self) -> np.ndarray:
        """Posterior mean of the weights (shape (D,))."""
        return self.samples[self.consistent].mean(axis=0)


@dataclass(frozen=True)
class OracleBelief:
    """What exact belief tracking makes of an episode's own queries and answers."""

    belief: list[float]
    """Posterior mean of the weights after every answered query."""
    psi: float
    """Its cosine with ``w*`` (Psi_hat of the oracle belief)."""
    reward: float
    """The outcome reward that belief would get as the final answer (1 if psi > the threshold)."""
    answers_used: int
    n_consistent: int


def oracle_belief(
    spec: Mapping[str, Any],
    queries: Iterable[tuple[Sequence[int], Sequence[int] | None, str]],
    n_samples: int = DEFAULT_SAMPLES,
) -> OracleBelief:
    """Replay ``(pair, focus, answer word)`` queries of one episode with exact belief updating.

    Words other than Yes./No./Equal. (a withheld "Unknown.") carry nothing and are skipped.
    """
    movies = np.stack([np.asarray(row, dtype=np.float64) for row in spec["movies"]])
    w_star = np.asarray(spec["w_star"], dtype=np.float64)
    space = PEVersionSpace(int(spec["D"]), seed_of(spec), n_samples)
    used = 0
    for pair, focus, word in queries:
        if word in ANSWER_WORDS and not math.isnan(space.observe(focus_diff(movies, pair, focus), word)):
            used += 1
    belief = space.centroid()
    psi = cosine(belief, w_star)
    threshold = float(spec.get("cos_threshold", COS_THRESHOLD))
    return OracleBelief(
        belief=[float(v) for v in belief],
        psi=psi,
        reward=1.0 if psi > threshold else 0.0,
        answers_used=used,
        n_consistent=space.n_consistent,
    )
