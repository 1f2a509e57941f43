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

In training the plan is scored by the actor (:func:`verl_selflock.verl_adapter.igpo_scoring.score_with_actor`);
:func:`score_with_hf_model` is the same computation on a local ``transformers`` model (CPU benchmarks,
offline analysis).
"""

from __future__ import annotations

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
    """The teacher-forcing sequences of one batch, one per (trajectory, turn prefix)."""

    input_ids: list[torch.Tensor]
    """Per sequence, 1-D int64: prefix + bridge + answer."""
    answer_lens: list[int]
    """Per sequence, the number of answer tokens at its end (the scored span)."""
    rows: torch.Tensor
    """(n,) int64 trajectory (batch row) of each sequence."""
    prefixes: torch.Tensor
    """(n,) int64 turn index k of each sequence (prefix = the dialogue before turn k)."""
    num_turns: torch.Tensor
    """(bs,) int64 agent turns per trajectory (0 for rows that take no part, e.g. veRL's padding rows)."""
    scored: torch.Tensor
    """(bs,) bool: the row has sequences in the plan."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        return int(sum(ids.numel() for ids in self.input_ids))

    def to_table(self, mean_logprob: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """(bs, width) table of per-prefix mean log-probs (NaN where not scored); width defaults to the
        plan's max turns (it is raised to that if smaller)."""
        planned = int(self.num_turns.max()) if self.num_turns.numel() else 0
        width = planned if width is None else max(width, planned)
        table = torch.full((self.num_turns.numel(), width), float("nan"))
        if len(self):
            table[self.rows, self.prefixes] = mean_logprob.float()
        return table


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
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    turn_ids: Sequence[Sequence[int] | None],
    answers: Sequence[str | None],
    tokenizer: Any,
    config: IgpoConfig,
    skip: Sequence[bool] | None = None,
) -> ScoringPlan:
    """Build the scoring sequences of a batch.

    Args:
        prompts: per trajectory, the prompt token ids.
        responses: per trajectory, the response token ids (aligned with ``turn_ids``).
        turn_ids: per trajectory, the per-token turn ids of :mod:`verl_selflock.contracts.critique` (None: unknown).
        answers: per trajectory, the ground-truth answer text (None or "": the row is not scored).
        tokenizer: the policy's tokenizer.
        config: ``algorithm.igpo`` settings (``bridge``).
        skip: per trajectory, True to leave it out entirely (num_turns 0), e.g. veRL's padding rows.

    Returns:
        A :class:`ScoringPlan`: one sequence per turn of every row with turns and a non-empty answer;
        ``num_turns`` counts the turns found (0 for rows without any, or skipped).
    """
    bs = len(prompts)
    bridge = list(tokenizer.encode(config.bridge, add_special_tokens=False))
    encoded: dict[str, list[int]] = {}
    input_ids: list[torch.Tensor] = []
    answer_lens: list[int] = []
    rows: list[int] = []
    prefixes: list[int] = []
    num_turns = torch.zeros(bs, dtype=torch.int64)
    scored = torch.zeros(bs, dtype=torch.bool)
    for row in range(bs):
        if (skip is not None and skip[row]) or turn_ids[row] is None:
            continue
        starts = turn_starts(turn_ids[row])
        if starts is None:
            continue
        num_turns[row] = len(starts)
        answer = answers[row]
        if not answer:
            continue
        answer_ids = encoded.setdefault(answer, list(tokenizer.encode(answer, add_special_tokens=False)))
        if not answer_ids:
            continue
        prompt = torch.as_tensor(list(prompts[row]), dtype=torch.int64)
        response = torch.as_tensor(list(responses[row]), dtype=torch.int64)
        tail = torch.as_tensor(bridge + answer_ids, dtype=torch.int64)
        for k, start in enumerate(starts):
            input_ids.append(torch.cat([prompt, response[:start], tail]))
            answer_lens.append(len(answer_ids))
            rows.append(row)
            prefixes.append(k)
        scored[row] = True
    return ScoringPlan(
        input_ids=input_ids,
        answer_lens=answer_lens,
        rows=torch.tensor(rows, dtype=torch.int64),
        prefixes=torch.tensor(prefixes, dtype=torch.int64),
        num_turns=num_turns,
        scored=scored,
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
    order = sorted(range(len(plan)), key=lambda i: plan.input_ids[i].numel())  # similar lengths together
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        seqs = [plan.input_ids[i] for i in chunk]
        width = max(s.numel() for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.int64)
        attention = torch.zeros_like(ids)
        for j, seq in enumerate(seqs):
            ids[j, : seq.numel()] = seq
            attention[j, : seq.numel()] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float() / temperature
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1))[..., 0]
        for j, i in enumerate(chunk):
            n, end = plan.answer_lens[i], plan.input_ids[i].numel()
            # token at position p is predicted by logits at p - 1
            out[i] = logprobs[j, end - 1 - n : end - 1].mean().cpu()
    return out
