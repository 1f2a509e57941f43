"""IGPO's scoring in one forward per trajectory: a row's turn prefixes share its dialogue (pure torch).

Scoring every prefix separately (:mod:`verl_selflock.algorithms.igpo_plan`) forwards
``prompt + response[:start of turn k] + tail`` for each turn k, so T turns cost ~T/2 trajectories. Packed,
each scored row (a plan *context*) is one sequence::

    trunk = prompt + response[:start of its last scored turn]
    packed = trunk + tail_0 + tail_1 + ... + tail_{m-1}          (tail = bridge + answer)

under a tree attention mask: trunk tokens attend causally within the trunk; tail j attends to the first
``cut_j`` trunk tokens (``cut_j = len(prompt) + start of turn j``) and causally within itself, its
position ids continuing from ``cut_j``. Each tail thus sees exactly the tokens and positions of its own
per-prefix sequence, so its answer log-probs are the same up to floating-point summation order, while the
forward reads ``trunk + sum(tails)`` tokens: about one trajectory (``benchmarks/bench_igpo.py``).

Rows that share a prefix across contexts (prefix 0 of every rollout of a prompt) are still scored once:
the plan assigns each distinct sequence to the first context that asked for it.

:func:`packed_answer_logprobs` is the forward itself, on any ``transformers`` causal LM that takes a 4-D
attention mask (sdpa or eager attention); the actor worker runs the same function on its FSDP module
(:mod:`verl_selflock.verl_adapter.igpo_worker`), :func:`score_packed_with_hf_model` on a local model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from verl_selflock.algorithms.igpo_plan import ScoringPlan, chunk_by_tokens, segment_means

MASK_ATTENTION = ("sdpa", "eager")
"""Attention implementations that honour a custom 4-D mask; others (flash-attention) are switched to sdpa
for the scoring forward."""


@dataclass
class PackedRow:
    """One packed scoring sequence: a context's trunk followed by its tails (all 1-D, length N)."""

    input_ids: torch.Tensor
    """(N,) int64 trunk then tails."""
    position_ids: torch.Tensor
    """(N,) int64 0..trunk-1 on the trunk; tail j continues from its cut."""
    segment: torch.Tensor
    """(N,) int64 0 on the trunk, j + 1 on tail j."""
    answer_mask: torch.Tensor
    """(N,) bool the scored tokens (each tail's answer)."""
    sequences: torch.Tensor
    """(m,) int64 the plan sequence of each tail, in tail order."""

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @classmethod
    def padding(cls, token_id: int) -> PackedRow:
        """A one-token row with nothing to score (to fill a batch up to a multiple of the DP size)."""
        one = torch.tensor([token_id], dtype=torch.int64)
        zero = torch.zeros(1, dtype=torch.int64)
        return cls(one, zero, zero.clone(), torch.zeros(1, dtype=torch.bool), torch.zeros(0, dtype=torch.int64))


def packed_lengths(plan: ScoringPlan) -> torch.Tensor:
    """(contexts,) tokens of each context's packed sequence (0 for a context with no sequence of its own)."""
    contexts = len(plan.prompts)
    prompt_lens = torch.tensor([p.numel() for p in plan.prompts], dtype=torch.int64)
    tail_lens = torch.tensor([t.numel() for t in plan.tails], dtype=torch.int64)
    kept = torch.full((contexts,), -1, dtype=torch.int64).scatter_reduce(
        0, plan.seq_context, plan.seq_response_len, reduce="amax"
    )
    tails = torch.zeros(contexts, dtype=torch.int64).scatter_add(0, plan.seq_context, tail_lens[plan.seq_tail])
    return torch.where(kept >= 0, prompt_lens + kept + tails, 0)


def packed_chunks(plan: ScoringPlan, max_tokens: int) -> list[list[int]]:
    """The plan's sequences in runs of whole contexts whose packed sequences hold at most ``max_tokens``
    tokens together (a longer context alone), so no trunk is forwarded twice."""
    members = _members_by_context(plan)
    contexts = list(members)
    lengths = packed_lengths(plan)
    runs = chunk_by_tokens([int(lengths[c]) for c in contexts], max_tokens)
    return [[i for k in run for i in members[contexts[k]]] for run in runs]


def _members_by_context(plan: ScoringPlan) -> dict[int, list[int]]:
    """Context -> its sequences, contexts in order of first appearance."""
    members: dict[int, list[int]] = {}
    for i, c in enumerate(plan.seq_context.tolist()):
        members.setdefault(c, []).append(i)
    return members


def pack_plan(plan: ScoringPlan) -> list[PackedRow]:
    """One :class:`PackedRow` per context with sequences in ``plan`` (in order of first appearance)."""
    answer_lens = plan.answer_lens
    packed = []
    for c, members in _members_by_context(plan).items():
        prompt, response = plan.prompts[c], plan.responses[c]
        kept = plan.seq_response_len[members]
        trunk_len = prompt.numel() + int(kept.max())
        ids = [prompt, response[: int(kept.max())]]
        positions = [torch.arange(trunk_len, dtype=torch.int64)]
        segments = [torch.zeros(trunk_len, dtype=torch.int64)]
        answers = [torch.zeros(trunk_len, dtype=torch.bool)]
        for j, i in enumerate(members):
            tail = plan.tails[int(plan.seq_tail[i])]
            cut = prompt.numel() + int(plan.seq_response_len[i])
            ids.append(tail)
            positions.append(torch.arange(cut, cut + tail.numel(), dtype=torch.int64))
            segments.append(torch.full((tail.numel(),), j + 1, dtype=torch.int64))
            scored = torch.zeros(tail.numel(), dtype=torch.bool)
            scored[tail.numel() - answer_lens[i] :] = True
            answers.append(scored)
        packed.append(
            PackedRow(
                input_ids=torch.cat(ids), position_ids=torch.cat(positions), segment=torch.cat(segments),
                answer_mask=torch.cat(answers), sequences=torch.as_tensor(members, dtype=torch.int64),
            )
        )
    return packed


def scores_from_rows(rows: Sequence[PackedRow], answer_logprobs: Sequence[torch.Tensor], num_sequences: int) -> torch.Tensor:
    """(num_sequences,) mean answer log-prob of each plan sequence.

    Args:
        rows: the packed rows (padding rows allowed: they have no tails).
        answer_logprobs: per row, (N,) log-probs of its tokens (only answer positions are read).
        num_sequences: sequences in the plan the rows were packed from.
    """
    values, counts, order = [], [], []
    for row, logprobs in zip(rows, answer_logprobs, strict=True):
        if not row.sequences.numel():
            continue
        values.append(logprobs.float()[row.answer_mask])
        counts.append(torch.bincount(row.segment[row.answer_mask] - 1, minlength=row.sequences.numel()))
        order.append(row.sequences)
    out = torch.full((num_sequences,), float("nan"))
    if values:
        out[torch.cat(order)] = segment_means(torch.cat(values), torch.cat(counts))
    return out


# -- the forward ------------------------------------------------------------------------------------
def tree_attention_mask(row: torch.Tensor, segment: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: query q may attend to key k, for rows packed one after another in one sequence.

    Args:
        row: (N,) which packed row each token belongs to (rows are contiguous).
        segment: (N,) 0 on a row's trunk, j + 1 on its tail j (segments contiguous within a row).
        position: (N,) position ids (the trunk's run 0..trunk-1, so a trunk token's index in its row is its
            position).

    A trunk token sees the trunk tokens at or before it; a tail token sees the trunk tokens before its
    tail's first position and the tokens of its own tail at or before it. Nothing crosses rows.
    """
    first = _run_starts(row, segment)
    start = _last_start(first)
    # Trunk tokens a query sees: position + 1 on the trunk, the tail's first position on a tail.
    visible = torch.where(segment == 0, position + 1, position[start])
    same_row = row[:, None] == row[None, :]
    own_segment = (segment[:, None] == segment[None, :]) & (position[None, :] <= position[:, None])
    trunk_key = (segment[None, :] == 0) & (position[None, :] < visible[:, None])
    return same_row & (own_segment | trunk_key)


def answer_predictors(row: torch.Tensor, segment: torch.Tensor, position: torch.Tensor,
                      answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the scored tokens and of the tokens whose logits predict them.

    A token is predicted by the one before it in its tail, or, for a tail's first token (an empty bridge),
    by the last trunk token its tail sees (index ``row start + cut - 1``).

    Returns:
        ``(targets, predictors)``: (K,) int64 each, over the packed sequence.
    """
    index = torch.arange(row.numel(), device=row.device)
    targets = index[answer_mask]
    first = _run_starts(row, segment)
    row_start = _last_start(_run_starts(row))
    predictors = torch.where(first & (segment > 0), row_start + position - 1, index - 1)[answer_mask]
    return targets, predictors


def _run_starts(*keys: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the token starts a run of equal ``keys`` (the first token always does)."""
    first = torch.zeros(keys[0].numel(), dtype=torch.bool, device=keys[0].device)
    first[:1] = True
    for key in keys:
        first[1:] |= key[1:] != key[:-1]
    return first


def _last_start(first: torch.Tensor) -> torch.Tensor:
    """(N,) index of the start of each token's run."""
    index = torch.arange(first.numel(), device=first.device)
    return torch.where(first, index, torch.zeros_like(index)).cummax(0).values


@contextlib.contextmanager
def mask_capable_attention(model: Any) -> Iterator[str]:
    """Run the block with an attention implementation that honours a 4-D mask (sdpa unless eager);
    restores the model's own afterwards. Yields the implementation in use."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None) or "eager"
    if current in MASK_ATTENTION:
        yield current
        return
    model.set_attn_implementation("sdpa")
    try:
        yield "sdpa"
    finally:
        model.set_attn_implementation(current)


@torch.no_grad()
def packed_answer_logprobs(model: Any, rows: Sequence[PackedRow], temperature: float = 1.0,
                           device: torch.device | None = None) -> list[torch.Tensor]:
    """Per row, (N,) float32 log-probs of its answer tokens (0 elsewhere), from one forward of the rows
    concatenated into a single sequence under :func:`tree_attention_mask`.

    ``model`` is a ``transformers`` causal LM (or an FSDP-wrapped one); logits are divided by
    ``temperature`` as veRL does for log-probs. Only the predictor positions reach the LM head.
    ``device``: where the inputs go (default: the model's first parameter's device).
    """
    device = next(model.parameters()).device if device is None else device
    row = torch.cat([torch.full((len(r),), i, dtype=torch.int64) for i, r in enumerate(rows)]).to(device)
    segment = torch.cat([r.segment for r in rows]).to(device)
    position = torch.cat([r.position_ids for r in rows]).to(device)
    answer = torch.cat([r.answer_mask for r in rows]).to(device)
    ids = torch.cat([r.input_ids for r in rows]).to(device)
    targets, predictors = answer_predictors(row, segment, position, answer)
    allowed = tree_attention_mask(row, segment, position)
    with mask_capable_attention(model) as attention:
        if attention == "eager":  # eager adds the mask to the scores
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        else:
            mask = allowed
        del allowed
        output = model(
            input_ids=ids[None], position_ids=position[None], attention_mask=mask[None, None],
            logits_to_keep=predictors, use_cache=False,
        )
    logits = output.logits[0].float() / temperature
    picked = torch.log_softmax(logits, dim=-1).gather(1, ids[targets][:, None])[:, 0]
    flat = torch.zeros(ids.numel(), dtype=torch.float32, device=device)
    flat[targets] = picked
    return [piece.cpu() for piece in flat.split([len(r) for r in rows])]


@torch.no_grad()
def score_packed_with_hf_model(model: Any, plan: ScoringPlan, max_tokens: int = 4096,
                               temperature: float = 1.0) -> torch.Tensor:
    """(n,) float32 mean answer log-prob of each plan sequence, packed (the same numbers as
    :func:`verl_selflock.algorithms.igpo_plan.score_with_hf_model`, in ~one trajectory's forward per row).

    ``max_tokens``: tokens per forward (rows concatenated up to it; a longer row is forwarded alone).
    """
    rows = pack_plan(plan)
    logprobs: list[torch.Tensor] = []
    for run in chunk_by_tokens([len(r) for r in rows], max_tokens):
        logprobs += packed_answer_logprobs(model, [rows[i] for i in run], temperature)
    return scores_from_rows(rows, logprobs, len(plan))
