"""Preference Estimation (PE): recover a hidden non-negative weight vector from pairwise comparisons.

A simulated user scores reference movies with a hidden weight vector ``w*`` (one non-negative
weight per attribute). In Action rounds the agent asks the user to compare two movies; in Update
rounds it writes its current estimate of ``w*`` (its belief); in the Answer round it commits to a
final estimate, rewarded 1 if its cosine with ``w*`` exceeds 0.88 (method notes §3.1).

Variants:

* ``gated`` (PE-G): each query names a focus of ``S`` attributes and a pair; the user compares
  ``score_i = sum_{k in Focus} w_k x_ik``. Block: ``Focus: k1,...,kS`` and ``Pair: p1,p2`` lines.
* ``full`` (PE-F): each query is a pair; ``score_i = w . x_i``. Block: one ``Pair: p1,p2`` line.

Directional critiques (AREW):

* Action round (AS): -1 if the action is missing/invalid, a repeat of an earlier (pair, focus),
  asked right after an invalid guess, or *dominated* (the difference ``x_i - x_j`` restricted to the
  focus has every component >= 1e-5 or every component <= -1e-5, so the answer is the same for
  every non-negative ``w`` and the query cannot teach anything); +1 otherwise.
* Update round (BT, oracle): -1 if the guess is invalid; 0 if the preceding action got no
  feedback or its AS label was -1 (no admissible evidence to judge the update against); else +1 iff
  ``cos(v_t, w*) > cos(v_prev, w*)`` with ``v_prev`` the previous valid guess or the prior
  (0.5 in every component). ``Psi_hat = cos(v, w*)`` is reported in ``info["psi_hat"]``.
* Answer turn (and an early ``<answer>`` in any round): 0.

Parsing (see :mod:`verl_selflock.envs.parsing`): the turn is cut after its first ``</interact>`` or
``</answer>``; that tag decides what the turn is. An action block must consist of exactly the
``Focus:`` and ``Pair:`` lines (gated, either order) or the ``Pair:`` line (full), nothing else. A
turn cut at ``</answer>`` ends the episode in any round, and the answer is the content of that
block: the reward is computed from the answer the agent actually gave, never from a search over
the transcript (whose observations mention the answer tags). A malformed answer scores 0.

Counters in :meth:`PreferenceEstimationEnv.result` metrics: ``invalid_actions`` counts action
rounds whose block did not parse, ``repeats`` those that repeated an earlier query (both get an
"Invalid query" observation and no feedback; ``StepResult.valid`` is False for both);
``invalid_guesses`` counts Update rounds whose guess did not parse. Every Action round gets an
AS label of +1 or -1, so ``as_pos + as_neg == action_rounds``.

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
smaller index has the higher score. An all-zero vector has no direction and is invalid both as a
guess and as an answer.

Note on ties: an exact zero component in the restricted difference is counted neither way by the
dominance rule (as in the method notes), so ``(3, 0)`` is "not dominated". Our data builder draws
distinct values per attribute column, so differences never have zero components.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from verl_selflock.envs.base import (
    EnvContext,
    EpisodeResult,
    ProgressSignal,
    RoundBasedEnv,
    RoundKind,
    StepResult,
    register_env,
    round_kind,
)
from verl_selflock.envs.parsing import (
    Parsed,
    extract_block,
    find_keyed_lines,
    parse_focus,
    parse_pair,
    parse_weights,
)
from verl_selflock.envs.pe.oracle import PEVersionSpace, focus_diff, seed_of
from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, CHANNEL_NONE, TurnLabel

__all__ = [
    "PE_VARIANTS",
    "DEFAULT_MAX_TURNS",
    "COS_THRESHOLD",
    "FEEDBACK_PREFIX",
    "PEAction",
    "PreferenceEstimationEnv",
    "cosine",
    "is_dominated",
    "action_block",
    "action_instruction",
    "update_instruction",
    "answer_instruction",
]

PE_VARIANTS = ("gated", "full")
DEFAULT_MAX_TURNS = {"gated": 10, "full": 12}
COS_THRESHOLD = 0.88  # binary similarity: (cos + 1) / 2 > 0.94
TIE_TOL = 1e-12  # feedback "Equal." band
DOMINANCE_TOL = 1e-5  # a component counts as positive/negative beyond this
T3_PSI_GAIN = "psi_gain"
T3_MOVEMENT = "movement"
PRIOR_VALUE = 0.5  # prior belief in every component
FEEDBACK_PREFIX = "The feedback of your latest query: "


@dataclass(frozen=True)
class PEAction:
    """A parsed PE query. Indices are 1-based and sorted, as shown to the agent."""

    pair: tuple[int, int]
    focus: tuple[int, ...] | None = None
    """Focus attributes (gated variant); None for the full variant."""

    @property
    def key(self) -> tuple[tuple[int, int], tuple[int, ...]]:
        """Identity used for repeat detection: the same pair with a different focus is a new query."""
        return self.pair, self.focus or ()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity, safe for huge or zero vectors (0.0 if either is zero)."""
    # Scale by the largest magnitude first so that norms of values near 1e308 do not overflow.
    sa, sb = float(np.max(np.abs(a))), float(np.max(np.abs(b)))
    if sa == 0.0 or sb == 0.0:
        return 0.0
    a, b = a / sa, b / sb
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _direction_change(a: np.ndarray, b: np.ndarray) -> float:
    """L2 distance between the directions of two non-zero estimates (in [0, sqrt(2)] for non-negative ones)."""

    def unit(v: np.ndarray) -> np.ndarray:
        v = v / np.max(np.abs(v))  # rescale first, as in cosine(), so huge values do not overflow
        return v / np.linalg.norm(v)

    return float(np.linalg.norm(unit(a) - unit(b)))


def is_dominated(diff: np.ndarray, tol: float = DOMINANCE_TOL) -> bool:
    """True if every component of ``diff`` is >= tol or every one is <= -tol (method notes §3.1)."""
    return bool(np.all(diff >= tol) or np.all(diff <= -tol))


# --- instruction texts (shared with the prompt builder so that both say the same thing) ---------
# No example numbers anywhere: nothing here can be parsed as an action or scored as an answer.


def _vector_format(D: int) -> str:
    return f"{D} non-negative numbers separated by commas, one per attribute in order"


def focus_placeholder(S: int) -> str:
    """``a,b,c`` for S=3: letters, never digits."""
    return ",".join("abcdefghijklmnopqrstuvwxyz"[:S]) if S <= 26 else "a,b,..."


def action_block(variant: str, S: int | None) -> str:
    """The Action-round block with letter placeholders."""
    if variant == "gated":
        return f"<interact>\nFocus: {focus_placeholder(S or 0)}\nPair: i,j\n</interact>"
    return "<interact>\nPair: i,j\n</interact>"


def action_instruction(variant: str, S: int | None, D: int, n_movies: int) -> str:
    """What to write in an Action round."""
    if variant == "gated":
        fields = f"Focus: {S} different attributes from 1 to {D}; Pair: two different movies from 1 to {n_movies}"
    else:
        fields = f"Pair: two different movies from 1 to {n_movies}"
    return (
        f"<scratch>...</scratch> then one new query\n{action_block(variant, S)}\n({fields}; nothing else in the "
        "block; do not repeat an earlier query)."
    )


def update_instruction(D: int) -> str:
    """What to write in an Update round."""
    return f"<scratch>...</scratch> then <interact>Guess: ...</interact> with {_vector_format(D)}."


def answer_instruction(D: int) -> str:
    """What to write in the Answer round (the tag pair encloses no number)."""
    return (
        "<scratch>...</scratch> then your final estimate between the tags <answer> and </answer>: "
        f"{_vector_format(D)}."
    )


def _feedback_word(score_i: float, score_j: float) -> str:
    if score_i > score_j + TIE_TOL:
        return "Yes."
    if score_j > score_i + TIE_TOL:
        return "No."
    return "Equal."


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


    def __init__(
        self, spec: Mapping[str, Any], max_turns: int | None = None, context: EnvContext | None = None
    ) -> None:
        spec_turns = spec.get("max_turns", DEFAULT_MAX_TURNS.get(str(spec.get("variant")), 0))
        super().__init__({**spec, "max_turns": spec_turns}, max_turns=max_turns, context=context)
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
        self.counts = dict.fromkeys(
            (
                "action_rounds",
                "update_rounds",
                "invalid_actions",
                "invalid_guesses",
                "repeats",
                "as_pos",
                "as_neg",
                "bt_pos",
                "bt_neg",
            ),
            0,
        )

    # --- public API ----------------------------------------------------------------------------

    def step_sync(self, text: str) -> StepResult:
        """:meth:`step` without the event loop (every PE round is synchronous)."""
        handler, args = self._route(text)
        return handler(*args)

    def result(self) -> EpisodeResult:
        success = self.answer_cos is not None and self.answer_cos > self.cos_threshold
        psi_final = cosine(self.prev_valid_guess, self.w_star)
        metrics = {key: float(value) for key, value in self.counts.items()}
        metrics.update(
            turns=float(self.turn),
            psi_final=psi_final,
            answered=float(self.answer is not None),
        )
        return EpisodeResult(
            reward=1.0 if success else 0.0, success=success, answered=self.answer is not None, metrics=metrics
        )

    def ground_truth_answer(self) -> str:
        """``w*`` as the answer block's content (``w1,...,wD``, shortest exact decimals)."""
        return ",".join(np.format_float_positional(float(v), trim="-") for v in self.w_star)

    def next_round_of(self, turn: int) -> RoundKind:
        """Kind of the 1-based ``turn`` in this episode."""
        return round_kind(turn, self.max_turns)

    # --- parsing -------------------------------------------------------------------------------

    def parse_action(self, block: str | None) -> Parsed[PEAction]:
        """Parse an Action-round block: exactly the expected ``Key: value`` lines, nothing else."""
        if block is None:
            return Parsed.fail("no <interact>...</interact> block")
        keyed, others = find_keyed_lines(block)
        expected = ("focus", "pair") if self.variant == "gated" else ("pair",)
        if others:
            return Parsed.fail(f"unexpected text in the block: {others[0].strip()[:40]!r}")
        if set(keyed) != set(expected) or any(len(values) != 1 for values in keyed.values()):
            lines = " and ".join(f"one '{key.capitalize()}:' line" for key in expected)
            return Parsed.fail(f"the block must contain exactly {lines}")
        pair = parse_pair(keyed["pair"][0], self.n_movies)
        if not pair.ok:
            return Parsed.fail(pair.error or "bad pair")
        focus: tuple[int, ...] | None = None
        if self.variant == "gated":
            parsed_focus = parse_focus(keyed["focus"][0], self.S or 0, self.D)
            if not parsed_focus.ok:
                return Parsed.fail(parsed_focus.error or "bad focus")
            focus = parsed_focus.value
        assert pair.value is not None
        return Parsed(PEAction(pair=pair.value, focus=focus))

    # --- rounds --------------------------------------------------------------------------------

    def _action_turn(self, block: str | None) -> StepResult:
        self.counts["action_rounds"] += 1
        parsed = self.parse_action(block)
        info: dict[str, Any] = {"round": RoundKind.ACTION.value, "turn": self.turn}
        feedback_line: str
        repeated = False
        critique = 1
        if not parsed.ok:
            self.counts["invalid_actions"] += 1
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
                self.counts["repeats"] += 1
                repeated = True
                critique = -1
                info.update(error="repeated query", info_gain=0.0)
                feedback_line = (
                    f"Invalid query: you already asked about {self._describe(action)}. No feedback this round."
                )
                self.last_action_fed_back = False
            else:
                self.asked.add(action.key)
                word, diff = self._answer_query(action)
                dominated = is_dominated(diff)
                if self.context.withhold_feedback:
                    shown, gain, explanation = self.uninformative_feedback, 0.0, ""
                else:
                    shown, gain, explanation = word, self._information_of(action, word), self._explain(action, word)
                info.update(
                    feedback=shown, dominated=dominated, previous_guess_valid=self.last_guess_valid, info_gain=gain
                )
                if dominated or not self.last_guess_valid:
                    critique = -1
                feedback_line = FEEDBACK_PREFIX + shown + explanation
                self.last_action_fed_back = True
        label = self._label(critique, CHANNEL_AS)
        self.last_action_label = critique
        next_kind = self.next_round_of(self.turn + 1)
        if next_kind is RoundKind.ANSWER:
            follow = f"That was your last query. Round {self.turn + 1} of {self.max_turns} is the Answer round: "
            follow += answer_instruction(self.D)
        else:
            follow = f"Round {self.turn + 1} of {self.max_turns} is an Update round: " + update_instruction(self.D)
        valid = parsed.ok and not repeated
        return StepResult(f"{feedback_line}\n{follow}", label, done=False, valid=valid, repeated=repeated, info=info)

    def _update_turn(self, block: str | None) -> StepResult:
        self.counts["update_rounds"] += 1
        parsed = parse_weights(block, self.D)
        info: dict[str, Any] = {"round": RoundKind.UPDATE.value, "turn": self.turn}
        # An invalid guess leaves the belief where it was: no progress on either T3 signal.
        progress = {T3_PSI_GAIN: 0.0, T3_MOVEMENT: 0.0}
        if not parsed.ok:
            self.counts["invalid_guesses"] += 1
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
            progress = {T3_PSI_GAIN: psi - psi_prev, T3_MOVEMENT: _direction_change(guess, self.prev_valid_guess)}
            if not self.last_action_fed_back or self.last_action_label == -1:
                critique = 0  # no admissible evidence: the update cannot be judged
            else:
                critique = 1 if psi > psi_prev else -1
            self.prev_valid_guess = guess
            self.last_guess_valid = True
            head = "Estimate recorded."
        label = self._label(critique, CHANNEL_BT)
        queries_left = (self.max_turns - self.turn) // 2
        follow = (
            f"Round {self.turn + 1} of {self.max_turns} is an Action round ({queries_left} "
            f"{'query' if queries_left == 1 else 'queries'} left including this one): "
            + action_instruction(self.variant, self.S, self.D, self.n_movies)
        )
        return StepResult(f"{head}\n{follow}", label, done=False, valid=parsed.ok, info=info, progress=progress)

    def _answer_turn(self, cut: str, tag: str | None, kind: RoundKind) -> StepResult:
        self.done = True
        block = extract_block(cut, "answer") if tag == "answer" else None
        parsed = parse_weights(block, self.D)
        info: dict[str, Any] = {"round": kind.value, "turn": self.turn, "early": kind is not RoundKind.ANSWER}
        if parsed.ok:
            answer = parsed.value
            assert answer is not None
            self.answer = tuple(float(v) for v in answer)
            self.answer_cos = cosine(answer, self.w_star)
            info.update(answer=list(self.answer), answer_cos=self.answer_cos)
        else:
            info["error"] = parsed.error if tag == "answer" else "no <answer>...</answer> block"
        return StepResult(None, TurnLabel(0, CHANNEL_NONE), done=True, valid=parsed.ok, info=info)

    # --- the simulated user --------------------------------------------------------------------

    def _answer_query(self, action: PEAction) -> tuple[str, np.ndarray]:
        """User feedback to a (valid) query and the compared difference vector ``m_ij``."""
        x_i, x_j = self.movies[action.pair[0] - 1], self.movies[action.pair[1] - 1]
        weights = self.w_star
        if action.focus is not None:
            cols = [k - 1 for k in action.focus]
            x_i, x_j, weights = x_i[cols], x_j[cols], weights[cols]
        # Compare the two scores (not w.diff against 0) so that "Equal." means equal scores.
        return _feedback_word(float(weights @ x_i), float(weights @ x_j)), x_i - x_j

    def _information_of(self, action: PEAction, word: str) -> float:
        """Bits the answer ``word`` carries under exact Bayesian updating (NaN if the Monte-Carlo
        posterior ran out of draws, which the diagnostics skip)."""
        if self._version_space is None:
            self._version_space = PEVersionSpace(self.D, seed_of(self.spec))
        return self._version_space.observe(focus_diff(self.movies, action.pair, action.focus), word)

    def _describe(self, action: PEAction) -> str:
        text = f"pair {action.pair[0]},{action.pair[1]}"
        if action.focus is not None:
            text += " with focus " + ",".join(map(str, action.focus))
        return text

    def _explain(self, action: PEAction, word: str) -> str:
        i, j = action.pair
        on = "" if action.focus is None else " on attributes " + ",".join(map(str, action.focus))
        if word == "Yes.":
            return f" (movie {i} scores higher than movie {j}{on})"
        if word == "No.":
            return f" (movie {i} scores lower than movie {j}{on})"
        return f" (movie {i} and movie {j} score the same{on})"
