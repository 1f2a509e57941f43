"""IGPO's teacher-forced scoring plan, pure: which sequences to score and how to read their scores.

For every trajectory and every agent turn k (0-based), the scored sequence is

    prompt + response[:start of turn k] + bridge + answer

``response[:start of turn k]`` ends with the assistant header that opened turn k (the observation of
turn k-1 was rendered as a user message plus that header), so the model is asked to write its next
message; ``bridge`` (``algorithm.igpo.bridge``) says it is ready and opens ``<answer>``; ``answer`` is the
task's ground-truth answer text (``selflock_gt_answer``, from ``env.ground_truth_answer()``). Only the
answer tokens are scored (mean of their log-probs). Nothing after them is built (no closing tag, no
end-of-turn token, which the reference appends but never scores): under causal attention later tokens
cannot change those log-probs, and the pieces are tokenized separately, so the scored span is exactly the
answer's own tokens. Turns are the distinct turn ids of a row, in order
(:func:`verl_selflock.algorithms.igpo.dense_turn_index`, the same rule as :func:`turn_starts`).

By default only rows whose episode ended at a final turn are scored (:func:`scoring_answers`): as in the
reference, whose gain count no longer matches its turns when a trajectory stops without answering, a row
cut short (T3, the loop's turn cap, the response budget) gets the outcome reward only
(``algorithm.igpo.unfinished=score`` scores those rows too).

Cost control: (row, turn) pairs whose sequences are identical (every finished rollout of a prompt shares
prefix 0) are scored once; sequences are described by reference and built only chunk by chunk
(:meth:`ScoringPlan.chunks`, ``algorithm.igpo.scoring_chunk_tokens``); a row whose longest sequence
exceeds the scorer's token limit (``max_sequence_tokens``: veRL's dynamic-batch limit) is not scored.
Scored one by one, each prefix is a forward pass of its own: at PE-G paper shapes the scored tokens are
~5.4x the trajectories' (``benchmarks/bench_igpo.py``). :mod:`verl_selflock.algorithms.igpo_packing`
scores all of a row's prefixes in one forward under a tree attention mask (~1x), from this same plan.

In training the plan is scored by the actor (:func:`verl_selflock.verl_adapter.igpo_scoring.score_with_actor`);
:func:`score_with_hf_model` is the same computation on a local ``transformers`` model (CPU benchmarks,
offline analysis).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from verl_selflock.algorithms.igpo_config import IgpoConfig
from verl_selflock.contracts.episode import GT_ANSWER, STOP_ANSWER, STOP_DONE, STOP_REASON

FINAL_STOP_REASONS = (STOP_ANSWER, STOP_DONE)
"""Stop reasons of an episode whose last turn is a final one (an answer, or the environment ended it)."""


@dataclass
class ScoringPlan:
    """The teacher-forcing sequences of one batch, described compactly and built only when asked for.

    One sequence per distinct ``prompt + response[:start of turn k] + bridge + answer``: (row, turn) pairs
    whose sequences are identical token for token (the prompt-only prefix 0 of every rollout of a prompt,
    or equal first turns) share one sequence and one forward pass. A sequence is held as references (its
    row's prompt and response, how many response tokens it keeps, its tail) and materialised by
    :meth:`sequence`, so the driver holds one chunk's tokens at a time (:meth:`chunks`), never the ~T/2
    copies of every trajectory that all prefixes of a step amount to.
    """

    prompts: list[torch.Tensor]
    """Per context (a scored row), its prompt ids (1-D int64, the batch's own tensors where given)."""
    responses: list[torch.Tensor]
    """Per context, its response ids (1-D int64)."""
    tails: list[torch.Tensor]
    """Per distinct answer, bridge + answer ids (1-D int64)."""
    tail_answer_lens: list[int]
    """Per tail, the number of answer tokens at its end (the scored span)."""
    seq_context: torch.Tensor
    """(n,) int64 context of each sequence."""
    seq_response_len: torch.Tensor
    """(n,) int64 response tokens each sequence keeps (the start of its turn)."""
    seq_tail: torch.Tensor
    """(n,) int64 tail of each sequence."""
    lengths: torch.Tensor
    """(n,) int64 tokens of each sequence."""
    rows: torch.Tensor
    """(n,) int64 trajectory (batch row) of each sequence (the first row that asked for it)."""
    prefixes: torch.Tensor
    """(n,) int64 turn index k of each sequence (prefix = the dialogue before turn k) in that row."""
    entry_rows: torch.Tensor
    """(m,) int64 every scored (row, turn) pair's row; m >= n when sequences are shared."""
    entry_prefixes: torch.Tensor
    """(m,) int64 every scored pair's turn."""
    entry_seq: torch.Tensor
    """(m,) int64 the sequence whose score a pair reads."""
    num_turns: torch.Tensor
    """(bs,) int64 agent turns per trajectory (0 for rows that take no part, e.g. veRL's padding rows)."""
    scored: torch.Tensor
    """(bs,) bool: the row has sequences in the plan."""
    over_limit: torch.Tensor
    """(bs,) bool: the row would be scored but its longest sequence exceeds ``max_sequence_tokens``
    (it gets the outcome reward only)."""

    def __len__(self) -> int:
        return int(self.seq_context.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def answer_lens(self) -> list[int]:
        """Per sequence, the number of answer tokens at its end."""
        return [self.tail_answer_lens[t] for t in self.seq_tail.tolist()]

    def sequence(self, i: int) -> torch.Tensor:
        """Sequence ``i`` as 1-D int64 ids: prefix + bridge + answer (a new tensor)."""
        c = int(self.seq_context[i])
        kept = self.responses[c][: int(self.seq_response_len[i])]
        return torch.cat([self.prompts[c], kept, self.tails[int(self.seq_tail[i])]])

    @property
    def input_ids(self) -> list[torch.Tensor]:
        """Every sequence, materialised (for small plans: a chunk, tests, local scoring)."""
        return [self.sequence(i) for i in range(len(self))]

    def subset(self, indices: Sequence[int]) -> ScoringPlan:
        """The plan restricted to sequences ``indices`` (in that order), sharing this plan's tensors; its
        (row, turn) entries are left out (only the full plan maps scores back to turns)."""
        index = torch.as_tensor(list(indices), dtype=torch.int64)
        empty = torch.zeros(0, dtype=torch.int64)
        return dataclasses.replace(
            self, seq_context=self.seq_context[index], seq_response_len=self.seq_response_len[index],
            seq_tail=self.seq_tail[index], lengths=self.lengths[index], rows=self.rows[index],
            prefixes=self.prefixes[index], entry_rows=empty, entry_prefixes=empty, entry_seq=empty,
        )

    def chunks(self, max_tokens: int) -> list[list[int]]:
        """Consecutive runs of sequences of at most ``max_tokens`` tokens each (a longer sequence alone)."""
        return chunk_by_tokens(self.lengths.tolist(), max_tokens)

    def to_table(self, mean_logprob: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """(bs, width) table of per-prefix mean log-probs (NaN where not scored), from (n,) per-sequence
        scores; width defaults to the plan's max turns (it is raised to that if smaller)."""
        planned = int(self.num_turns.max()) if self.num_turns.numel() else 0
        width = planned if width is None else max(width, planned)
        table = torch.full((self.num_turns.numel(), width), float("nan"))
        if self.entry_seq.numel():
            table[self.entry_rows, self.entry_prefixes] = mean_logprob.float()[self.entry_seq]
        return table


def chunk_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split ``range(len(lengths))`` into consecutive runs whose lengths sum to at most ``max_tokens``.

    Greedy in order (the plan's order keeps a row's prefixes together); a single item longer than
    ``max_tokens`` forms a run of its own rather than being dropped.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    runs: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, n in enumerate(lengths):
        if current and total + n > max_tokens:
            runs.append(current)
            current, total = [], 0
        current.append(i)
        total += int(n)
    if current:
        runs.append(current)
    return runs


def turn_starts(turn_ids: Sequence[int]) -> list[int] | None:
    """Index of the first token of each turn of a response, turns in id order; None if it has no turn.

    A turn is a distinct id present (as in :func:`verl_selflock.algorithms.igpo.dense_turn_index`): a turn
    id with no token (a turn that kept nothing) is a gap, not a missing turn.

    Args:
        turn_ids: per response token, the 0-based turn that generated it, -1 on other tokens.
    """
    ids = np.asarray(turn_ids, dtype=np.int64)
    present, first = np.unique(ids[ids >= 0], return_index=True)
    if present.size == 0:
        return None
    offsets = np.flatnonzero(ids >= 0)  # np.unique indexed the filtered array: map back to positions
    return offsets[first].tolist()


def scoring_answers(
    extra_fields: Sequence[Mapping[str, Any] | None], unfinished: str = "outcome_only"
) -> list[str | None]:
    """Per row, the ground-truth answer to score, or None for an outcome-only row.

    A row is scored when its task knows the answer (``selflock_gt_answer``) and its episode ended at a
    final turn (``selflock_stop_reason`` ``answer`` or ``done``), so its last turn is the one that takes
    the outcome. A row cut short (``t3``, ``max_turns``, ``response_length``, or no stop reason) stopped
    in the middle of the dialogue: the IGPO authors' code (``verl/utils/reward_score/info_gain.py``
    ``compute_score`` in their veRL fork, arXiv 2510.14967) falls back to the outcome alone when the
    gains do not line up with the turns, and so do we unless ``unfinished`` is ``score``
    (``algorithm.igpo.unfinished``), which scores such rows like finished ones.
    """
    answers: list[str | None] = []
    for fields in extra_fields:
        fields = fields if isinstance(fields, Mapping) else {}
        finished = unfinished == "score" or fields.get(STOP_REASON) in FINAL_STOP_REASONS
        answers.append(fields.get(GT_ANSWER) if finished else None)
    return answers


def plan_scoring(
    prompts: Sequence[Sequence[int] | torch.Tensor],
    responses: Sequence[Sequence[int] | torch.Tensor],
    turn_ids: Sequence[Sequence[int] | None],
    answers: Sequence[str | None],
    tokenizer: Any,
    config: IgpoConfig,
    skip: Sequence[bool] | None = None,
    max_sequence_tokens: int | None = None,
) -> ScoringPlan:
    """Describe the scoring sequences of a batch (no sequence is materialised here).

    Args:
        prompts: per trajectory, the prompt token ids (1-D tensors are kept as they are, not copied).
        responses: per trajectory, the response token ids (aligned with ``turn_ids``).
        turn_ids: per trajectory, the per-token turn ids of :mod:`verl_selflock.contracts.critique` (None: unknown).
        answers: per trajectory, the ground-truth answer text (None or "": the row is not scored).
        tokenizer: the policy's tokenizer.
        config: ``algorithm.igpo`` settings (``bridge``).
        skip: per trajectory, True to leave it out entirely (num_turns 0), e.g. veRL's padding rows.
        max_sequence_tokens: the longest sequence the scorer takes in one piece (the actor's dynamic-batch
            token limit); a row whose longest prefix + bridge + answer is longer is not scored
            (``over_limit``), None for no limit.

    Returns:
        A :class:`ScoringPlan`: one sequence per distinct turn prefix of every row with turns and a
        non-empty answer; ``num_turns`` counts the turns found (0 for rows without any, or skipped).
    """
    bs = len(prompts)
    bridge = list(tokenizer.encode(config.bridge, add_special_tokens=False))
    tail_of: dict[str, int] = {}
    plan = _PlanBuilder(bs)
    for row in range(bs):
        if (skip is not None and skip[row]) or turn_ids[row] is None:
            continue
        starts = turn_starts(turn_ids[row])
        if starts is None:
            continue
        plan.num_turns[row] = len(starts)
        answer = answers[row]
        if not answer:
            continue
        if answer not in tail_of:
            answer_ids = list(tokenizer.encode(answer, add_special_tokens=False))
            tail_of[answer] = plan.add_tail(torch.as_tensor(bridge + answer_ids, dtype=torch.int64), len(answer_ids))
        tail = tail_of[answer]
        if not plan.tail_answer_lens[tail]:
            continue
        prompt = torch.as_tensor(prompts[row], dtype=torch.int64)
        longest = prompt.numel() + starts[-1] + plan.tails[tail].numel()
        if max_sequence_tokens is not None and longest > max_sequence_tokens:
            plan.over_limit[row] = True
            continue
        plan.add_row(row, prompt, torch.as_tensor(responses[row], dtype=torch.int64), starts, tail)
    return plan.build()


class _PlanBuilder:
    """Accumulates a :class:`ScoringPlan`, sharing identical sequences (same tail, same prefix tokens)."""

    def __init__(self, bs: int) -> None:
        self.num_turns = torch.zeros(bs, dtype=torch.int64)
        self.scored = torch.zeros(bs, dtype=torch.bool)
        self.over_limit = torch.zeros(bs, dtype=torch.bool)
        self.prompts: list[torch.Tensor] = []
        self.responses: list[torch.Tensor] = []
        self.tails: list[torch.Tensor] = []
        self.tail_answer_lens: list[int] = []
        self.seqs: list[tuple[int, int, int, int, int, int]] = []  # context, kept, tail, length, row, turn
        self.entries: list[tuple[int, int, int]] = []  # row, turn, sequence
        self.index: dict[tuple[int, int, bytes], int] = {}

    def add_tail(self, tail: torch.Tensor, answer_len: int) -> int:
        self.tails.append(tail)
        self.tail_answer_lens.append(answer_len)
        return len(self.tails) - 1

    def add_row(self, row: int, prompt: torch.Tensor, response: torch.Tensor, starts: list[int], tail: int) -> None:
        context = len(self.prompts)
        self.prompts.append(prompt)
        self.responses.append(response)
        # Digest of the prefix, extended turn by turn: O(row length) to recognise shared prefixes.
        digest = hashlib.blake2b(prompt.contiguous().numpy().tobytes(), digest_size=16)
        done = 0
        for k, start in enumerate(starts):
            digest.update(response[done:start].contiguous().numpy().tobytes())
            done = start
            length = prompt.numel() + start + self.tails[tail].numel()
            key = (tail, length, digest.digest())
            if key not in self.index:
                self.index[key] = len(self.seqs)
                self.seqs.append((context, start, tail, length, row, k))
            self.entries.append((row, k, self.index[key]))
        self.scored[row] = True

    def build(self) -> ScoringPlan:
        seqs = torch.tensor(self.seqs, dtype=torch.int64).reshape(-1, 6)
        entries = torch.tensor(self.entries, dtype=torch.int64).reshape(-1, 3)
        return ScoringPlan(
            prompts=self.prompts, responses=self.responses, tails=self.tails, tail_answer_lens=self.tail_answer_lens,
            seq_context=seqs[:, 0], seq_response_len=seqs[:, 1], seq_tail=seqs[:, 2], lengths=seqs[:, 3],
            rows=seqs[:, 4], prefixes=seqs[:, 5], entry_rows=entries[:, 0], entry_prefixes=entries[:, 1],
            entry_seq=entries[:, 2], num_turns=self.num_turns, scored=self.scored, over_limit=self.over_limit,
        )


def segment_means(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Means of consecutive segments of a 1-D tensor: (sum(lengths),) -> (len(lengths),)."""
    segment = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    sums = torch.zeros(lengths.numel(), dtype=values.dtype).scatter_add_(0, segment, values)
    return sums / lengths.clamp(min=1).to(values.dtype)


@torch.no_grad()
def score_with_hf_model(model: Any, plan: ScoringPlan, batch_size: int = 16, temperature: float = 1.0) -> torch.Tensor:
    """The same scores from a local ``transformers`` causal LM (right-padded batches, no KV cache).

    Returns:
        (n,) float32 mean log-prob of each sequence's answer tokens, with logits divided by ``temperature``.
    """
    device = next(model.parameters()).device
    out = torch.empty(len(plan), dtype=torch.float32)
    answer_lens = plan.answer_lens
    order = sorted(range(len(plan)), key=lambda i: int(plan.lengths[i]))  # similar lengths together
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        seqs = [plan.sequence(i) for i in chunk]
        width = max(s.numel() for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.int64)
        attention = torch.zeros_like(ids)
        for j, seq in enumerate(seqs):
            ids[j, : seq.numel()] = seq
            attention[j, : seq.numel()] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float() / temperature
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1))[..., 0]
        for j, i in enumerate(chunk):
            n, end = answer_lens[i], seqs[j].numel()
            # token at position p is predicted by logits at p - 1
            out[i] = logprobs[j, end - 1 - n : end - 1].mean().cpu()
    return out
