"""IGPO's turn-level advantage as pure, vectorised torch functions (no I/O, no veRL import).

IGPO ("Information Gain-based Policy Optimization", arXiv 2510.14967) rewards every non-final turn by
how much it raised the policy's belief in the ground-truth answer:

    p_k = exp(mean_j log pi(a_j | prefix_k, a_<j))     (prefix_k = the dialogue before agent turn k)
    r_k = p_{k+1} - p_k          for turns k = 0 .. T-2 (0-based);   r_{T-1} = outcome reward

(``log_prob_diff`` uses the mean log-probs instead of p). The rewards of a prompt group (same ``uid``)
are z-scored together (``joint``) or per kind (``separate``: outcome vs IG), discounted backwards over
turns, ``A_k = r~_k + gamma * A_{k+1}``, and each turn's value is put on all of its tokens.
Advantages = returns (no critic).

A row's turns are the distinct turn ids among its tokens, in order (:func:`dense_turn_index`): a turn
that kept no tokens leaves a gap in the ids and is simply not a turn. A row without any turn (another
agent loop's, or one whose only turn kept nothing) is one outcome-only turn spanning its whole response.

Everything works on a small per-turn table (bs, T): a scatter per group for the statistics, one
(T, T) matrix product for the discounted sums, one gather to spread turn values onto tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from verl_selflock.algorithms.igpo_config import IgpoConfig

__all__ = [
    "IgpoConfig",
    "IgpoTurnTable",
    "broadcast_turn_values",
    "compute_igpo_turn_advantages",
    "dense_turn_index",
    "group_ids",
]


class IgpoTurnTable(NamedTuple):
    """Per-turn IGPO quantities of a batch, all (bs, T) float unless said otherwise."""

    belief: torch.Tensor
    """p_k (``prob_diff``) or the mean log-prob (``log_prob_diff``) after prefix k; 0 where not scored."""
    rewards: torch.Tensor
    """Weighted turn rewards before normalisation: IG on turns 0..T_i-2, outcome on turn T_i-1; 0 elsewhere."""
    normalized: torch.Tensor
    """Group-normalised rewards at reward positions; 0 elsewhere."""
    advantages: torch.Tensor
    """Discounted sums of normalised rewards from each turn to the end; 0 on turns the row does not have."""
    reward_mask: torch.Tensor
    """bool: the position carries a reward (and entered the group statistics)."""
    outcome_mask: torch.Tensor
    """bool: the position is a row's final turn (outcome reward)."""
    scored: torch.Tensor
    """(bs,) bool: the row's IG rewards were used (False: outcome only)."""


def group_ids(uids: list[object]) -> torch.Tensor:
    """(bs,) int64 group index per sample from veRL's ``uid`` values (same uid = same prompt)."""
    index: dict[object, int] = {}
    return torch.tensor([index.setdefault(uid, len(index)) for uid in uids], dtype=torch.int64)


def dense_turn_index(turn_ids: torch.Tensor, take_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Number each row's turns 0..T_i-1 by the distinct turn ids it holds (gaps tolerated).

    The agent loop numbers turns as it generates them, so a turn that kept no tokens (e.g. its first token
    was an eos that ends nothing) leaves a gap: ids {0, 2} are two turns here, 0 and 1. Rows that take part
    but hold no turn id get one turn covering every token, so their outcome still reaches the generated
    tokens and the group statistics (the outcome-only convention of GRPO).

    Args:
        turn_ids: (bs, L) int turn id per response token, -1 outside generated turns.
        take_part: (bs,) bool, False for rows left out entirely (veRL's padding rows).

    Returns:
        ``(turn_index, num_turns)``: (bs, L) int64 dense turn of each token (-1 outside turns; 0 on every
        token of a row without turns; -1 everywhere on rows that do not take part) and (bs,) int64 T_i
        (1 for a row without turns, 0 for rows that do not take part).
    """
    bs, device = turn_ids.shape[0], turn_ids.device
    take_part = take_part.to(device).bool()
    ids = turn_ids.long()
    max_id = int(ids.max()) if ids.numel() else -1
    # present[i, t + 1]: row i has a token of turn id t; column 0 collects the -1 (off-turn) tokens.
    present = torch.zeros(bs, max_id + 2, dtype=torch.bool, device=device)
    present.scatter_(1, ids + 1, True)
    present[:, 0] = False
    rank = present.long().cumsum(1) - 1  # dense index of each present id; column 0 reads -1
    turn_index = rank.gather(1, ids + 1)
    num_turns = present.sum(1)
    no_turn = num_turns == 0
    turn_index = torch.where(no_turn.unsqueeze(1), torch.zeros_like(turn_index), turn_index)
    num_turns = torch.where(no_turn, torch.ones_like(num_turns), num_turns)
    turn_index = torch.where(take_part.unsqueeze(1), turn_index, torch.full_like(turn_index, -1))
    return turn_index, torch.where(take_part, num_turns, torch.zeros_like(num_turns))


def _scatter_stats(values: torch.Tensor, keys: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-key mean and population std of 1-D ``values`` (std 1 for keys with <= 1 value)."""
    count = torch.zeros(num_keys, dtype=values.dtype, device=values.device).scatter_add_(0, keys, torch.ones_like(values))
    total = torch.zeros_like(count).scatter_add_(0, keys, values)
    mean = total / count.clamp(min=1)
    # Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2: no cancellation.
    sq = torch.zeros_like(count).scatter_add_(0, keys, (values - mean[keys]) ** 2)
    std = torch.sqrt(sq / count.clamp(min=1))
    std = torch.where(count <= 1, torch.ones_like(std), std)
    return mean, std


def compute_igpo_turn_advantages(
    answer_logprob: torch.Tensor,
    scored: torch.Tensor,
    num_turns: torch.Tensor,
    outcome: torch.Tensor,
    group: torch.Tensor,
    config: IgpoConfig,
) -> IgpoTurnTable:
    """IGPO's turn rewards, group normalisation and discounted turn advantages.

    Args:
        answer_logprob: (bs, W) mean log-prob of the ground-truth answer tokens teacher-forced after
            prefix k (the dialogue before 0-based agent turn k; prefix 0 = the prompt). Only columns
            k < num_turns[i] are read; others may hold anything. A table narrower than max(num_turns)
            reads as NaN beyond its width (those rows fall back to the outcome).
        scored: (bs,) bool, the row's prefixes were scored (its task knows the answer). A row whose used
            columns are not all finite is treated as unscored. Unscored rows get the outcome reward only
            (their earlier turns receive the discounted outcome, as in the authors' fallback).
        num_turns: (bs,) int, the row's number of agent turns T_i (0: the row takes no part, e.g. padding).
        outcome: (bs,) float outcome reward of each row.
        group: (bs,) int64 prompt-group index (see :func:`group_ids`).
        config: validated ``algorithm.igpo`` settings.

    Returns:
        An :class:`IgpoTurnTable`, float32 (its bool fields bool). The table is computed in float64: a
        group whose rewards are nearly equal (std ~1e-5 around 0.5) keeps only two or three significant
        digits of its centred values in float32, and the table is (bs, T), so the precision costs nothing.
    """
    device, dtype = answer_logprob.device, torch.float64
    num_turns = num_turns.to(device).long()
    bs = answer_logprob.shape[0]
    width = max(answer_logprob.shape[1], int(num_turns.max()) if num_turns.numel() else 0)
    if answer_logprob.shape[1] < width:  # never drop a turn: missing scores are NaN, i.e. outcome only
        answer_logprob = F.pad(answer_logprob, (0, width - answer_logprob.shape[1]), value=float("nan"))
    cols = torch.arange(width, device=device)
    turn_valid = cols.unsqueeze(0) < num_turns.unsqueeze(1)
    outcome_mask = turn_valid & (cols.unsqueeze(0) == (num_turns - 1).unsqueeze(1))

    logprob = answer_logprob.to(dtype)
    finite = torch.isfinite(logprob) | ~turn_valid
    scored = scored.to(device).bool() & finite.all(dim=1) & (num_turns > 0)
    logprob = torch.where(turn_valid & scored.unsqueeze(1), logprob, torch.zeros_like(logprob))
    belief = logprob.exp() if config.info_gain_type == "prob_diff" else logprob
    belief = torch.where(turn_valid & scored.unsqueeze(1), belief, torch.zeros_like(belief))

    # IG of turn k = belief after it (prefix k+1) - belief before it (prefix k); the last column has none.
    gain = torch.zeros_like(belief)
    gain[:, :-1] = belief[:, 1:] - belief[:, :-1]
    ig_mask = turn_valid & ~outcome_mask & scored.unsqueeze(1)
    reward_mask = ig_mask | outcome_mask
    outcome_col = outcome.to(device, dtype).unsqueeze(1).expand(bs, width)
    rewards = torch.where(ig_mask, config.ig_weight * gain, torch.zeros_like(gain))
    rewards = torch.where(outcome_mask, config.outcome_weight * outcome_col, rewards)

    # Group statistics over reward positions: key = group (joint) or (group, is_outcome) (separate).
    keys = group.to(device).long().unsqueeze(1).expand(bs, width)
    if config.norm_mode == "separate":
        keys = keys * 2 + outcome_mask.long()
    flat_keys, flat_values = keys[reward_mask], rewards[reward_mask]
    normalized = torch.zeros_like(rewards)
    if flat_values.numel():
        mean, std = _scatter_stats(flat_values, flat_keys, int(flat_keys.max()) + 1)
        centred = flat_values - mean[flat_keys]
        normalized[reward_mask] = centred / (std[flat_keys] + config.epsilon) if config.norm_by_std else centred

    # A[:, k] = sum_{k' >= k} gamma^(k' - k) * r~[:, k'] as one product with a (T, T) discount matrix.
    lag = cols.unsqueeze(1) - cols.unsqueeze(0)  # [k', k] = k' - k
    discount = torch.where(
        lag >= 0, torch.tensor(config.gamma, dtype=dtype, device=device) ** lag.clamp(min=0).to(dtype), 0.0
    )
    advantages = (normalized @ discount) * turn_valid
    # Outputs in float32 like the token-level advantages veRL trains on: the digits that matter survived
    # the centring above.
    out = torch.float32
    return IgpoTurnTable(
        belief.to(out), rewards.to(out), normalized.to(out), advantages.to(out), reward_mask, outcome_mask, scored
    )


def broadcast_turn_values(values: torch.Tensor, turn_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Put each turn's value on every token the policy generated in that turn.

    Args:
        values: (bs, T) per-turn values.
        turn_ids: (bs, L) int 0-based turn of each response token, -1 outside generated turns.
        response_mask: (bs, L) 1 on tokens the policy generated (the loss mask), 0 elsewhere.

    Returns:
        (bs, L) float tensor: ``values[i, turn_ids[i, l]]`` on generated tokens, 0 on observation, padding
        and tokens whose turn id is outside ``values``.
    """
    width = values.shape[1]
    if width == 0:
        return torch.zeros(turn_ids.shape, dtype=values.dtype, device=values.device)
    inside = (turn_ids >= 0) & (turn_ids < width)
    gathered = torch.gather(values, 1, turn_ids.clamp(min=0, max=max(width - 1, 0)).long())
    return torch.where(inside & response_mask.bool(), gathered, torch.zeros_like(gathered))
