"""The IGPO advantage step and the T3 training metrics of our v1 trainer mode (veRL wiring only).

The maths lives in :mod:`verl_selflock.algorithms.igpo` (turn rewards, normalisation, discounting) and
:mod:`verl_selflock.verl_adapter.igpo_scoring` (the teacher-forced scores); this module fetches the batch from
TransferQueue, calls them, writes ``advantages`` and ``returns`` back and reports metrics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from verl_selflock.algorithms.critique_batch import collate_critiques
from verl_selflock.algorithms.igpo import (
    IgpoTurnTable,
    broadcast_turn_values,
    compute_igpo_turn_advantages,
    dense_turn_index,
    group_ids,
)
from verl_selflock.algorithms.igpo_config import IgpoConfig
from verl_selflock.algorithms.igpo_packing import packed_chunks, packed_lengths
from verl_selflock.algorithms.igpo_plan import ScoringPlan, plan_scoring, scoring_answers
from verl_selflock.contracts.episode import T3_BUDGET_SAVED, T3_ENABLED, T3_TRUNCATED, T3_TURN
from verl_selflock.verl_adapter.igpo_scoring import (
    score_packed_with_actor,
    score_with_actor,
    scoring_token_limit,
    timed,
)
from verl_selflock.verl_adapter.jagged import padded, rows
from verl_selflock.verl_adapter.private_names import generation_seconds, padding_flags, response_to_nested

logger = logging.getLogger(__name__)


def t3_metrics(extra_fields: Sequence[Mapping[str, Any] | None], is_padding: Sequence[bool]) -> dict[str, float]:
    """``t3/*`` metrics of a training batch, over the episodes T3 watched (``selflock_t3_enabled``); empty
    when T3 is off in the run, so a run without T3 logs no ``t3/*`` at all.

    ``t3/turn_mean`` (turns kept by a cut) is left out when nothing was cut: no cut has no mean, and a 0
    would read as "cut at turn 0". ``t3/tokens_budget_saved_*`` is an upper bound on the tokens T3 saved
    (the budget the cut left unused, see ``selflock_t3_budget_saved``), not a count of tokens saved.
    """
    episodes = [
        f for f, pad in zip(extra_fields, is_padding, strict=True) if not pad and f and bool(f.get(T3_ENABLED))
    ]
    if not episodes:
        return {}
    cut = np.array([bool(f.get(T3_TRUNCATED, False)) for f in episodes])
    turns = np.array([int(f.get(T3_TURN, 0)) for f in episodes], dtype=np.float64)
    budget = np.array([int(f.get(T3_BUDGET_SAVED, 0)) for f in episodes], dtype=np.float64)
    metrics = {
        "t3/frac_truncated": float(cut.mean()),
        "t3/tokens_budget_saved_mean": float(budget.mean()),
        "t3/tokens_budget_saved_total": float(budget.sum()),
    }
    if cut.any():
        metrics["t3/turn_mean"] = float(turns[cut].mean())
    return metrics


def igpo_advantage(trainer: Any, batch: Any, metrics: dict, config: IgpoConfig, mode: str) -> Any:
    """Compute IGPO advantages (= returns) for a v1 batch and write them to TransferQueue.

    Args:
        trainer: the running :class:`~verl_selflock.verl_adapter.trainer_mode.SelflockTrainer`.
        batch: the step's ``KVBatchMeta`` (rows may include veRL's synthetic padding rows).
        metrics: the step's metrics dict (``igpo/*`` added).
        config: validated ``algorithm.igpo``.
        mode: ``packed`` (the actor worker's packed forward; needs :class:`SelflockActorWorker` in the actor
            role) or ``prefix`` (veRL's ``compute_log_prob`` per turn prefix), as resolved on the driver.

    Returns:
        The ``KVBatchMeta`` returned by ``kv_batch_put``.
    """
    import transfer_queue as tq
    from tensordict import TensorDict

    data = tq.kv_batch_get(
        keys=batch.keys,
        partition_id=batch.partition_id,
        select_fields=["uid", "prompts", "responses", "response_mask", "rm_scores", "extra_fields"],
    )
    uids = list(data["uid"])
    response_mask_nested = data["response_mask"]
    temperature = float(trainer.config.actor_rollout_ref.rollout.temperature)
    packed = mode == "packed"
    if packed:
        def score(chunk: ScoringPlan) -> torch.Tensor:
            return score_packed_with_actor(trainer, chunk, temperature)
    else:
        def score(chunk: ScoringPlan) -> torch.Tensor:
            return score_with_actor(trainer, chunk, temperature, uids)
    advantages, step_metrics = compute_igpo_step(
        # The rows as tensors (views of the fetched batch), not Python lists: ~36 bytes per token as lists.
        prompts=rows(data["prompts"]),
        responses=rows(data["responses"]),
        extra_fields=list(data["extra_fields"]),
        uids=uids,
        is_padding=padding_flags(batch),
        response_mask=padded(response_mask_nested, 0),
        outcome=padded(data["rm_scores"], 0.0).float().sum(dim=1),
        tokenizer=trainer.tokenizer,
        config=config,
        score=score,
        gen_time=generation_seconds(trainer),
        # Packed rows run in our own forward, which has no per-sequence limit (a long row goes alone).
        max_sequence_tokens=None if packed else scoring_token_limit(trainer.config),
        packed=packed,
    )
    # Write back: advantages = returns (no critic).
    nested = response_to_nested(advantages, response_mask_nested)
    output = TensorDict({"advantages": nested, "returns": nested.clone()}, batch_size=len(batch))
    metrics.update(step_metrics)
    return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)


def compute_igpo_step(
    prompts: Sequence[Sequence[int] | torch.Tensor],
    responses: Sequence[Sequence[int] | torch.Tensor],
    extra_fields: Sequence[Mapping[str, Any] | None],
    uids: Sequence[object],
    is_padding: Sequence[bool],
    response_mask: torch.Tensor,
    outcome: torch.Tensor,
    tokenizer: Any,
    config: IgpoConfig,
    score: Callable[[ScoringPlan], torch.Tensor],
    gen_time: float = 0.0,
    max_sequence_tokens: int | None = None,
    packed: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """IGPO's token advantages of one batch, given a scorer for the teacher-forced sequences (no veRL, no I/O).

    Args:
        prompts, responses: per row, the prompt and response token ids.
        extra_fields: per row, the agent loop's ``extra_fields`` (turn ids, ground-truth answer, stop reason).
        uids: per row, veRL's prompt-group id.
        is_padding: per row, True for veRL's synthetic padding rows (left out entirely).
        response_mask: (bs, L) 1 on tokens the policy generated.
        outcome: (bs,) outcome reward of each row.
        tokenizer: the policy's tokenizer.
        config: validated ``algorithm.igpo``.
        score: plan -> (len(plan),) mean answer log-probs (the actor in training); called once per chunk
            of at most ``config.scoring_chunk_tokens`` tokens (:meth:`ScoringPlan.chunks`), never for an
            empty one.
        gen_time: the step's generation time in seconds, for ``igpo/scoring_time_ratio_to_gen``.
        max_sequence_tokens: the longest sequence ``score`` takes (:func:`scoring_token_limit`); rows
            with a longer one get the outcome only (``igpo/rows_over_token_limit``). None: no limit.
        packed: ``score`` packs each row's prefixes into one forward: chunks hold whole rows
            (:func:`verl_selflock.algorithms.igpo_packing.packed_chunks`) and ``igpo/scored_tokens``
            counts the packed tokens.

    Returns:
        ``(advantages, metrics)``: (bs, L) float32 advantages, 0 off generated tokens and on padding rows,
        and the ``igpo/*`` metrics.
    """
    # 0. The rows' turns: distinct turn ids, a row without any being one outcome-only turn. The plan reads
    # the same collated ids, so its prefix k is the table's turn k.
    turn_ids = collate_critiques(extra_fields, response_mask.shape[1]).turn_ids
    take_part = torch.tensor([not pad for pad in is_padding], dtype=torch.bool)
    turn_index, num_turns = dense_turn_index(turn_ids, take_part)

    # 1. Teacher-forced scores of the ground-truth answer after every distinct turn prefix, chunk by chunk.
    plan = plan_scoring(
        prompts=prompts,
        responses=responses,
        turn_ids=[row.tolist() for row in turn_ids],
        answers=scoring_answers(extra_fields, config.unfinished),  # None (outcome only): cut short, or no known answer
        tokenizer=tokenizer,
        config=config,
        skip=is_padding,
        max_sequence_tokens=max_sequence_tokens,
    )
    if bool(plan.over_limit.any()):
        logger.warning(
            "IGPO: %d row(s) have a scoring sequence longer than the actor's dynamic-batch limit of %d tokens "
            "and get the outcome reward only; raise actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu "
            "to score them", int(plan.over_limit.sum()), max_sequence_tokens,
        )
    chunks = packed_chunks(plan, config.scoring_chunk_tokens) if packed else plan.chunks(config.scoring_chunk_tokens)
    mean_logprob, scoring_time = timed(_score_in_chunks, plan, chunks, score)

    # 2. Turn rewards, group normalisation, discounted turn advantages, spread over each turn's tokens.
    width = int(num_turns.max()) if num_turns.numel() else 0
    table = compute_igpo_turn_advantages(
        plan.to_table(mean_logprob, width), plan.scored, num_turns, outcome, group_ids(list(uids)), config
    )
    advantages = broadcast_turn_values(table.advantages, turn_index, response_mask)
    metrics = _igpo_metrics(table, plan, num_turns, mean_logprob, scoring_time, advantages, response_mask, gen_time)
    metrics["igpo/scoring_chunks"] = float(len(chunks))
    metrics["igpo/packed"] = float(packed)
    if packed:
        metrics["igpo/scored_tokens"] = float(packed_lengths(plan).sum())
    metrics["igpo/rows_over_token_limit"] = float(plan.over_limit.sum())
    return advantages, metrics


def _score_in_chunks(
    plan: ScoringPlan, chunks: list[list[int]], score: Callable[[ScoringPlan], torch.Tensor]
) -> torch.Tensor:
    """(len(plan),) scores, one ``score`` call per chunk (only one chunk's sequences exist at a time)."""
    out = torch.empty(len(plan), dtype=torch.float32)
    for chunk in chunks:
        scores = score(plan.subset(chunk))
        if scores.shape != (len(chunk),):
            raise RuntimeError(f"IGPO scorer returned shape {tuple(scores.shape)} for a chunk of {len(chunk)}")
        out[torch.as_tensor(chunk, dtype=torch.int64)] = scores.float().cpu()
    return out


def _igpo_metrics(
    table: IgpoTurnTable,
    plan: ScoringPlan,
    num_turns: torch.Tensor,
    mean_logprob: torch.Tensor,
    scoring_time: float,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    gen_time: float,
) -> dict[str, float]:
    active = num_turns > 0  # every row but veRL's padding: rows without turns or cut short count as outcome-only
    ig_mask = table.reward_mask & ~table.outcome_mask
    ig = table.rewards[ig_mask]
    # Per scored (row, turn), so a sequence shared by several rows counts once for each of them.
    scored_prob = mean_logprob[plan.entry_seq].exp() if plan.entry_seq.numel() else torch.zeros(0)
    first = plan.entry_prefixes == 0
    tokens = response_mask.bool()

    def mean(t: torch.Tensor) -> float:
        return float(t.float().mean()) if t.numel() else 0.0

    return {
        "igpo/scoring_time_s": scoring_time,
        "igpo/scoring_time_ratio_to_gen": scoring_time / gen_time if gen_time > 0 else math.nan,
        "igpo/scored_sequences": float(len(plan)),
        "igpo/scored_tokens": float(plan.num_tokens),
        "igpo/frac_rows_outcome_only": mean((~table.scored)[active]),
        "igpo/p_mean": mean(scored_prob),
        "igpo/p_first_mean": mean(scored_prob[first]),
        "igpo/ig_mean": mean(ig),
        "igpo/ig_abs_mean": mean(ig.abs()),
        "igpo/ig_pos_frac": mean(ig > 0),
        "igpo/outcome_mean": mean(table.rewards[table.outcome_mask]),
        "igpo/adv_abs_mean": mean(advantages[tokens].abs()),
    }
