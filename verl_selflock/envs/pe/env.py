"""Preference Estimation (PE): recover a hidden non-negative weight vector from pairwise comparisons.

A simulated user scores reference movies with a hidden weight vector ``w*`` (one non-negative
weight per attribute). In Action rounds the agent asks the user to compare two movies; in Update
rounds it writes its current estimate of ``w*`` (its belief); in the Answer round it commits to a
final estimate, rewarded 1 if its cosine with ``w*`` exceeds 0.88 (the PE task of the AREW paper,
arXiv 2603.12109, with the rules of the authors' PE environment, github unimpor/T3).

Variants:

* ``gated`` (PE-G): each query names a focus of ``S`` attributes and a pair; the user compares
  ``score_i = sum_{k in Focus} w_k x_ik``. Block: ``Focus: k1,...,kS`` and ``Pair: p1,p2`` lines.
* ``full`` (PE-F): each query is a pair; ``score_i = w . x_i``. Block: one ``Pair: p1,p2`` line.

Directional critiques (AREW):

* Action round (AS): -1 if the action is missing/invalid, a repeat of an earlier (pair, focus),
  asked right after an invalid guess, or *dominated* (the difference ``x_i - x_j`` restricted to the
  focus has every component >= 1e-5 or every component <= -1e-5, so the answer is the same for
  every non-negative ``w`` and the query cannot teach anything: :mod:`verl_selflock.envs.pe.geometry`);
  +1 otherwise.
* Update round (BT, oracle): -1 if the guess is invalid; 0 if the preceding action got no
  feedback or its AS label was -1 (no admissible evidence to judge the update against); else +1 iff
  ``cos(v_t, w*) > cos(v_prev, w*)`` with ``v_prev`` the previous valid guess or the prior
  (0.5 in every component). ``Psi_hat = cos(v, w*)`` is reported in ``info["psi_hat"]``.
* Answer turn (and an early ``<answer>`` in any round): 0.

Parsing (see :mod:`verl_selflock.envs.parsing` and :mod:`verl_selflock.envs.pe.parsing`): the turn
is cut after its first ``</interact>`` or ``</answer>``; that tag decides what the turn is. An
action block must consist of exactly the ``Focus:`` and ``Pair:`` lines (gated, either order) or the
``Pair:`` line (full), nothing else. A turn cut at ``</answer>`` ends the episode in any round, and
the answer is the content of that block: the reward is computed from the answer the agent actually
gave, never from a search over the transcript (whose observations mention the answer tags). A
malformed answer scores 0.

Counters in :meth:`PreferenceEstimationEnv.result` metrics: ``invalid_actions`` counts action
rounds whose block did not parse, ``repeats`` those that repeated an earlier query (both get an
"Invalid query" observation and no feedback; ``StepResult.valid`` is False for both);
``invalid_guesses`` counts Update rounds whose guess did not parse. Every Action round gets an
AS label of +1 or -1 (the episode runner counts the labels; the environment does not).

``StepResult.info`` keys: ``round``, ``turn``, and per round kind: action: ``pair``, ``focus``,
``feedback`` (the word shown), ``dominated``, ``previous_guess_valid`` or ``error``, and always
``info_gain``; update: ``guess``, ``psi`` (= ``psi_hat``), ``psi_prev`` or ``error``; answer:
``early``, ``answer``, ``answer_cos`` or ``error``.

Diagnostics: ``psi`` = Psi_hat = cos(guess, w*) after a valid update; ``info_gain`` = bits the
answer carried under exact Bayesian updating from the Dirichlet(1) prior
(:mod:`verl_selflock.envs.pe.oracle`; 0 for an invalid or repeated query and for withheld feedback).

Feedback ablation (``EnvContext.withhold_feedback``, ``verl-selflock eval --feedback unknown``): the
user's comparison is replaced by ``Unknown.`` (the rest of the observation, round instructions
included, is unchanged). Critiques and reward do not depend on what was shown, so they are computed
as usual.

Queries are order-free: ``Pair: 5,2`` is asked as (2, 5) and "Yes" means the movie with the
smaller index has the higher score (:mod:`verl_selflock.envs.pe.user`). An all-zero vector has no
direction and is invalid both as a guess and as an answer. Ties in the dominance rule: see
:mod:`verl_selflock.envs.pe.geometry`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, TurnLabel
from verl_selflock.envs.base import (
    ROUND_COUNTERS,
    EnvContext,
    EpisodeResult,
    ProgressSignal,
    RoundBasedEnv,
    RoundKind,
    StepResult,
    register_env,
    round_kind,
)
from verl_selflock.envs.parsing import Parsed, parse_weights
from verl_selflock.envs.pe.geometry import COS_THRESHOLD, cosine, direction_change, focus_diff, is_dominated
from verl_selflock.envs.pe.oracle import PEVersionSpace, seed_of
from verl_selflock.envs.pe.parsing import PEAction, parse_pe_action
from verl_selflock.envs.pe.prompts import FEEDBACK_PREFIX, action_instruction, answer_instruction, update_instruction
from verl_selflock.envs.pe.user import answer_query, describe, explain

__all__ = [
    "PE_VARIANTS",
    "DEFAULT_MAX_TURNS",
    "T3_PSI_GAIN",
    "T3_MOVEMENT",
    "PreferenceEstimationEnv",
]

PE_VARIANTS = ("gated", "full")
DEFAULT_MAX_TURNS = {"gated": 10, "full": 12}
T3_PSI_GAIN = "psi_gain"
T3_MOVEMENT = "movement"
PRIOR_VALUE = 0.5  # prior belief in every component


@register_env("pe")
class PreferenceEstimationEnv(RoundBasedEnv):
    """One PE-G or PE-F episode, built from a dataset row's ``extra_info["env"]``.

    Spec keys: ``task`` ("pe"), ``variant`` ("gated" | "full"), ``D`` (attributes), ``S`` (focus
    size, gated only), ``movies`` (n_movies lists of D floats), ``w_star`` (D non-negative floats,
    not all zero), ``max_turns`` (even), optional ``cos_threshold`` (default 0.88), and
    bookkeeping keys (``id``, ``seed``) that the environment ignores.
    """

    uninformative_feedback = "Unknown."
    progress_signals = {
        # T3 paper, PE: truncate once the belief's similarity to the truth stops rising, k = 2.
        T3_PSI_GAIN: ProgressSignal(
            k=2, delta_min=0.0, description="cos(guess, w*) - cos(previous valid guess or prior, w*)"
        ),
        # Its ground-truth-free variant: the estimate stops moving (directions, so scale is ignored).
        T3_MOVEMENT: ProgressSignal(
            k=2, delta_min=0.05, description="L2 distance between the unit-normalised guess and the previous one"
        ),
    }
    counters = ROUND_COUNTERS

    @classmethod
    def spec_default_max_turns(cls, spec: Mapping[str, Any]) -> int:
        """PE-G 10, PE-F 12 (0, which fails the turn check, for an unknown variant)."""
        return DEFAULT_MAX_TURNS.get(str(spec.get("variant")), 0)

    def __init__(
        self, spec: Mapping[str, Any], max_turns: int | None = None, context: EnvContext | None = None
    ) -> None:
        super().__init__(spec, max_turns=max_turns, context=context)
        self.variant = str(spec.get("variant"))
        if self.variant not in PE_VARIANTS:
            raise ValueError(f"PE variant must be one of {PE_VARIANTS}, got {self.variant!r}")
        required = ("D", "movies", "w_star", "S") if self.variant == "gated" else ("D", "movies", "w_star")
        missing = [key for key in required if key not in spec]
        if missing:
            raise ValueError(f"PE spec lacks {missing}")
        self.D = int(spec["D"])
        try:
            # Rows read back by pandas hold arrays of arrays (object dtype): stack them row by row.
            self.movies = np.stack([np.asarray(row, dtype=np.float64) for row in spec["movies"]])
            self.w_star = np.asarray(spec["w_star"], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"malformed PE spec: {err}") from err
        if self.movies.ndim != 2 or self.movies.shape[1] != self.D or self.movies.shape[0] < 2:
            raise ValueError(f"movies must be an (n >= 2, D={self.D}) table, got shape {self.movies.shape}")
        if self.w_star.shape != (self.D,) or np.any(self.w_star < 0) or not np.any(self.w_star > 0):
            raise ValueError("w_star must be D non-negative numbers, not all zero")
        if not (np.all(np.isfinite(self.movies)) and np.all(np.isfinite(self.w_star))):
            raise ValueError("movies and w_star must be finite")
        self.S: int | None = None
        if self.variant == "gated":
            self.S = int(spec["S"])
            if not 1 <= self.S <= self.D:
                raise ValueError(f"focus size S must be in 1..{self.D}, got {self.S}")
        self.n_movies = int(self.movies.shape[0])
        self.cos_threshold = float(spec.get("cos_threshold", COS_THRESHOLD))
        self.prior = np.full(self.D, PRIOR_VALUE)

        # Episode state.
        self.asked: set[tuple[tuple[int, int], tuple[int, ...]]] = set()
        self.last_guess_valid = True  # the prior counts as a valid belief before turn 2
        self.prev_valid_guess = self.prior
        self.last_action_label: int | None = None  # AS critique of the latest action round
        self.last_action_fed_back = False  # the latest action round produced feedback
        self.answer: tuple[float, ...] | None = None
        self.answer_cos: float | None = None
        self._version_space: PEVersionSpace | None = None  # built at the first answered query

    # --- public API ----------------------------------------------------------------------------

    def step_sync(self, text: str) -> StepResult:
        """:meth:`step` without the event loop (every PE round is synchronous)."""
        handler, args = self._route(text)
        return handler(*args)

    def result(self) -> EpisodeResult:
        success = self.answer_cos is not None and self.answer_cos > self.cos_threshold
        psi_final = cosine(self.prev_valid_guess, self.w_star)
        return self._outcome(success, self.answer is not None, psi_final=psi_final, answered=float(self.answer is not None))

    def ground_truth_answer(self) -> str:
        """``w*`` as the answer block's content (``w1,...,wD``, shortest exact decimals)."""
        return ",".join(np.format_float_positional(float(v), trim="-") for v in self.w_star)

    def next_round_of(self, turn: int) -> RoundKind:
        """Kind of the 1-based ``turn`` in this episode."""
        return round_kind(turn, self.max_turns)

    # --- parsing -------------------------------------------------------------------------------

    def parse_action(self, block: str | None) -> Parsed[PEAction]:
        """Parse an Action-round block: exactly the expected ``Key: value`` lines, nothing else."""
        return parse_pe_action(block, self.variant, self.S, self.D, self.n_movies)

    def parse_answer(self, block: str | None) -> Parsed[np.ndarray]:
        """A final estimate: exactly D finite non-negative numbers, not all zero."""
        return parse_weights(block, self.D)

    # --- rounds --------------------------------------------------------------------------------

    def _action_turn(self, block: str | None) -> StepResult:
        self.count("action_rounds")
        parsed = self.parse_action(block)
        info: dict[str, Any] = {"round": RoundKind.ACTION.value, "turn": self.turn}
        feedback_line: str
        repeated = False
        critique = 1
        if not parsed.ok:
            self.count("invalid_actions")
            critique = -1
            info.update(error=parsed.error, info_gain=0.0)
            feedback_line = f"Invalid query: {parsed.error}. No feedback this round."
            self.last_action_fed_back = False
        else:
            action = parsed.value
            assert action is not None
            info["pair"] = list(action.pair)
            info["focus"] = list(action.focus) if action.focus is not None else None
            if action.key in self.asked:
                self.count("repeats")
                repeated = True
                critique = -1
                info.update(error="repeated query", info_gain=0.0)
                feedback_line = f"Invalid query: you already asked about {describe(action)}. No feedback this round."
                self.last_action_fed_back = False
            else:
                self.asked.add(action.key)
                word, diff = answer_query(self.movies, self.w_star, action)
                dominated = is_dominated(diff)
                if self.context.withhold_feedback:
                    shown, gain, explanation = self.uninformative_feedback, 0.0, ""
                else:
                    shown, gain, explanation = word, self._information_of(action, word), explain(action, word)
                info.update(
                    feedback=shown, dominated=dominated, previous_guess_valid=self.last_guess_valid, info_gain=gain
                )
                if dominated or not self.last_guess_valid:
                    critique = -1
                feedback_line = FEEDBACK_PREFIX + shown + explanation
                self.last_action_fed_back = True
        label = TurnLabel(critique, CHANNEL_AS)
        self.last_action_label = critique
        follow = self._after_action("query", update_instruction(self.D), answer_instruction(self.D))
        valid = parsed.ok and not repeated
        return StepResult(f"{feedback_line}\n{follow}", label, done=False, valid=valid, repeated=repeated, info=info)

    def _update_turn(self, block: str | None) -> StepResult:
        self.count("update_rounds")
        parsed = parse_weights(block, self.D)
        info: dict[str, Any] = {"round": RoundKind.UPDATE.value, "turn": self.turn}
        # An invalid guess leaves the belief where it was: no progress on either T3 signal.
        progress = {T3_PSI_GAIN: 0.0, T3_MOVEMENT: 0.0}
        if not parsed.ok:
            self.count("invalid_guesses")
            self.last_guess_valid = False
            info["error"] = parsed.error
            critique = -1
            head = f"Invalid estimate: {parsed.error}. It was not recorded."
        else:
            guess = parsed.value
            assert guess is not None
            psi = cosine(guess, self.w_star)
            psi_prev = cosine(self.prev_valid_guess, self.w_star)
            info.update(guess=guess.tolist(), psi=psi, psi_hat=psi, psi_prev=psi_prev)
            progress = {T3_PSI_GAIN: psi - psi_prev, T3_MOVEMENT: direction_change(guess, self.prev_valid_guess)}
            if not self.last_action_fed_back or self.last_action_label == -1:
                critique = 0  # no admissible evidence: the update cannot be judged
            else:
                critique = 1 if psi > psi_prev else -1
            self.prev_valid_guess = guess
            self.last_guess_valid = True
            head = "Estimate recorded."
        follow = self._after_update(
            "query", "queries", action_instruction(self.variant, self.S, self.D, self.n_movies)
        )
        return StepResult(
            f"{head}\n{follow}", TurnLabel(critique, CHANNEL_BT), done=False, valid=parsed.ok, info=info,
            progress=progress,
        )

    def _record_answer(self, answer: np.ndarray) -> dict[str, Any]:
        self.answer = tuple(float(v) for v in answer)
        self.answer_cos = cosine(answer, self.w_star)
        return {"answer": list(self.answer), "answer_cos": self.answer_cos}

    # --- diagnostics ---------------------------------------------------------------------------

    def _information_of(self, action: PEAction, word: str) -> float:
        """Bits the answer ``word`` carries under exact Bayesian updating (NaN if the Monte-Carlo
        posterior ran out of draws, which the diagnostics skip)."""
        if self._version_space is None:
            self._version_space = PEVersionSpace(self.D, seed_of(self.spec))
        return self._version_space.observe(focus_diff(self.movies, action.pair, action.focus), word)
