"""An expert policy for FloDial that writes demonstrations for a supervised warm start.

The expert plays the real environment (:class:`verl_selflock.envs.flodial.env.FloDialEnv`, built from a
dataset row's env spec) against :class:`~verl_selflock.envs.flodial.scripted_user.ScriptedFloDialUser`
(the reference table answered by exact question text; see its module for what that assumes of the real
LLM simulator). It keeps the set of candidates still consistent with the answers (the *alive* set):

* **Action round**: ask the question of the node where the alive candidates' root paths first part
  (``spec["candidate_paths"]``: the first node at which they do not all take the same branch). Every
  alive candidate passes through that node, the true fault included, so the question is a row of the
  reference table and the expert asks it in the row's exact words. Which node to ask depends only on the
  candidate paths and the answers so far, never on which candidate is true: the table is read only for
  the node's wording. A yes/no keeps the alive candidates on the answered branch, at least one fewer
  (they took both branches there); so the expert needs exactly the episode's ``separating_questions``
  questions (one per node where a distractor leaves the true fault's path), at most ``K - 1``.
* **Update round**: ``Guess:`` uniform over the alive candidates (``1/n`` each, 0 elsewhere, written with
  :data:`DECIMALS` decimals). After a yes/no the true fault's normalised weight rises (BT +1); after an
  uninformative reply the belief is unchanged (BT +1 under ``v1``, 0 under ``v0``).
* **Answer**: all weight on the remaining candidate, as soon as one remains: in the round after the
  Update round that recorded it (an early ``<answer>`` in an Action round, critique 0), or in the Answer
  round. If the budget runs out first, or the split node's question got no yes/no (the scripted user
  never does that; a real LLM might), all weight on one alive candidate chosen by the seed (a guess).

Each turn is one short ``<scratch>`` sentence and the block, ending exactly at its closing tag, in the
formats of :mod:`verl_selflock.envs.flodial.prompts` (faults numbered from 1, as the prompt shows them).
Deterministic for (spec, seed).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from verl_selflock.envs.base import EnvContext, RoundKind, make_env
from verl_selflock.envs.demonstration import Demonstration, play_turns
from verl_selflock.envs.flodial.prompts import FEEDBACK_PREFIX
from verl_selflock.envs.flodial.scripted_user import ScriptedFloDialUser

__all__ = ["DECIMALS", "FloDialExpert", "play_flodial_expert", "play_flodial_expert_async"]

DECIMALS = 3
"""Decimals of a written belief (uniform over the alive candidates)."""
_FEEDBACK_RE = re.compile(re.escape(FEEDBACK_PREFIX) + r"(Yes|No|Unknown)\.")


def _faults(indices: Sequence[int]) -> str:
    """``fault 2``, ``faults 2 and 4``, ``faults 1, 2 and 4`` (1-based, as the prompt numbers them)."""
    names = [str(i + 1) for i in indices]
    if len(names) == 1:
        return f"fault {names[0]}"
    return f"faults {', '.join(names[:-1])} and {names[-1]}"


class FloDialExpert:
    """The expert's state for one episode: the alive candidates and the question awaiting its reply.

    Args:
        spec: the episode's env spec (``extra_info["env"]`` of a FloDial row). Read: ``candidate_paths``
            (which question to ask), the table's ``node`` and ``question`` (its wording), ``candidates``
            and ``problem_description`` (the seed); never ``answer_index`` nor the table's answers.
        seed: seeds the guess when more than one candidate is alive at the end.
    """

    def __init__(self, spec: Mapping[str, Any], seed: int = 0) -> None:
        if spec.get("task") != "flodial":
            raise ValueError(f"the FloDial expert plays FloDial specs (task 'flodial'), got {spec.get('task')!r}")
        if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
        candidates = [str(c) for c in spec.get("candidates") or []]
        paths = spec.get("candidate_paths")
        if paths is None or len(paths) != len(candidates) or len(candidates) < 2:
            raise ValueError("the FloDial expert needs 'candidate_paths', one root path per candidate (>= 2)")
        self.K = len(candidates)
        self.paths = [[_step(step) for step in path] for path in paths]
        self.wording = {str(row["node"]): " ".join(str(row["question"]).split()) for row in spec.get("table") or []}
        public = "\n".join([str(spec.get("problem_description", "")), *candidates])
        self.rng = np.random.default_rng([int(seed), int(hashlib.sha1(public.encode()).hexdigest()[:8], 16)])
        self.alive = list(range(self.K))
        self.stuck: set[str] = set()  # split nodes whose question got no yes/no
        self.pending: str | None = None  # the node awaiting its reply

    # --- reasoning -------------------------------------------------------------------------------

    def split_node(self) -> str | None:
        """The first node on the alive candidates' common root path where they take different branches
        (None with one candidate alive)."""
        if len(self.alive) < 2:
            return None
        depth = 0
        while True:
            steps: set[tuple[str, str]] = set()
            for c in self.alive:
                if depth >= len(self.paths[c]):  # one path a prefix of another: not terminals of one tree
                    raise ValueError("candidate_paths are not root paths of distinct terminals of one tree")
                steps.add(self.paths[c][depth])
            nodes = {node for node, _ in steps}
            if len(nodes) > 1:
                raise ValueError("candidate_paths are not root paths of distinct terminals of one tree")
            if len(steps) > 1:
                return nodes.pop()
            depth += 1

    def question(self) -> str | None:
        """The question to ask next (None: nothing useful left to ask, so answer)."""
        node = self.split_node()
        if node is None or node in self.stuck:
            return None
        if node not in self.wording:
            raise ValueError(f"node {node!r}, where candidate paths part, is not in the table (inconsistent spec)")
        return self.wording[node]

    def observe(self, observation: str | None) -> None:
        """Read the reply to the pending question from the observation text (as an agent reads it)."""
        if self.pending is None:
            return
        node, self.pending = self.pending, None
        match = _FEEDBACK_RE.search(observation or "")
        word = match.group(1).lower() if match is not None else "unknown"
        kept = [c for c in self.alive if dict(self.paths[c]).get(node) == word]
        if word == "unknown" or not kept:  # no yes/no, or one that contradicts every alive candidate
            self.stuck.add(node)
        else:
            self.alive = kept

    def belief(self) -> list[float]:
        """Uniform over the alive candidates."""
        return [1.0 / len(self.alive) if c in self.alive else 0.0 for c in range(self.K)]

    def final_choice(self) -> int:
        """The remaining candidate, or a seeded pick among the alive ones."""
        return self.alive[0] if len(self.alive) == 1 else int(self.alive[self.rng.integers(len(self.alive))])

    # --- the turns -------------------------------------------------------------------------------

    def action(self) -> str:
        """An Action round's turn: the split node's question (or the answer when there is none to ask)."""
        query = self.question()
        if query is None:
            return self.answer()
        self.pending = self.split_node()
        alive = _faults(self.alive).capitalize()
        fit = f"All {self.K} faults are possible" if len(self.alive) == self.K else f"{alive} still fit"
        scratch = f"{fit}; their troubleshooting paths part at this question."
        return f"<scratch>{scratch}</scratch>\n<interact>\nQuery: {query}\n</interact>"

    def update(self) -> str:
        """An Update round's turn: the uniform belief over the alive candidates."""
        if len(self.alive) == 1:
            scratch = f"Only {_faults(self.alive)} fits every answer, so it gets all the weight."
        else:
            scratch = f"{_faults(self.alive).capitalize()} still fit every answer, so they share the weight equally."
        guess = ",".join(_number(v) for v in self.belief())
        return f"<scratch>{scratch}</scratch>\n<interact>Guess: {guess}</interact>"

    def answer(self) -> str:
        """The answer: all weight on one candidate."""
        choice = self.final_choice()
        if len(self.alive) == 1:
            scratch = f"Only {_faults(self.alive)} fits every answer: it is the cause."
        else:
            scratch = f"{_faults(self.alive).capitalize()} still fit; my best guess is {_faults([choice])}."
        weights = ",".join("1" if c == choice else "0" for c in range(self.K))
        return f"<scratch>{scratch}</scratch>\n<answer>{weights}</answer>"

    def turn(self, kind: RoundKind) -> str:
        """The turn text for a round of ``kind``: an Action round with one candidate left answers early."""
        if kind is RoundKind.ACTION:
            return self.answer() if len(self.alive) == 1 else self.action()
        if kind is RoundKind.UPDATE:
            return self.update()
        return self.answer()


def _step(step: object) -> tuple[str, str]:
    """``"node:branch"`` -> (node, branch)."""
    node, _, branch = str(step).partition(":")
    return node, branch


def _number(value: float) -> str:
    """``0``, ``1``, ``0.5``, ``0.333``: :data:`DECIMALS` decimals without trailing zeros."""
    text = f"{value:.{DECIMALS}f}".rstrip("0").rstrip(".")
    return text or "0"


async def play_flodial_expert_async(spec: Mapping[str, Any], seed: int = 0, simulator: Any = None) -> Demonstration:
    """:func:`play_flodial_expert` inside a running event loop."""
    expert = FloDialExpert(spec, seed=seed)
    user = simulator if simulator is not None else ScriptedFloDialUser(spec["table"])
    env = make_env(spec, context=EnvContext(simulator=user, training=False))
    turns = await play_turns(env, expert)
    result = env.result()
    return Demonstration(
        spec=dict(spec), turns=turns, success=bool(result.success), reward=float(result.reward), seed=int(seed)
    )


def play_flodial_expert(spec: Mapping[str, Any], seed: int = 0, simulator: Any = None) -> Demonstration:
    """Play one episode of ``spec`` with :class:`FloDialExpert` through a fresh environment.

    The environment is built as the agent loop builds it (``make_env(spec)``, evaluation context) and
    judges every turn; the episode ends when it says so (the answer, early or at the Answer round).

    Args:
        spec: a FloDial env spec.
        seed: the expert's seed (:class:`FloDialExpert`).
        simulator: the user the environment asks (default: a fresh
            :class:`~verl_selflock.envs.flodial.scripted_user.ScriptedFloDialUser` of the spec's table).

    Returns:
        The :class:`~verl_selflock.envs.demonstration.Demonstration`: every turn with its text,
        observation and critique, and the outcome as ``env.result()`` scores it.
    """
    return asyncio.run(play_flodial_expert_async(spec, seed=seed, simulator=simulator))
