"""MediQ: diagnose from a partial case by asking a simulated patient, then pick one of four options.

The agent sees the patient's initial presentation, the question and options A-D (the MediQ task of the
AREW paper, arXiv 2603.12109, with the rules of the authors' MediQ environment, github unimpor/T3).
The rest of the case is a list of numbered atomic facts, hidden in the episode and known only to
the simulated patient: an LLM behind an OpenAI-compatible endpoint (``self.context.simulator``, the
agent loop's ``simulator:`` knob) that answers each question with at most two fact numbers or
"Unknown" (:func:`verl_selflock.envs.mediq.prompts.patient_messages`).

Rounds (``max_turns`` 8): Action rounds ``<interact>Query: ...</interact>``; Update rounds
``<interact>Guess: wA,wB,wC,wD</interact>``; the Answer round ``<answer>wA,wB,wC,wD</answer>``.
Beliefs are normalised to sum 1 before they are compared (the agent may write 0.4 or 40); the prior
is 0.25 per option. ``Psi_hat`` = the normalised weight on the true option.

Feedback to a query: the patient's reply is read robustly: the word "unknown" or no in-range
integer -> the fixed reply; otherwise the first two distinct in-range fact numbers. The facts among
them that were **not revealed before** in this episode are shown; if none are new, the fixed reply
(:data:`~verl_selflock.envs.mediq.prompts.FIXED_REPLY`). A repeated query (same text after
lower-casing, collapsing spaces and trimming end punctuation) gets the fixed reply without asking the
simulator. A simulator failure (after the client's retries) gets the fixed reply too.

Parsing (:mod:`verl_selflock.envs.parsing`): the turn is cut after its first ``</interact>`` or
``</answer>``. An Action block must hold exactly one ``Query: ...`` line and nothing else, as in FloDial
(:func:`~verl_selflock.envs.parsing.parse_query_block`: text injected after the question, a second
question or reasoning inside the block make the action invalid), and the question is at most
:data:`~verl_selflock.envs.parsing.MAX_QUERY_CHARS` (1,000) characters: a longer one is the agent's
invalid action (AS -1, counted in ``overlong_queries`` too), never sent to the patient.

Critiques (AREW):

* Action round (AS): -1 for an invalid block, an exact (normalised) repeat, or a fixed/empty reply;
  +1 when the reply revealed at least one new fact; 0 when the simulator failed (not the agent's fault:
  fallback role ``EXEMPT``, so no ``step_abs_sum`` fallback promotes it).
* Update round (BT): -1 if the guess is invalid. After uninformative feedback (fixed reply, invalid
  or repeated query, simulator failure): +1 iff the margin ``v[gt] - max(v[others])`` is unchanged
  from the previous valid belief (within 1e-6), else -1: no evidence, no belief change. After
  informative feedback, with the counterfactual on (training only): the agent loop also samples the
  update turn after the fixed reply on an untrained branch (:meth:`MediQEnv.observe_counterfactual`);
  +1 iff ``||v_cf - v_prev|| <= ||v_t - v_prev||`` (real evidence moves the belief at least as far
  as null evidence), else -1. When the counterfactual is off, at validation, or when the branch's
  guess did not parse: +1 iff ``Psi_hat`` rose, else -1.
* Answer turn (and an early ``<answer>``): 0. Outcome: 1 iff the answer's argmax is unique and is
  the correct option.

``StepResult.info``: ``round``, ``turn``; action: ``query``, ``feedback``, ``new_information``,
``info_gain`` (new facts), ``facts`` (new 1-based fact numbers), ``sim_ok``/``sim_cached``/``sim_error``
or ``error``; update: ``guess``, ``psi``, ``psi_prev``, ``bt_rule`` or ``error``; answer: ``answer``,
``correct``, ``answer_psi`` (the answer's weight on the truth) or ``error``. Episode metrics add
``sim_calls``, ``sim_cache_hits``, ``sim_failures``, ``facts_revealed``, ``cf_branches``, ``cf_invalid``,
``overlong_queries``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from verl_selflock.envs.base import EnvContext, EpisodeResult, RoundKind, StepResult, register_env
from verl_selflock.envs.mediq.prompts import (
    FEEDBACK_PREFIX,
    FIXED_REPLY,
    OPTION_LETTERS,
    action_instruction,
    answer_instruction,
    patient_messages,
    update_instruction,
)
from verl_selflock.envs.parsing import Parsed, cut_after_first_closing_tag, extract_block, parse_weights
from verl_selflock.envs.simulated_user import (
    QUERY_COUNTERS,
    ROUND_COUNTERS,
    SIMULATOR_COUNTERS,
    SimulatedUserEnv,
    new_information_signals,
)

__all__ = [
    "DEFAULT_MAX_TURNS",
    "MAX_FACTS_PER_REPLY",
    "MediQEnv",
    "margin",
    "normalise_query",
    "parse_patient_reply",
]

DEFAULT_MAX_TURNS = 8
N_OPTIONS = len(OPTION_LETTERS)
MAX_FACTS_PER_REPLY = 2
MARGIN_TOL = 1e-6  # "the margin did not change" on normalised beliefs
DISTANCE_TOL = 1e-9  # float round-off in the counterfactual distance comparison
_INT_RE = re.compile(r"(?<![0-9.])[0-9]{1,6}(?![0-9]|\.[0-9])")  # whole numbers, not decimals
_UNKNOWN_RE = re.compile(r"\bunknown\b", re.IGNORECASE)


def normalise_query(query: str) -> str:
    """Identity of a query for repeat detection: lower case, single spaces, no end punctuation."""
    return re.sub(r"\s+", " ", query).strip().strip("?.!;:, ").lower()


def parse_patient_reply(reply: str, n_facts: int) -> list[int] | None:
    """0-based fact indices named by the patient (first two distinct in-range), or None for "Unknown".

    "Unknown" anywhere, or no in-range integer, means the patient cannot answer. Out-of-range numbers
    are ignored (a small model may echo a number from the question).
    """
    if _UNKNOWN_RE.search(reply):
        return None
    indices: list[int] = []
    for token in _INT_RE.findall(reply):
        number = int(token)
        if 1 <= number <= n_facts and number - 1 not in indices:
            indices.append(number - 1)
            if len(indices) == MAX_FACTS_PER_REPLY:
                break
    return indices or None


def margin(belief: np.ndarray, truth: int) -> float:
    """``belief[truth] - max(belief[others])``: > 0 iff the truth is the unique favourite."""
    return float(belief[truth] - np.max(np.delete(belief, truth)))


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


@register_env("mediq")
class MediQEnv(SimulatedUserEnv):
    """One MediQ case, built from a dataset row's ``extra_info["env"]``.

    Spec keys: ``task`` ("mediq"), ``id`` (case id, part of the simulator cache key), ``options``
    (4 strings, A-D), ``answer_index`` (0-3), ``facts`` (the atomic facts, unnumbered), ``max_turns``,
    optional ``counterfactual_bt`` (default True), and prompt/bookkeeping keys (``initial``,
    ``question``, ``split``, ``source``) that the environment does not need.
    """

    uninformative_feedback = FIXED_REPLY
    progress_signals = new_information_signals(
        "1 if the Action round revealed a new fact, else 0 (Update rounds: not measured)"
    )
    default_max_turns = DEFAULT_MAX_TURNS
    simulator_hint = (
        "MediQ needs a simulated patient: set the active_reasoning agent loop's `simulator:` knob "
        "(base_url and model of an OpenAI-compatible endpoint, see recipes/mediq/README.md)"
    )
    counters = (*ROUND_COUNTERS, "unknown_replies", *SIMULATOR_COUNTERS, "cf_branches", "cf_invalid", *QUERY_COUNTERS)

    def __init__(
        self, spec: Mapping[str, Any], max_turns: int | None = None, context: EnvContext | None = None
    ) -> None:
        super().__init__(spec, max_turns, context)
        facts = spec.get("facts")
        options = spec.get("options")
        if facts is None or isinstance(facts, str) or not len(facts) or not all(isinstance(f, str) for f in facts):
            raise ValueError("MediQ spec needs 'facts': a non-empty list of strings")
        if options is None or isinstance(options, str) or len(options) != N_OPTIONS:
            raise ValueError(f"MediQ spec needs 'options': {N_OPTIONS} strings (A-D)")
        answer = spec.get("answer_index")
        if isinstance(answer, bool) or not isinstance(answer, int | np.integer) or not 0 <= int(answer) < N_OPTIONS:
            raise ValueError(f"MediQ spec needs 'answer_index' in 0..{N_OPTIONS - 1}, got {answer!r}")
        self.facts = [str(f) for f in facts]
        self.truth = int(answer)
        self.case_id = str(spec.get("id", ""))
        # Counterfactual BT branches are a training-time device: never at validation.
        self.counterfactual = _truthy(spec.get("counterfactual_bt", True)) and self.context.training
        self.prior = np.full(N_OPTIONS, 1.0 / N_OPTIONS)

        # Episode state.
        self.asked: set[str] = set()
        self.revealed: set[int] = set()
        self.prev_belief = self.prior
        self.last_feedback_informative = False
        self.cf_requested = False
        self.cf_belief: np.ndarray | None = None
        self.answer: np.ndarray | None = None
        self.correct = False

    # --- public API ----------------------------------------------------------------------------

    def observe_counterfactual(self, text: str) -> None:
        """The update turn sampled after the fixed reply instead of the real feedback (training only)."""
        if not self.cf_requested or not isinstance(text, str):
            return
        self.count("cf_branches")
        cut, tag = cut_after_first_closing_tag(text)
        parsed = self.parse_belief(extract_block(cut, "interact") if tag == "interact" else None)
        self.cf_belief = parsed.value if parsed.ok else None
        if not parsed.ok:
            self.count("cf_invalid")

    def result(self) -> EpisodeResult:
        return self._outcome(
            self.correct,
            self.answer is not None,
            answered=float(self.answer is not None),
            facts_revealed=float(len(self.revealed)),
            psi_final=float(self.prev_belief[self.truth]),
        )

    def round_instructions(self) -> tuple[str, str, str]:
        return action_instruction(), update_instruction(), answer_instruction()

    # --- parsing -------------------------------------------------------------------------------

    def parse_belief(self, block: str | None) -> Parsed[np.ndarray]:
        """A guess/answer: exactly 4 finite non-negative numbers, not all zero; returned normalised."""
        parsed = parse_weights(block, N_OPTIONS)
        if not parsed.ok:
            return parsed
        vector = parsed.value
        # Scale by the largest value first so that sums of values near 1e308 cannot overflow.
        vector = vector / float(np.max(vector))
        return Parsed(vector / vector.sum())

    # --- rounds --------------------------------------------------------------------------------

    async def _action_turn(self, block: str | None) -> StepResult:
        self.count("action_rounds")
        self.cf_requested, self.cf_belief = False, None
        info: dict[str, Any] = {"round": RoundKind.ACTION.value, "turn": self.turn}
        parsed = self.parse_query(block)  # counts invalid_actions / overlong_queries
        new_facts: list[int] = []
        repeated = False
        if not parsed.ok:
            info["error"] = parsed.error
            feedback = f"Invalid query: {parsed.error}. The patient did not hear a question."
            critique = -1
        else:
            query = parsed.value or ""
            key = normalise_query(query)
            info["query"] = query
            if key in self.asked:
                self.count("repeats")
                repeated = True
                info["error"] = "repeated query"
                feedback, critique = FEEDBACK_PREFIX + FIXED_REPLY, -1
            else:
                feedback, critique, new_facts = await self._ask_patient(query, key, info)
                if self.context.withhold_feedback:  # feedback ablation: judged as usual, shown as null
                    feedback = FEEDBACK_PREFIX + FIXED_REPLY
        self.revealed.update(new_facts)
        informative = bool(new_facts)
        self.last_feedback_informative = informative
        info.update(
            feedback=feedback,
            new_information=informative,
            info_gain=float(len(new_facts)),
            facts=[i + 1 for i in new_facts],
        )
        self.cf_requested = informative and self.counterfactual and self.next_round() is RoundKind.UPDATE
        # The side branch sees the same observation with the null reply in place of the facts.
        counterfactual = FEEDBACK_PREFIX + FIXED_REPLY if self.cf_requested else None
        return self._action_result(
            feedback, critique, info, parsed=parsed.ok, repeated=repeated, informative=informative,
            simulator_failed=info.get("sim_ok") is False, counterfactual=counterfactual,
        )

    async def _ask_patient(self, query: str, key: str, info: dict[str, Any]) -> tuple[str, int, list[int]]:
        """(feedback text, AS critique, new 0-based fact indices) for a fresh, valid query."""
        reply = await self._ask_simulator(patient_messages(self.facts, query), ("mediq", self.case_id, key))
        if not reply.ok or reply.text is None:
            info.update(sim_ok=False, sim_error=reply.error)
            # Not the agent's fault: critique 0, and the question may be asked again.
            return FEEDBACK_PREFIX + FIXED_REPLY, 0, []
        self.asked.add(key)
        info.update(sim_ok=True, sim_cached=bool(reply.cached), sim_reply=reply.text[:200])
        indices = parse_patient_reply(reply.text, len(self.facts))
        if indices is None:
            self.count("unknown_replies")
            return FEEDBACK_PREFIX + FIXED_REPLY, -1, []
        new = [i for i in indices if i not in self.revealed]
        if not new:
            return FEEDBACK_PREFIX + FIXED_REPLY, -1, []
        return FEEDBACK_PREFIX + " ".join(self.facts[i] for i in new), 1, new

    def _update_turn(self, block: str | None) -> StepResult:
        result = super()._update_turn(block)
        self.cf_requested, self.cf_belief = False, None  # a counterfactual branch serves one Update round
        return result

    def _record_belief(self, belief: np.ndarray, info: dict[str, Any]) -> int:
        prev = self.prev_belief
        psi, psi_prev = float(belief[self.truth]), float(prev[self.truth])
        info.update(guess=belief.tolist(), psi=psi, psi_prev=psi_prev)
        if not self.last_feedback_informative:
            info["bt_rule"] = "no_evidence"
            unchanged = abs(margin(belief, self.truth) - margin(prev, self.truth)) <= MARGIN_TOL
            critique = 1 if unchanged else -1
        elif self.cf_requested and self.cf_belief is not None:
            info["bt_rule"] = "counterfactual"
            d_cf = float(np.linalg.norm(self.cf_belief - prev))
            d_real = float(np.linalg.norm(belief - prev))
            info.update(cf_guess=self.cf_belief.tolist(), cf_distance=d_cf, distance=d_real)
            critique = 1 if d_cf <= d_real + DISTANCE_TOL else -1
        else:
            info["bt_rule"] = "toward_truth"
            critique = 1 if psi > psi_prev else -1
        self.prev_belief = belief
        return critique

    def _record_answer(self, answer: np.ndarray) -> dict[str, Any]:
        self.answer = answer
        # Unique argmax equal to the truth <=> the margin of the truth is positive.
        self.correct = margin(answer, self.truth) > 0
        # ``answer_psi``, not ``psi``: ``psi`` marks an Update round's belief (selflock/psi_delta).
        return {"answer": answer.tolist(), "correct": self.correct, "answer_psi": float(answer[self.truth])}
