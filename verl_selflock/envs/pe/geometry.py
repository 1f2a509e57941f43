"""Vector geometry of Preference Estimation: the similarity that scores beliefs, dominance, query differences.

The lowest module of the PE package: the environment (:mod:`verl_selflock.envs.pe.env`), the exact
belief tracker (:mod:`verl_selflock.envs.pe.oracle`) and the data builder all use it, and it imports
none of them.

* Belief readout ``Psi_hat = cos(v, w*)``; the outcome reward is 1 iff the answer's cosine with ``w*``
  exceeds :data:`COS_THRESHOLD` (0.88, i.e. ``(cos + 1) / 2 > 0.94``: the "binary similarity" that
  the T3 and AREW papers report for PE, with the threshold of the authors' code, github unimpor/T3).
* A query's difference ``m_ij = x_i - x_j`` (restricted to the focus in PE-G) is *dominated* when
  every component is >= :data:`DOMINANCE_TOL` or every one is <= -:data:`DOMINANCE_TOL`: its answer
  is the same for every non-negative ``w``, so the query cannot teach anything (the AS rule of the
  authors' PE environment, github unimpor/T3). An exact zero component counts neither way, so
  ``(3, 0)`` is "not dominated"; our data builder draws distinct values per attribute column, so
  differences never have zero components.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["COS_THRESHOLD", "DOMINANCE_TOL", "cosine", "direction_change", "focus_diff", "is_dominated"]

COS_THRESHOLD = 0.88  # binary similarity: (cos + 1) / 2 > 0.94
DOMINANCE_TOL = 1e-5  # a component counts as positive/negative beyond this


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity, safe for huge or zero vectors (0.0 if either is zero)."""
    # Scale by the largest magnitude first so that norms of values near 1e308 do not overflow.
    sa, sb = float(np.max(np.abs(a))), float(np.max(np.abs(b)))
    if sa == 0.0 or sb == 0.0:
        return 0.0
    a, b = a / sa, b / sb
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def direction_change(a: np.ndarray, b: np.ndarray) -> float:
    """L2 distance between the directions of two non-zero estimates (in [0, sqrt(2)] for non-negative ones)."""

    def unit(v: np.ndarray) -> np.ndarray:
        v = v / np.max(np.abs(v))  # rescale first, as in cosine(), so huge values do not overflow
        return v / np.linalg.norm(v)

    return float(np.linalg.norm(unit(a) - unit(b)))


def is_dominated(diff: np.ndarray, tol: float = DOMINANCE_TOL) -> bool:
    """True if every component of ``diff`` is >= tol or every one is <= -tol (module docstring)."""
    return bool(np.all(diff >= tol) or np.all(diff <= -tol))


def focus_diff(movies: np.ndarray, pair: Sequence[int], focus: Sequence[int] | None) -> np.ndarray:
    """``x_i - x_j`` for a 1-based pair, zeroed outside the 1-based focus (all attributes if None)."""
    diff = movies[int(pair[0]) - 1] - movies[int(pair[1]) - 1]
    if focus is None:
        return diff
    mask = np.zeros_like(diff)
    mask[[int(k) - 1 for k in focus]] = 1.0
    return diff * mask
