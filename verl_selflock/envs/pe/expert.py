"""An expert policy for Preference Estimation (PE-G and PE-F) that writes demonstrations for a supervised warm start.

Small models fail the multi-turn format of the task long before they can learn anything from its
critiques; a short SFT on episodes played by this expert teaches the format (and sensible play). The
expert plays the real environment (:class:`verl_selflock.envs.pe.env.PreferenceEstimationEnv`, built
from a dataset row's env spec by :func:`verl_selflock.envs.base.make_env`) and reads only what an agent
reads: the movie table of the spec and the feedback word in each observation (never ``w*``).

Play (exact Bayesian belief tracking, :class:`verl_selflock.envs.pe.oracle.PEVersionSpace`: prior
draws ``w ~ Dirichlet(1)``, the builder's prior, and the mask of those consistent with every reply):

* **Action round**: among the queries not asked yet (every pair, and for PE-G every focus of ``S``
  attributes) that are not *dominated* (so the AS critique is +1), the one whose reply is expected to
  leave the *directions* of the consistent draws least spread out: the smallest expected within-side
  sum of squared distances of the unit-normalised draws to their side's mean direction (cosine is what
  scores the answer). Ties are broken by the expert's seed. Splitting the draws most evenly (the
  classic version-space halving) was tried first and is clearly worse on PE-G, where it spends queries
  on attributes that barely move the direction (200 training instances, seed 0: PE-G S=3 76% vs 96%,
  S=2 68% vs 96%, PE-F D=6 89% vs 94%, D=8 76% vs 76%).
* **Update round**: ``Guess:`` the posterior mean (centroid of the consistent draws), normalised to sum
  to 1 and written with :data:`DECIMALS` decimals. Its BT critique is whatever the environment judges
  (the centroid moves toward ``w*`` most of the time, not always).
* **Answer round**: the same estimate inside ``<answer>...</answer>``.

Each turn is one short ``<scratch>`` sentence and the block, ending exactly at its closing tag (the
turn text the agent loop keeps, :mod:`verl_selflock.episode.token_cut`), in the formats of
:mod:`verl_selflock.envs.pe.prompts`. Deterministic for (spec, seed).
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from verl_selflock.envs.base import EnvContext, RoundKind, make_env
from verl_selflock.envs.demonstration import Demonstration, ExpertTurn, play_turns
from verl_selflock.envs.pe.geometry import DOMINANCE_TOL
from verl_selflock.envs.pe.oracle import PEVersionSpace, seed_of
from verl_selflock.envs.pe.prompts import FEEDBACK_PREFIX

__all__ = ["DECIMALS", "EXPERT_SAMPLES", "Demonstration", "ExpertTurn", "PEExpert", "play_pe_expert"]

EXPERT_SAMPLES = 8192
"""Prior draws of the expert's version space (the env's own diagnostic uses 2048)."""
DECIMALS = 3
"""Decimals of a written estimate (normalised to sum 1): short enough for a small model, and rounding
costs no measurable success (cosine error below 1e-3)."""
_FEEDBACK_RE = re.compile(re.escape(FEEDBACK_PREFIX) + r"(Yes\.|No\.|Equal\.)")


class PEExpert:
    """The expert's state for one episode: the version space and the queries asked.

    Args:
        spec: the episode's env spec (``extra_info["env"]`` of a PE row); only the public part is read
            (variant, D, S, movies), never ``w_star``.
        seed: seeds the prior draws (with the episode's own id) and the tie-breaks.
        n_samples: prior draws of the version space.
    """

    def __init__(self, spec: Mapping[str, Any], seed: int = 0, n_samples: int = EXPERT_SAMPLES) -> None:
        if spec.get("task") != "pe" or spec.get("variant") not in ("gated", "full"):
            raise ValueError(f"the PE expert plays PE specs (task 'pe', variant gated|full), got {spec.get('task')!r}")
        if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
        self.variant = str(spec["variant"])
        self.D = int(spec["D"])
        self.S = int(spec["S"]) if self.variant == "gated" else None
        self.movies = np.stack([np.asarray(row, dtype=np.float64) for row in spec["movies"]])
        self.rng = np.random.default_rng([int(seed), seed_of(spec)])
        self.space = PEVersionSpace(self.D, int(self.rng.integers(2**32)), n_samples)
        self.queries, diffs = self._all_queries()
        self.diffs = diffs  # (n_queries, D): x_i - x_j, zero outside the focus
        dominated = np.all(diffs >= DOMINANCE_TOL, axis=1) | np.all(diffs <= -DOMINANCE_TOL, axis=1)
        self.open = ~dominated  # informative queries not asked yet
        self.pending: int | None = None  # index of the query awaiting its reply

    def _all_queries(self) -> tuple[list[tuple[tuple[int, int], tuple[int, ...] | None]], np.ndarray]:
        n = self.movies.shape[0]
        pairs = list(itertools.combinations(range(1, n + 1), 2))
        focuses: list[tuple[int, ...] | None] = (
            list(itertools.combinations(range(1, self.D + 1), self.S)) if self.S is not None else [None]
        )
        queries = [(pair, focus) for focus in focuses for pair in pairs]
        diffs = np.zeros((len(queries), self.D))
        for row, (pair, focus) in enumerate(queries):
            diff = self.movies[pair[0] - 1] - self.movies[pair[1] - 1]
            cols = [k - 1 for k in focus] if focus is not None else list(range(self.D))
            diffs[row, cols] = diff[cols]
        return queries, diffs

    # --- the three rounds --------------------------------------------------------------------------

    def action(self) -> str:
        """The next Action round's turn: the open query whose reply leaves the directions of the consistent
        draws least spread out, in expectation over the reply (module docstring)."""
        candidates = np.flatnonzero(self.open)
        if candidates.size == 0:
            raise RuntimeError("no informative query left to ask")  # never with the builder's tables
        draws = self.space.samples[self.space.consistent].astype(np.float32)  # (n_consistent, D)
        units = draws / np.linalg.norm(draws, axis=1, keepdims=True)
        margins = draws @ self.diffs[candidates].T.astype(np.float32)  # (n_consistent, n_open)
        spread = _within_spread(margins > 0, units) + _within_spread(margins < 0, units)  # (n_open,)
        best = candidates[spread <= spread.min() * (1 + 1e-6) + 1e-9]
        chosen = int(best[self.rng.integers(best.size)])
        self.open[chosen] = False
        self.pending = chosen
        (i, j), focus = self.queries[chosen]
        keys = ",".join(map(str, focus)) if focus is not None else ""
        on = f" on attributes {keys}" if focus is not None else ""
        scratch = f"Comparing movies {i} and {j}{on} best narrows down the weights that still fit the replies."
        block = f"Pair: {i},{j}" if focus is None else f"Focus: {keys}\nPair: {i},{j}"
        return f"<scratch>{scratch}</scratch>\n<interact>\n{block}\n</interact>"

    def observe(self, observation: str | None) -> None:
        """Read the reply to the pending query from the observation text (as an agent reads it)."""
        if self.pending is None:
            return
        query, self.pending = self.pending, None
        match = _FEEDBACK_RE.search(observation or "")
        if match is not None:
            self.space.observe(self.diffs[query], match.group(1))  # NaN (no update) if no draw agrees

    def estimate(self) -> str:
        """The posterior mean, normalised to sum 1, as ``w1,...,wD``."""
        centroid = self.space.centroid()
        centroid = centroid / centroid.sum()
        values = np.round(centroid, DECIMALS)
        if not np.any(values > 0):  # cannot happen for a centroid of simplex draws; keep the format valid
            values = np.full(self.D, round(1.0 / self.D, DECIMALS))
        return ",".join(f"{v:.{DECIMALS}f}" for v in values)

    def update(self) -> str:
        """The next Update round's turn."""
        scratch = "My estimate is the average of the weights that fit every reply so far."
        return f"<scratch>{scratch}</scratch>\n<interact>Guess: {self.estimate()}</interact>"

    def answer(self) -> str:
        """The Answer round's turn."""
        scratch = "My final estimate is the average of the weights that fit every reply."
        return f"<scratch>{scratch}</scratch>\n<answer>{self.estimate()}</answer>"

    def turn(self, kind: RoundKind) -> str:
        """The turn text for a round of ``kind``."""
        if kind is RoundKind.ACTION:
            return self.action()
        if kind is RoundKind.UPDATE:
            return self.update()
        return self.answer()


def _within_spread(side: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Per query, the sum of squared distances of the draws on one side of its hyperplane to their mean
    direction: ``sum |u|^2 - |sum u|^2 / n`` (``side``: (n_draws, n_queries) bool; ``units``: (n_draws, D))."""
    mask = side.astype(np.float32)
    count = mask.sum(axis=0)  # (n_queries,)
    total = mask.T @ units  # (n_queries, D)
    return count - (total * total).sum(axis=1) / np.maximum(count, 1.0)


def play_pe_expert(spec: Mapping[str, Any], seed: int = 0, n_samples: int = EXPERT_SAMPLES) -> Demonstration:
    """Play one episode of ``spec`` with :class:`PEExpert` through a fresh environment.

    The environment is built as the agent loop builds it (``make_env(spec)``, evaluation context: no
    training-only extras) and judges every turn; the episode ends when it says so (the answer turn).

    Returns:
        The :class:`Demonstration`: every turn with its text, observation and critique, and the outcome
        as ``env.result()`` scores it.
    """
    expert = PEExpert(spec, seed=seed, n_samples=n_samples)
    env = make_env(spec, context=EnvContext(training=False))
    turns = asyncio.run(play_turns(env, expert))  # PE's step never awaits: this is a plain loop
    result = env.result()
    return Demonstration(
        spec=dict(spec),
        turns=turns,
        success=bool(result.success),
        reward=float(result.reward),
        answer_cos=getattr(env, "answer_cos", None),
        seed=int(seed),
    )
