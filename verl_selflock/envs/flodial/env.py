"""FloDial: find which candidate fault of a troubleshooting flowchart a (simulated) user has.

An episode (built by :mod:`verl_selflock.data.flodial` from the FloDial flowcharts) is a problem
description, ``K`` candidate faults (terminal nodes of one flowchart, default 5, one of them true)
and the true fault's *reference table*: the yes/no questions on the flowchart path from the root
to that fault, each with the answer that leads toward it. In Action rounds the agent asks one
question; an LLM user simulator (reached through :class:`verl_selflock.simulators.ChatClient`,
``EnvContext.simulator``) matches it against the table and answers ``Yes, <ID>`` / ``No, <ID>`` or
``Unknown``. In Update rounds the agent writes one weight per candidate (its belief); in the Answer
round it commits to final weights, rewarded 1 iff the unique largest weight is on the true fault
(the FloDial task of the AREW paper, arXiv 2603.12109, with the rules of the authors' FloDial
environment, github unimpor/T3; prompts in :mod:`verl_selflock.envs.flodial.prompts`).

Feedback rules:

* a reply naming a row not answered before -> the row's answer from the table ("Yes." / "No."):
  the table, not the simulator's yes/no word, is the ground truth (a simulator that names a row
  but garbles its answer is counted in ``sim_answer_mismatch``);
* a reply naming a row answered before -> "Unknown." plus a note that the question was asked
  already (a paraphrased repeat); an exact (normalised) repeat of any earlier query the simulator
  answered (yes, no or unknown) gets the same reply without a simulator call (as in MediQ; a query
  whose simulator call failed may be asked again);
* "Unknown", an unparsable reply (counted in ``sim_unparsable``: several IDs, an ID out of range,
  no ID, free text) -> "Unknown.";
* a failed simulator call (server down, timeouts, 5xx, garbage after the client's retries) ->
  "Unknown." as well, counted in ``sim_failures``; the turn's AS critique is then 0 (not the
  agent's fault) and the episode goes on.

Directional critiques (AREW):

* Action round (AS): +1 if the feedback is yes, 0 if no, -1 otherwise (unknown, repeat, invalid
  action); 0 when the simulator failed (fallback role ``EXEMPT``: no ``step_abs_sum`` fallback promotes it).
* Update round (BT, oracle): -1 if the guess is invalid. After a yes/no to a new row: +1 iff the
  normalised weight on the true fault went up (``psi_t > psi_prev``, ``psi = v[gt] / sum(v)``),
  else -1. After uninformative feedback: variant ``v1`` (default) +1 iff the belief is unchanged
  (normalised vectors equal within 1e-6), else -1; variant ``v0``: 0.
  ``v_prev`` is the previous valid guess or the prior (0.5 for every candidate).
  Comparing *normalised* weights (the authors' rule compares raw ``v_t[gt] > v_prev[gt]``) makes the rule
  scale-free: "2,1,1,1,1" and "0.4,0.2,0.2,0.2,0.2" are the same belief, and inflating every weight
  cannot earn a +1.
* Answer turn (and an early ``<answer>`` in any round): 0.

Parsing (see :mod:`verl_selflock.envs.parsing` and :mod:`verl_selflock.envs.flodial.parsing`): the
turn is cut after its first ``</interact>`` or ``</answer>``. An Action block must hold exactly one
``Query: ...`` line (at most ``MAX_QUERY_CHARS`` = 300 characters) and nothing else; a longer
question is an invalid action (AS -1, also counted in ``overlong_queries``), never sent to the
simulator. A guess/answer is exactly ``K`` finite non-negative numbers, not all zero.

``StepResult.info`` keys: ``round``, ``turn``; action: ``query``, ``feedback`` ("yes" | "no" |
"unknown"), ``row`` (the table row the simulator named, or None), ``new_information`` (a yes/no to a
row not answered before: the T3 progress signal), ``info_gain`` (distractors newly ruled out by that
answer), ``candidates_left``, ``simulator_failed``, ``simulator_reply`` or ``error``; update:
``guess``, ``psi``, ``psi_prev``, ``evidence`` or ``error``; answer: ``early``, ``answer``,
``answer_psi`` (the answer's normalised weight on the true fault) or ``error``.

``EpisodeResult.metrics``: ``turns``, ``action_rounds``, ``update_rounds``, ``invalid_actions``,
``invalid_guesses``, ``repeats``, ``answers_yes``/``_no``/``_unknown``,
``sim_calls``/``sim_cache_hits``/``sim_failures`` (this episode's calls),
``sim_unparsable``, ``sim_answer_mismatch``, ``overlong_queries``, ``candidates_left``, ``psi_final``,
``answered``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from verl_selflock.envs.base import EnvContext, EpisodeResult, RoundKind, StepResult, register_env
from verl_selflock.envs.flodial.parsing import (
    MAX_QUERY_CHARS,
    SimulatorVerdict,
    normalise_query,
    parse_flodial_action,
    parse_simulator_reply,
)
from verl_selflock.envs.flodial.prompts import (
    FEEDBACK_PREFIX,
    action_instruction,
    answer_instruction,
    simulator_messages,
    update_instruction,
)
from verl_selflock.envs.parsing import Parsed, parse_weights
from verl_selflock.envs.simulated_user import (
    QUERY_COUNTERS,
    ROUND_COUNTERS,
    SIMULATOR_COUNTERS,
    SimulatedUserEnv,
    new_information_signals,
)

__all__ = ["BT_VARIANTS", "DEFAULT_MAX_TURNS", "FloDialEnv", "normalised"]

DEFAULT_MAX_TURNS = 10
BT_VARIANTS = ("v1", "v0")
PRIOR_VALUE = 0.5  # prior belief in every component
UNCHANGED_TOL = 1e-6  # normalised beliefs closer than this (max abs difference) count as unchanged
INCREASE_TOL = 1e-9  # psi must rise by more than float noise to count as moving toward the truth
ANSWERS = ("yes", "no")


def normalised(weights: np.ndarray) -> np.ndarray:
    """Weights scaled to sum to 1 (non-negative, not all zero), safe for huge values such as 1e308."""
    scaled = weights / weights.max()  # first scale by the maximum so that the sum cannot overflow
    return scaled / scaled.sum()


@register_env("flodial")
class FloDialEnv(SimulatedUserEnv):
    """One FloDial episode, built from a dataset row's ``extra_info["env"]``.

    Spec keys: ``task`` ("flodial"), ``problem_description``, ``candidates`` (K >= 2 fault texts, in
    the order shown to the agent), ``answer_index`` (0-based index of the true fault in
    ``candidates``), ``table`` (rows ``{"node", "question", "answer": "yes"|"no"}``, root first),
    ``candidate_paths`` (per candidate, its root path as ``"node:branch"`` strings: used to count the
    distractors an answer rules out), ``max_turns`` (even, default 10), optional ``bt_variant``
    ("v1" default | "v0"), and bookkeeping keys (``id``, ``chart``, ``difficulty`` ...).
    """

    uninformative_feedback = "Unknown."
    progress_signals = new_information_signals(
        "1 if the Action round got yes/no on a new row, else 0 (Update rounds: not measured)"
    )
    default_max_turns = DEFAULT_MAX_TURNS
    simulator_hint = (
        "FloDial needs a simulated user: set the active_reasoning agent loop's `simulator:` knob "
        "(an OpenAI-compatible endpoint: base_url, model; see recipes/flodial/README.md)"
    )
    counters = (
        *ROUND_COUNTERS, "answers_yes", "answers_no", "answers_unknown", *SIMULATOR_COUNTERS, "sim_unparsable",
        "sim_answer_mismatch", *QUERY_COUNTERS,
    )

    def __init__(
        self, spec: Mapping[str, Any], max_turns: int | None = None, context: EnvContext | None = None
    ) -> None:
        super().__init__(spec, max_turns, context)
        missing = [k for k in ("problem_description", "candidates", "answer_index", "table") if k not in spec]
        if missing:
            raise ValueError(f"FloDial spec lacks {missing}")
        self.problem = str(spec["problem_description"])
        self.candidates = [str(c) for c in spec["candidates"]]
        self.K = len(self.candidates)
        self.truth = int(spec["answer_index"])
        if self.K < 2 or not 0 <= self.truth < self.K:
            raise ValueError(f"FloDial needs >= 2 candidates and answer_index in range, got {self.K}, {self.truth}")
        self.table = [
            {"node": str(row.get("node", "")), "question": str(row["question"]), "answer": str(row["answer"]).lower()}
            for row in spec["table"]
        ]
        if not self.table or any(row["answer"] not in ANSWERS for row in self.table):
            raise ValueError("FloDial table must be a non-empty list of rows with answer 'yes' or 'no'")
        self.bt_variant = str(spec.get("bt_variant", "v1"))
        if self.bt_variant not in BT_VARIANTS:
            raise ValueError(f"bt_variant must be one of {BT_VARIANTS}, got {self.bt_variant!r}")
        # Per candidate: node -> branch on its root path (empty when the spec has no paths).
        paths = spec.get("candidate_paths")
        self.candidate_paths: list[dict[str, str]] = [
            dict(str(step).split(":", 1) for step in path) for path in (paths if paths is not None else [])
        ]
        if self.candidate_paths and len(self.candidate_paths) != self.K:
            raise ValueError("candidate_paths must have one path per candidate")
        self.prior = np.full(self.K, PRIOR_VALUE)
        # The simulator prompt depends only on (problem, table): episodes sharing them share cache entries.
        self.messages_head = simulator_messages(self.problem, self.table, "")[:1]
        self.cache_scope = hashlib.sha1(self.messages_head[0]["content"].encode()).hexdigest()

        # Episode state.
        self.revealed: set[int] = set()  # table rows answered so far
        self.asked_queries: set[str] = set()  # normalised query texts the simulator answered (any answer)
        self.ruled_out: set[int] = set()  # candidate indices contradicted by a revealed answer
        self.last_action_informative = False
        self.prev_valid_guess = self.prior
        self.answer: tuple[float, ...] | None = None
        self.success = False

    # --- public API ----------------------------------------------------------------------------

    def result(self) -> EpisodeResult:
        return self._outcome(
            self.success,
            self.answer is not None,
            candidates_left=float(self.K - len(self.ruled_out)),
            psi_final=self.psi(self.prev_valid_guess),
            answered=float(self.answer is not None),
        )

    def psi(self, weights: np.ndarray) -> float:
        """Confidence readout Psi_hat: the normalised weight on the true fault."""
        return float(normalised(weights)[self.truth])

    def round_instructions(self) -> tuple[str, str, str]:
        return action_instruction(), update_instruction(self.K), answer_instruction(self.K)

    # --- parsing -------------------------------------------------------------------------------

    @staticmethod
    def parse_action(block: str | None) -> Parsed[str]:
        """An Action block: exactly one non-empty ``Query:`` line and nothing else (not counted)."""
        return parse_flodial_action(block)

    def parse_belief(self, block: str | None) -> Parsed[np.ndarray]:
        """A guess or final weights: exactly K finite non-negative numbers, not all zero (kept as written)."""
        return parse_weights(block, self.K)

    # --- rounds --------------------------------------------------------------------------------

    async def _ask(self, query: str) -> tuple[SimulatorVerdict | None, dict[str, Any]]:
        """One simulator call; (None, info) when it failed after the client's retries."""
        messages = [*self.messages_head, {"role": "user", "content": query}]
        reply = await self._ask_simulator(messages, ("flodial", self.cache_scope, normalise_query(query)))
        if not reply.ok:
            return None, {"simulator_failed": True, "error": f"simulator failed: {reply.error}"}
        return parse_simulator_reply(reply.text or ""), {"simulator_failed": False, "simulator_reply": reply.text}

    def _rule_out(self, row: int) -> int:
        """Mark candidates contradicted by the answer of table row ``row``; return how many are new."""
        node, answer = self.table[row]["node"], self.table[row]["answer"]
        newly = {
            index
            for index, path in enumerate(self.candidate_paths)
            if index != self.truth and index not in self.ruled_out and path.get(node, answer) != answer
        }
        self.ruled_out |= newly
        return len(newly)

    async def _action_turn(self, block: str | None) -> StepResult:
        self.count("action_rounds")
        parsed = self.parse_query(block, MAX_QUERY_CHARS)  # counts invalid_actions / overlong_queries
        info: dict[str, Any] = {
            "round": RoundKind.ACTION.value,
            "turn": self.turn,
            "feedback": "unknown",
            "row": None,
            "new_information": False,
            "info_gain": 0.0,
            "simulator_failed": False,
        }
        repeated = False
        note = ""
        if not parsed.ok:
            critique = -1
            info["error"] = parsed.error
            feedback_line = f"Invalid query: {parsed.error}. No feedback this round."
        else:
            query = parsed.value
            assert query is not None
            info["query"] = query
            if normalise_query(query) in self.asked_queries:
                verdict, extra = SimulatorVerdict(None, None, True), {"error": "repeated query"}
                repeated = True
            else:
                verdict, extra = await self._ask(query)
                if verdict is not None:  # answered (even "Unknown"): asking it again is a repeat
                    self.asked_queries.add(normalise_query(query))
            info.update(extra)
            if verdict is None:  # the simulator failed: "Unknown", not the agent's fault
                critique = 0
            else:
                critique, note, repeated = self._judge(query, verdict, info, repeated)
            if info["feedback"] == "unknown":
                self.count("answers_unknown")
            feedback_line = FEEDBACK_PREFIX + info["feedback"].capitalize() + "." + note
            if self.context.withhold_feedback:  # feedback ablation: judged as usual, shown as unknown
                feedback_line = FEEDBACK_PREFIX + self.uninformative_feedback
        self.count("repeats", int(repeated))
        self.last_action_informative = bool(info["new_information"])
        info["candidates_left"] = self.K - len(self.ruled_out)
        return self._action_result(
            feedback_line, critique, info, parsed=parsed.ok, repeated=repeated,
            informative=self.last_action_informative, simulator_failed=info["simulator_failed"],
        )

    def _judge(
        self, query: str, verdict: SimulatorVerdict, info: dict[str, Any], repeated: bool
    ) -> tuple[int, str, bool]:
        """(AS critique, note for the agent, repeated) for a simulator verdict; fills ``info``."""
        if repeated:
            return -1, " (You asked this question already.)", True
        if verdict.row is None or not 0 <= verdict.row < len(self.table):
            # "Unknown", or a reply that names no usable row (out of range, free text, several IDs).
            if verdict.row is not None or not verdict.parsed:
                self.count("sim_unparsable")
            return -1, "", False
        info["row"] = verdict.row
        if verdict.row in self.revealed:
            info["error"] = "repeated question (same table row)"
            return -1, " (You asked this question already.)", True
        answer = self.table[verdict.row]["answer"]
        if verdict.word != answer:
            self.count("sim_answer_mismatch")
        self.revealed.add(verdict.row)
        self.count(f"answers_{answer}")
        info.update(feedback=answer, new_information=True, info_gain=float(self._rule_out(verdict.row)))
        return (1 if answer == "yes" else 0), "", False

    def _update_info(self) -> dict[str, Any]:
        return {"evidence": self.last_action_informative}

    def _record_belief(self, guess: np.ndarray, info: dict[str, Any]) -> int:
        psi, psi_prev = self.psi(guess), self.psi(self.prev_valid_guess)
        info.update(guess=guess.tolist(), psi=psi, psi_prev=psi_prev)
        if self.last_action_informative:
            critique = 1 if psi > psi_prev + INCREASE_TOL else -1
        elif self.bt_variant == "v1":
            change = np.abs(normalised(guess) - normalised(self.prev_valid_guess)).max()
            critique = 1 if change <= UNCHANGED_TOL else -1
        else:
            critique = 0
        self.prev_valid_guess = guess
        return critique

    def _record_answer(self, weights: np.ndarray) -> dict[str, Any]:
        self.answer = tuple(float(v) for v in weights)
        top = np.flatnonzero(weights == weights.max())
        self.success = len(top) == 1 and int(top[0]) == self.truth
        # ``answer_psi``, not ``psi``: ``psi`` marks an Update round's belief (selflock/psi_delta).
        return {"answer": list(self.answer), "answer_psi": self.psi(weights)}
