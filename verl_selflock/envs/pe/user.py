"""The simulated PE user: compares two reference movies under its hidden weights ``w*``.

Gated (PE-G): ``score_i = sum_{k in Focus} w_k x_ik``; full (PE-F): ``score_i = w . x_i``. The reply
is "Yes." if ``score_i > score_j + 1e-12``, "No." if the reverse, else "Equal." (the user feedback of
the authors' PE environment, github unimpor/T3), where ``i < j`` (queries are order-free). The
environment shows it after ``FEEDBACK_PREFIX``, followed by :func:`explain`.
"""

from __future__ import annotations

import numpy as np

from verl_selflock.envs.pe.parsing import PEAction

__all__ = ["TIE_TOL", "answer_query", "describe", "explain", "feedback_word"]

TIE_TOL = 1e-12  # feedback "Equal." band


def feedback_word(score_i: float, score_j: float) -> str:
    """The user's answer to "does movie i score higher than movie j?"."""
    if score_i > score_j + TIE_TOL:
        return "Yes."
    if score_j > score_i + TIE_TOL:
        return "No."
    return "Equal."


def answer_query(movies: np.ndarray, w_star: np.ndarray, action: PEAction) -> tuple[str, np.ndarray]:
    """User feedback to a (valid) query and the compared difference vector ``m_ij`` (restricted to the focus)."""
    x_i, x_j = movies[action.pair[0] - 1], movies[action.pair[1] - 1]
    weights = w_star
    if action.focus is not None:
        cols = [k - 1 for k in action.focus]
        x_i, x_j, weights = x_i[cols], x_j[cols], weights[cols]
    # Compare the two scores (not w.diff against 0) so that "Equal." means equal scores.
    return feedback_word(float(weights @ x_i), float(weights @ x_j)), x_i - x_j


def describe(action: PEAction) -> str:
    """The query in words (for the "you already asked" message)."""
    text = f"pair {action.pair[0]},{action.pair[1]}"
    if action.focus is not None:
        text += " with focus " + ",".join(map(str, action.focus))
    return text


def explain(action: PEAction, word: str) -> str:
    """The answer ``word`` spelled out, shown after it."""
    i, j = action.pair
    on = "" if action.focus is None else " on attributes " + ",".join(map(str, action.focus))
    if word == "Yes.":
        return f" (movie {i} scores higher than movie {j}{on})"
    if word == "No.":
        return f" (movie {i} scores lower than movie {j}{on})"
    return f" (movie {i} and movie {j} score the same{on})"
