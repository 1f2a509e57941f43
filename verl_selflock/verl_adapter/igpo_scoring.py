"""IGPO's teacher-forced scoring: the policy's mean log-prob of the ground-truth answer after each turn.

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

:func:`score_with_actor` runs all sequences of a training step as **one** batch through the actor
worker group's ``compute_log_prob``: the same call, model, weights and temperature veRL uses for the
old log-probs (``PPOTrainer._compute_old_log_prob`` in ``verl/trainer/ppo/v1/trainer_base.py``, 0.9.1),
through TransferQueue in a partition of its own. :func:`score_with_hf_model` is the same computation on
a local ``transformers`` model (CPU benchmarks, offline analysis).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from verl_selflock.contracts.episode import GT_ANSWER, STOP_ANSWER, STOP_DONE, STOP_REASON
from verl_selflock.algorithms.igpo_config import IgpoConfig
from verl_selflock.verl_adapter.jagged import as_jagged
from verl_selflock.verl_adapter.private_names import (
    actor_dp_size,
    balanced_partitions,
    forward_only_options,
    list_of_dict_to_tensordict,
    response_from_nested,
    upsample_to_multiple,
)

FINAL_STOP_REASONS = (STOP_ANSWER, STOP_DONE)
"""Stop reasons of an episode whose last turn is a final one (an answer, or the environment ended it)."""

SCORING_PARTITION = "selflock_igpo"
"""TransferQueue partition of the scoring sequences (cleared after each step; never the ``train`` one,
which the replay buffer samples from)."""


SCORING_FIELDS = ("uid", "prompts", "responses", "response_mask", "loss_mask", "input_ids", "attention_mask", "position_ids")
"""Per-sample fields of a scoring sequence in TransferQueue (what the actor's ``compute_log_prob`` reads)."""


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


def answer_mean_logprobs(log_probs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(n,) mean answer log-prob from the actor's output fields.

    Args:
        log_probs: (n, prompt + response) per-position log-probs as veRL's engine returns them (position
            p holds log pi(token p+1)), jagged or dense.
        response_mask: (n, answer_len) the scoring sequences' response masks, jagged or dense.
    """
    answer = response_from_nested(as_jagged(log_probs), as_jagged(response_mask))
    return segment_means(answer.values().float(), answer.offsets().diff())


def plan_to_tensordict(plan: ScoringPlan, uids: Sequence[object] | None = None):
    """The plan as the per-sample fields veRL's actor ``compute_log_prob`` reads from TransferQueue.

    Same layout as ``AgentLoopWorkerTQ._agent_loop_postprocess``: ``prompts`` = prefix + bridge,
    ``responses`` = the answer (all of it scored: ``response_mask`` 1), ``input_ids`` = both, text-only
    ``position_ids`` (multimodal rope positions are not supported here).
    """
    samples = []
    for i, (ids, n) in enumerate(zip(plan.input_ids, plan.answer_lens, strict=True)):
        mask = torch.ones(n, dtype=torch.int64)
        samples.append(
            {
                "uid": str(uids[int(plan.rows[i])]) if uids is not None else f"igpo{i}",
                "prompts": ids[:-n],
                "responses": ids[-n:],
                "response_mask": mask,
                "loss_mask": mask,
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "position_ids": torch.arange(ids.numel(), dtype=torch.int64),
            }
        )
    return list_of_dict_to_tensordict(samples)


def forward_batch_multiple(dp_size: int, use_dynamic_bsz: bool, micro_batch_size_per_gpu: int | None) -> int:
    """The batch-size multiple a forward-only ``compute_log_prob`` of the actor needs (veRL 0.9.1).

    The dispatch splits the batch into ``dp_size`` equal chunks, and without dynamic batch sizes each
    rank cuts its chunk into micro-batches of ``rollout.log_prob_micro_batch_size_per_gpu`` that must
    divide it (``prepare_micro_batches``). The PPO mini-batch sizes, which veRL's ``_balance_batch`` also
    pads to (the lcm of the DP size and them), matter only for an update, never for a forward pass.
    """
    if use_dynamic_bsz or not micro_batch_size_per_gpu:
        return dp_size
    return dp_size * int(micro_batch_size_per_gpu)


def balance_for_forward(trainer: Any, meta: Any) -> Any:
    """Pad a scoring batch to :func:`forward_batch_multiple` and spread its tokens evenly over the DP ranks.

    veRL's ``_balance_batch`` minus the mini-batch alignment: the same synthetic no-op padding rows
    (``upsample_batch_to_divisible_size``) and the same balanced partitions, but at most
    ``multiple - 1`` padding rows instead of up to lcm(DP size, mini-batch sizes) - 1.

    Args:
        trainer: the running v1 trainer (``actor_rollout_wg``, ``config``, ``tokenizer``).
        meta: the scoring sequences' ``KVBatchMeta`` (tags carry ``seq_len``).

    Returns:
        The padded, reordered ``KVBatchMeta``.
    """
    dp_size = actor_dp_size(trainer.actor_rollout_wg)
    roles = trainer.config.actor_rollout_ref
    multiple = forward_batch_multiple(
        dp_size, bool(roles.actor.use_dynamic_bsz), roles.rollout.get("log_prob_micro_batch_size_per_gpu")
    )
    meta = upsample_to_multiple(meta, multiple, trainer.tokenizer.eos_token_id)
    seqlens = torch.tensor([tag["seq_len"] for tag in meta.tags], dtype=torch.int64)
    partitions = balanced_partitions(seqlens, dp_size)
    meta.reorder([index for partition in partitions for index in partition])
    return meta


def score_with_actor(trainer: Any, plan: ScoringPlan, temperature: float, uids: Sequence[object]) -> torch.Tensor:
    """Mean answer log-prob of every plan sequence from the actor worker group (one batched call).

    Args:
        trainer: the running v1 trainer (``actor_rollout_wg``, ``config``, ``tokenizer``).
        plan: the sequences to score (non-empty).
        temperature: the rollout temperature (veRL scores old log-probs at it too).
        uids: per batch row, veRL's ``uid`` (stored with each sequence for veRL's padding helper).

    Returns:
        (n,) float32 mean log-prob of each sequence's answer tokens.
    """
    import transfer_queue as tq

    keys = [f"igpo-{uuid.uuid4().hex}-{i}" for i in range(len(plan))]
    tags = [
        {"status": "success", "prompt_len": int(ids.numel() - n), "response_len": n, "seq_len": int(ids.numel())}
        for ids, n in zip(plan.input_ids, plan.answer_lens, strict=True)
    ]
    meta = tq.kv_batch_put(keys=keys, partition_id=SCORING_PARTITION, fields=plan_to_tensordict(plan, uids), tags=tags)
    try:
        meta = balance_for_forward(trainer, meta)
        # Read only the fields we wrote: veRL's padding rows carry a few more (rm_scores, num_turns ...).
        meta.fields = list(SCORING_FIELDS)
        meta.extra_info.update(forward_only_options(temperature))
        output = trainer.actor_rollout_wg.compute_log_prob(meta)
        assert len(output) == len(meta)
        data = tq.kv_batch_get(keys=keys, partition_id=SCORING_PARTITION, select_fields=["log_probs", "response_mask"])
        return answer_mean_logprobs(data["log_probs"], data["response_mask"])
    finally:
        tq.kv_clear(keys=list(meta.keys), partition_id=SCORING_PARTITION)


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


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
