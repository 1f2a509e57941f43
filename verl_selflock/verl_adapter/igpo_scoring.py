"""IGPO's teacher-forced scoring on the actor: the plan of :mod:`verl_selflock.algorithms.igpo_plan` scored by veRL.

:func:`score_packed_with_actor` (``algorithm.igpo.scoring`` packed, the default on FSDP) packs each row's
prefixes into one sequence (:mod:`verl_selflock.algorithms.igpo_packing`) and has the actor workers
forward them under a tree attention mask (:mod:`verl_selflock.verl_adapter.igpo_worker`).

:func:`score_with_actor` (``scoring=prefix``) runs one chunk of a step's sequences (``algorithm.igpo.scoring_chunk_tokens``,
split by :func:`verl_selflock.verl_adapter.igpo_step.compute_igpo_step`) as one batch through the actor
worker group's ``compute_log_prob``: the same call, model, weights and temperature veRL uses for the
old log-probs (``PPOTrainer._compute_old_log_prob`` in ``verl/trainer/ppo/v1/trainer_base.py``, 0.9.1),
through TransferQueue in a partition of its own that holds one chunk at a time.

With dynamic batch sizes veRL packs micro-batches of at most ``rollout.log_prob_max_token_len_per_gpu``
x the Ulysses size tokens and *asserts* that no single sequence is longer
(``utils/seqlen_balancing.py`` ``rearrange_micro_batches``): an over-long sequence would stop the
run inside a worker. :func:`scoring_token_limit` gives that limit to the plan, which leaves such rows
unscored (outcome reward only, counted in ``igpo/rows_over_token_limit``) instead.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import torch

from verl_selflock.algorithms.igpo_plan import ScoringPlan, segment_means
from verl_selflock.verl_adapter.jagged import as_jagged, rows
from verl_selflock.verl_adapter.private_names import (
    actor_dp_size,
    balanced_partitions,
    forward_only_options,
    list_of_dict_to_tensordict,
    response_from_nested,
    upsample_to_multiple,
)

SCORING_PARTITION = "selflock_igpo"
"""TransferQueue partition of the scoring sequences (cleared after each step; never the ``train`` one,
which the replay buffer samples from)."""


SCORING_FIELDS = ("uid", "prompts", "responses", "response_mask", "loss_mask", "input_ids", "attention_mask", "position_ids")
"""Per-sample fields of a scoring sequence in TransferQueue (what the actor's ``compute_log_prob`` reads)."""


def answer_mean_logprobs(log_probs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(n,) mean answer log-prob from the actor's output fields.

    Args:
        log_probs: (n, prompt + response) per-position log-probs as veRL's engine returns them (position
            p holds log pi(token p+1)), jagged or dense.
        response_mask: (n, answer_len) the scoring sequences' response masks, jagged or dense.
    """
    answer = response_from_nested(as_jagged(log_probs), as_jagged(response_mask))
    return segment_means(answer.values().float(), answer.offsets().diff())


def plan_to_tensordict(
    plan: ScoringPlan, uids: Sequence[object] | None = None, sequences: Sequence[torch.Tensor] | None = None
) -> Any:
    """The plan as the per-sample fields veRL's actor ``compute_log_prob`` reads from TransferQueue.

    ``sequences``: the plan's materialised sequences when the caller already has them (else built here).

    Same layout as ``AgentLoopWorkerTQ._agent_loop_postprocess``: ``prompts`` = prefix + bridge,
    ``responses`` = the answer (all of it scored: ``response_mask`` 1), ``input_ids`` = both, text-only
    ``position_ids`` (multimodal rope positions are not supported here).
    """
    samples = []
    sequences = plan.input_ids if sequences is None else sequences
    for i, (ids, n) in enumerate(zip(sequences, plan.answer_lens, strict=True)):
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
    return spread_over_ranks(upsample_to_multiple(meta, multiple, trainer.tokenizer.eos_token_id), dp_size)


def spread_over_ranks(meta: Any, dp_size: int) -> Any:
    """Reorder a ``KVBatchMeta`` (a multiple of ``dp_size`` rows, tags carrying ``seq_len``) so that the
    dispatch's equal chunks hold balanced token counts (veRL's ``_balance_batch`` partitions)."""
    seqlens = torch.tensor([tag["seq_len"] for tag in meta.tags], dtype=torch.int64)
    partitions = balanced_partitions(seqlens, dp_size)
    meta.reorder([index for partition in partitions for index in partition])
    return meta


def scoring_token_limit(config: Any) -> int | None:
    """The longest sequence the actor's ``compute_log_prob`` accepts, None without dynamic batch sizes.

    veRL 0.9.1 (``workers/engine_workers.py`` ``TrainingWorker.infer_batch``, ``engine/utils.py``
    ``prepare_micro_batches``): with ``actor.use_dynamic_bsz`` each micro-batch holds at most
    ``rollout.log_prob_max_token_len_per_gpu`` x the Ulysses sequence-parallel size tokens, and a longer
    sequence fails an assertion. Without dynamic batch sizes micro-batches are counted in sequences.
    """
    roles = config.actor_rollout_ref
    if not bool(roles.actor.get("use_dynamic_bsz", False)):
        return None
    per_gpu = roles.rollout.get("log_prob_max_token_len_per_gpu")
    if per_gpu is None:
        return None
    fsdp = roles.actor.get("fsdp_config") or {}
    sp = fsdp.get("ulysses_sequence_parallel_size") or roles.actor.get("ulysses_sequence_parallel_size") or 1
    return int(per_gpu) * int(sp)


def score_with_actor(trainer: Any, plan: ScoringPlan, temperature: float, uids: Sequence[object]) -> torch.Tensor:
    """Mean answer log-prob of every plan sequence from the actor worker group (one batched call).

    Args:
        trainer: the running v1 trainer (``actor_rollout_wg``, ``config``, ``tokenizer``).
        plan: the sequences to score (non-empty): one chunk of a step's plan, materialised only here.
        temperature: the rollout temperature (veRL scores old log-probs at it too).
        uids: per batch row, veRL's ``uid`` (stored with each sequence for veRL's padding helper).

    Returns:
        (n,) float32 mean log-prob of each sequence's answer tokens.
    """
    import transfer_queue as tq

    sequences = plan.input_ids
    keys = [f"igpo-{uuid.uuid4().hex}-{i}" for i in range(len(plan))]
    tags = [
        {"status": "success", "prompt_len": int(ids.numel() - n), "response_len": n, "seq_len": int(ids.numel())}
        for ids, n in zip(sequences, plan.answer_lens, strict=True)
    ]
    fields = plan_to_tensordict(plan, uids, sequences)
    del sequences  # the TensorDict holds its own copy; keep one chunk's tokens on the driver, not two
    meta = tq.kv_batch_put(keys=keys, partition_id=SCORING_PARTITION, fields=fields, tags=tags)
    del fields
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


def packed_micro_tokens(config: Any) -> int:
    """Tokens per packed scoring forward: veRL's dynamic-batch log-prob budget where set, else the
    longest trajectory times the log-prob micro-batch size (a longer packed row is forwarded alone)."""
    limit = scoring_token_limit(config)
    if limit is not None:
        return limit
    rollout = config.actor_rollout_ref.rollout
    longest = int(rollout.get("prompt_length", 0) or 0) + int(rollout.get("response_length", 0) or 0)
    return max(longest, 1) * max(int(rollout.get("log_prob_micro_batch_size_per_gpu") or 1), 1)


def packed_fields(packed: Sequence[Any]) -> Any:
    """Packed rows (:class:`~verl_selflock.algorithms.igpo_packing.PackedRow`) as the per-sample fields
    :meth:`SelflockActorWorker.compute_igpo_answer_logprobs` reads (``PACKED_FIELDS``, jagged int64)."""
    return list_of_dict_to_tensordict([
        {"input_ids": row.input_ids, "position_ids": row.position_ids, "igpo_segment": row.segment,
         "igpo_answer_mask": row.answer_mask.long()}
        for row in packed
    ])


def score_packed_with_actor(trainer: Any, plan: ScoringPlan, temperature: float) -> torch.Tensor:
    """Mean answer log-prob of every plan sequence, one packed forward per row on the actor workers.

    The chunk's contexts are packed (:func:`verl_selflock.algorithms.igpo_packing.pack_plan`), padded with
    one-token rows to a multiple of the actor's DP size, spread over the ranks by tokens, and scored by
    :meth:`SelflockActorWorker.compute_igpo_answer_logprobs` through TransferQueue (partition
    :data:`SCORING_PARTITION`, cleared afterwards).

    Returns:
        (len(plan),) float32 mean log-prob of each sequence's answer tokens.
    """
    import transfer_queue as tq

    from verl_selflock.algorithms.igpo_packing import PackedRow, pack_plan, scores_from_rows
    from verl_selflock.verl_adapter.igpo_worker import MICRO_TOKENS_KEY, OUTPUT_FIELD, PACKED_FIELDS

    packed = pack_plan(plan)
    dp_size = actor_dp_size(trainer.actor_rollout_wg)
    packed += [PackedRow.padding(int(trainer.tokenizer.eos_token_id or 0))] * (-len(packed) % dp_size)
    keys = [f"igpo-packed-{uuid.uuid4().hex}-{i}" for i in range(len(packed))]
    fields = packed_fields(packed)
    tags = [{"status": "success", "seq_len": len(row)} for row in packed]
    meta = tq.kv_batch_put(keys=keys, partition_id=SCORING_PARTITION, fields=fields, tags=tags)
    del fields
    try:
        meta = spread_over_ranks(meta, dp_size)
        meta.fields = list(PACKED_FIELDS)
        meta.extra_info.update({"temperature": temperature, MICRO_TOKENS_KEY: packed_micro_tokens(trainer.config)})
        output = trainer.actor_rollout_wg.compute_igpo_answer_logprobs(meta)
        assert len(output) == len(meta)
        data = tq.kv_batch_get(keys=keys, partition_id=SCORING_PARTITION, select_fields=[OUTPUT_FIELD])
        return scores_from_rows(packed, rows(as_jagged(data[OUTPUT_FIELD])), len(plan))
    finally:
        tq.kv_clear(keys=keys, partition_id=SCORING_PARTITION)


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
