"""The AREW critique bonus as pure, vectorised torch functions (no I/O, no veRL import).

AREW ("On Information Self-Locking in Reinforcement Learning for Active Reasoning of LLM Agents",
arXiv 2603.12109) adds a zero-sum, per-trajectory bonus to the base advantage:
``A_hat_t = A_t + lambda * u_t`` with ``u_t = +1/|P|`` on positively critiqued turns and ``-1/|N|`` on
negatively critiqued ones. Because each trajectory's bonus sums to 0, it only moves credit between the
turns of a trajectory; the trajectory's direction still comes from the outcome advantage.

Inputs are the per-token tensors of :class:`verl_selflock.contracts.critique.CritiqueBatch`. The computation
works on a small per-turn table: one ``scatter`` collects each turn's label and token count, the
normalisation runs on (bs, num_turns) tensors, and one ``gather`` spreads the values back onto tokens.
It relies on the layout of the critique fields (:mod:`verl_selflock.contracts.critique`): a turn's
critique, channel and fallback role are the same on all its tokens, and tokens outside turns (turn id
-1) carry no critique (they never get a bonus).
"""

from __future__ import annotations

import numpy as np
import torch

from verl_selflock.algorithms.arew_config import TURN_LEVEL_MODES, ArewConfig
from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, FallbackRole

__all__ = ["ArewConfig", "apply_critique_noise", "compute_arew_bonus", "make_noise_generator"]

_UINT64_MASK = (1 << 64) - 1
# Packing of a token's label into one int8 code so a single scatter collects all three per turn:
# code = (critique + 1) + 3 * channel + 9 * fallback_role, in [0, 26].
_CHANNEL_STRIDE = 3
_FALLBACK_STRIDE = 9


def make_noise_generator(noise_seed: int, global_step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of the critique noise at one training step.

    The seed mixes ``(noise_seed, global_step)`` through numpy's ``SeedSequence`` so that consecutive
    steps (and nearby seeds) draw unrelated flips while a rerun draws the same ones. The draws depend on
    the device kind (CPU and CUDA generators differ).
    """
    entropy = [noise_seed & _UINT64_MASK, global_step & _UINT64_MASK]
    seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _draw_turn_flips(batch_size: int, num_turns: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """(batch_size, num_turns) bool: which turns the noise flips, each independently with probability alpha.

    Shared by :func:`apply_critique_noise` and :func:`compute_arew_bonus` so both flip the same turns for
    the same generator state. ``torch.rand`` is in [0, 1), so alpha = 1 flips every turn and alpha = 0 none.
    """
    draws = torch.rand((batch_size, num_turns), generator=generator, device=generator.device)
    return draws < alpha


def apply_critique_noise(
    critique: torch.Tensor, turn_ids: torch.Tensor, alpha: float, generator: torch.Generator
) -> torch.Tensor:
    """Flip (+1 <-> -1) the critiques of a random fraction ``alpha`` of turns.

    The draw is per (row, turn), not per token, so all tokens of a turn keep the same critique.

    Args:
        critique: (bs, L) integer critiques in {-1, 0, +1}; 0 stays 0.
        turn_ids: (bs, L) integer turn index per token, -1 outside turns (those tokens never flip).
        alpha: probability in [0, 1] that a turn is flipped.
        generator: source of randomness (see :func:`make_noise_generator`); it must live on the device the
            flips should be drawn on.

    Returns:
        (bs, L) tensor of ``critique``'s dtype and device; ``critique`` itself when alpha is 0.
    """
    if alpha <= 0 or critique.numel() == 0:
        return critique
    num_turns = int(turn_ids.max()) + 1
    if num_turns <= 0:
        return critique
    flips = _draw_turn_flips(critique.shape[0], num_turns, alpha, generator).to(critique.device)
    # Column 0 stands for "no turn" (turn id -1): never flipped.
    flips = torch.cat([torch.zeros_like(flips[:, :1]), flips], dim=1)
    token_flips = flips.gather(1, turn_ids.long() + 1)
    return torch.where(token_flips, -critique, critique)


def compute_arew_bonus(
    critique: torch.Tensor,
    channel: torch.Tensor,
    turn_ids: torch.Tensor,
    fallback_role: torch.Tensor,
    response_mask: torch.Tensor,
    config: ArewConfig,
    global_step: int,
    counted_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The per-token AREW bonus of a batch (to be added to the base advantages).

    Order of operations per trajectory: keep the critiques of ``config.channels``; flip a fraction
    ``config.noise_alpha`` of the nonzero turn critiques; count positive / negative tokens (token-level
    modes) or turns (turn-level modes); for ``step_abs_sum`` apply the fallbacks, then (turn-level modes)
    the ``neg_cap``; normalise as ``config.mode`` says (see :class:`ArewConfig`). A trajectory without both
    signs gets no bonus unless ``one_sided == "clamp"``. Turn-level modes spread a turn's share evenly over
    the turn's tokens with ``response_mask`` 1; a turn without such tokens does not count.

    Args:
        critique: (bs, L) int8 critique z in {-1, 0, +1} of the turn that generated each token.
        channel: (bs, L) int8 ``contracts.critique.CHANNEL_*`` of each token's turn.
        turn_ids: (bs, L) int64 0-based turn index per token; -1 on observation and padding tokens.
        fallback_role: (bs, L) int8 :class:`~verl_selflock.contracts.critique.FallbackRole` of each token's turn (a bool
            tensor reads as ``ELIGIBLE``/``ORDINARY``): which zero turns the ``step_abs_sum`` fallbacks may
            promote; ``EXEMPT`` turns are promoted by neither.
        response_mask: (bs, L) int, bool or float; nonzero on tokens the policy generated, 0 on observation
            and padding tokens. Only nonzero tokens count and only they get a bonus.
        config: validated AREW settings.
        global_step: veRL's global step, for the active window and the noise seed.
        counted_rows: (bs,) bool, the trajectories the metrics describe (None: all). veRL pads a batch to
            a multiple of its data-parallel size with rows that are not episodes; they must not dilute
            the means. The bonus itself is computed for every row.

    Returns:
        ``(bonus, metrics)``. ``bonus`` is (bs, L) float32 on the input device, exactly 0.0 where
        ``response_mask`` is 0, everywhere when the window is inactive, and everywhere when ``lam`` is 0.
        ``metrics`` holds floats under ``arew/``: ``active`` and ``lam``; when active also
        ``pos_turns``/``neg_turns`` and ``pos_tokens``/``neg_tokens`` (means per trajectory, after channel
        filter and noise, before fallbacks and cap), ``frac_traj_both``/``frac_traj_only_pos``/
        ``frac_traj_only_neg``/``frac_traj_no_critique_signal`` (same critiques), ``frac_traj_fallback``
        (trajectories changed by a ``step_abs_sum`` fallback), ``bonus_abs_mean`` (mean |bonus| over response
        tokens), ``bonus_sum_abs_max`` (max over trajectories of |sum of the bonus|: 0 up to float error
        unless ``one_sided == "clamp"``), ``noise_flipped`` (number of critiques flipped in the batch) and
        ``as_pos``/``as_neg``/``bt_pos``/``bt_neg`` (turn counts per channel as the environment gave them,
        before channel filter and noise; means per trajectory).
    """
    _check_shapes(critique, channel, turn_ids, fallback_role, response_mask)
    device = critique.device
    if not config.is_active(global_step):
        inactive = {"arew/active": 0.0, "arew/lam": float(config.lam)}
        return torch.zeros(critique.shape, dtype=torch.float32, device=device), inactive

    # 1. One row per trajectory, one column per turn: each turn's label and number of response tokens.
    batch_size = critique.shape[0]
    max_turn_id = int(turn_ids.max()) if turn_ids.numel() else -1
    num_turns = max(max_turn_id + 1, 1)  # one (empty) column at least keeps every reduction defined
    index, turn_code, turn_tokens = _collect_turns(critique, channel, turn_ids, fallback_role, response_mask, num_turns)
    turn_exists = turn_tokens > 0
    raw_z = torch.where(turn_exists, turn_code % _CHANNEL_STRIDE - 1, 0)
    turn_channel = (turn_code // _CHANNEL_STRIDE) % _CHANNEL_STRIDE
    turn_role = turn_code // _FALLBACK_STRIDE

    # 2. The critiques that count: the configured channels, then the noise ablation.
    z = raw_z
    if config.channels != "both":
        kept_channel = CHANNEL_AS if config.channels == "as" else CHANNEL_BT
        z = torch.where(turn_channel == kept_channel, z, 0)
    noise_flipped = torch.zeros(batch_size, num_turns, dtype=torch.bool, device=device)
    if config.noise_alpha > 0 and max_turn_id >= 0:
        generator = make_noise_generator(config.noise_seed, global_step, device)
        noise_flipped = _draw_turn_flips(batch_size, num_turns, config.noise_alpha, generator) & (z != 0)
        z = torch.where(noise_flipped, -z, z)
    pos_turn, neg_turn = z > 0, z < 0

    # 3. Normalisation: the bonus per response token of each turn, (bs, num_turns) float32.
    fallback_rows = torch.zeros(batch_size, dtype=torch.bool, device=device)
    if config.mode in TURN_LEVEL_MODES:
        if config.mode == "step_abs_sum" and config.fallbacks:
            bonus_pos, bonus_neg, fallback_rows = _step_abs_sum_fallbacks(pos_turn, neg_turn, turn_exists, turn_role)
        else:
            bonus_pos, bonus_neg = pos_turn, neg_turn
        if config.neg_cap != "none":
            bonus_neg = _cap_negative_turns(bonus_pos, bonus_neg, keep_first=config.neg_cap == "prefix")
        per_token = _turn_level_values(config, bonus_pos, bonus_neg, turn_tokens)
    else:
        per_token = _token_level_values(config, pos_turn, neg_turn, turn_tokens)
    per_token = per_token + 0.0  # -0.0 (from lam = 0) becomes +0.0: a zero bonus is exactly +0.0

    # 4. Spread onto tokens; column 0 (off-turn and masked tokens) reads 0.
    table = torch.cat([torch.zeros_like(per_token[:, :1]), per_token], dim=1)
    bonus = table.gather(1, index)

    if counted_rows is not None:
        keep = torch.as_tensor(counted_rows, dtype=torch.bool, device=device)
        tables = (pos_turn, neg_turn, raw_z, turn_channel, turn_tokens, per_token, noise_flipped, fallback_rows)
        pos_turn, neg_turn, raw_z, turn_channel, turn_tokens, per_token, noise_flipped, fallback_rows = (
            table[keep] for table in tables
        )
    metrics = _metrics(
        config, pos_turn, neg_turn, raw_z, turn_channel, turn_tokens, per_token, noise_flipped, fallback_rows
    )
    return bonus, metrics


def _check_shapes(critique: torch.Tensor, *others: torch.Tensor) -> None:
    if critique.dim() != 2:
        raise ValueError(f"AREW inputs must be (bs, response_length), got shape {tuple(critique.shape)}")
    names = ("channel", "turn_ids", "fallback_role", "response_mask")
    for name, tensor in zip(names, others, strict=True):
        if tensor.shape != critique.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, critique has {tuple(critique.shape)}")


def _collect_turns(
    critique: torch.Tensor,
    channel: torch.Tensor,
    turn_ids: torch.Tensor,
    fallback_role: torch.Tensor,
    response_mask: torch.Tensor,
    num_turns: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-turn labels and response-token counts, with the token -> table-column index.

    Returns:
        ``index`` (bs, L) int64: the table column of each token, ``turn_id + 1``, or 0 (a sink column) for
        off-turn tokens and tokens with response_mask 0. Routing masked tokens to the sink, instead of
        masking the result, lets the final gather write exactly 0 there without another full-size pass.
        ``turn_code`` (bs, num_turns) int8: the packed label of each turn's response tokens.
        ``turn_tokens`` (bs, num_turns) int32: number of response tokens of each turn (0 = no such turn).
    """
    shape = critique.shape
    index = turn_ids.long() + 1
    masked_out = ~response_mask if response_mask.dtype == torch.bool else response_mask == 0
    index.masked_fill_(masked_out, 0)
    label_code = channel.to(torch.int8, copy=True).mul_(_CHANNEL_STRIDE).add_(critique.to(torch.int8)).add_(1)
    # copy=True: an int8 input would otherwise be scaled in place, corrupting the caller's tensor.
    label_code.add_(fallback_role.to(torch.int8, copy=True).mul_(_FALLBACK_STRIDE))
    # Every response token of a turn carries the same code, so whichever duplicate scatter_ keeps is right.
    turn_code = torch.zeros(shape[0], num_turns + 1, dtype=torch.int8, device=critique.device)
    turn_code = turn_code.scatter_(1, index, label_code)[:, 1:]
    ones = torch.ones((), dtype=torch.int32, device=critique.device).expand(shape)  # stride 0: no allocation
    turn_tokens = torch.zeros(shape[0], num_turns + 1, dtype=torch.int32, device=critique.device)
    turn_tokens = turn_tokens.scatter_add_(1, index, ones)[:, 1:]
    return index, turn_code, turn_tokens


def _token_level_values(
    config: ArewConfig, pos_turn: torch.Tensor, neg_turn: torch.Tensor, turn_tokens: torch.Tensor
) -> torch.Tensor:
    """Per-token bonus of each turn for the token-level modes (S+ / S- = +1 / -1 response tokens)."""
    lam = float(config.lam)
    s_pos, s_neg = (turn_tokens * pos_turn).sum(1), (turn_tokens * neg_turn).sum(1)
    row_on, s_pos, s_neg = _gate_rows(s_pos, s_neg, config.one_sided)
    if config.mode == "minority_fixed":
        # Minority class: lam per token; majority: lam * minority / majority, so the sum is 0.
        pos_value = lam * (s_neg / s_pos).clamp(max=1.0)
        neg_value = -lam * (s_pos / s_neg).clamp(max=1.0)
    elif config.mode == "fixed_pos":
        pos_value, neg_value = torch.full_like(s_pos, lam), -lam * s_pos / s_neg
    elif config.mode == "fixed_neg":
        pos_value, neg_value = lam * s_neg / s_pos, torch.full_like(s_neg, -lam)
    else:  # abs_sum
        pos_value, neg_value = lam / (2 * s_pos), -lam / (2 * s_neg)
    per_token = torch.where(pos_turn, pos_value[:, None], torch.where(neg_turn, neg_value[:, None], 0.0))
    return torch.where(row_on[:, None], per_token, 0.0)


def _turn_level_values(
    config: ArewConfig, pos_turn: torch.Tensor, neg_turn: torch.Tensor, turn_tokens: torch.Tensor
) -> torch.Tensor:
    """Per-token bonus of each turn for the turn-level modes: a turn's share spread over its tokens."""
    lam = float(config.lam)
    row_on, pos_n, neg_n = _gate_rows(pos_turn.sum(1), neg_turn.sum(1), config.one_sided)
    # step_abs_sum's lambda is twice the paper's: each side of a trajectory carries lam/2.
    side_budget = lam if config.mode == "turn" else lam / 2
    per_turn = torch.where(
        pos_turn, (side_budget / pos_n)[:, None], torch.where(neg_turn, (-side_budget / neg_n)[:, None], 0.0)
    )
    return torch.where(row_on[:, None], per_turn / turn_tokens.clamp(min=1), 0.0)


_METRIC_NAMES = (
    "pos_turns neg_turns pos_tokens neg_tokens frac_traj_both frac_traj_only_pos frac_traj_only_neg "
    "frac_traj_no_critique_signal frac_traj_fallback as_pos as_neg bt_pos bt_neg "
    "bonus_abs_mean bonus_sum_abs_max noise_flipped"
).split()


def _metrics(
    config: ArewConfig,
    pos_turn: torch.Tensor,
    neg_turn: torch.Tensor,
    raw_z: torch.Tensor,
    turn_channel: torch.Tensor,
    turn_tokens: torch.Tensor,
    per_token: torch.Tensor,
    noise_flipped: torch.Tensor,
    fallback_rows: torch.Tensor,
) -> dict[str, float]:
    """``arew/*`` metrics from the (bs, num_turns) tables: a few small reductions, one host transfer."""
    batch_size = pos_turn.shape[0]
    pos_turn_count, neg_turn_count = pos_turn.sum(1), neg_turn.sum(1)
    has_pos, has_neg = pos_turn_count > 0, neg_turn_count > 0
    raw_pos, raw_neg = raw_z > 0, raw_z < 0
    is_as, is_bt = turn_channel == CHANNEL_AS, turn_channel == CHANNEL_BT
    per_row = torch.stack(
        [
            pos_turn_count,
            neg_turn_count,
            (turn_tokens * pos_turn).sum(1),
            (turn_tokens * neg_turn).sum(1),
            has_pos & has_neg,
            has_pos & ~has_neg,
            ~has_pos & has_neg,
            ~has_pos & ~has_neg,
            fallback_rows,
            (raw_pos & is_as).sum(1),
            (raw_neg & is_as).sum(1),
            (raw_pos & is_bt).sum(1),
            (raw_neg & is_bt).sum(1),
        ]
    ).to(torch.float64)
    row_bonus = per_token.double() * turn_tokens  # (bs, num_turns): each turn's total bonus
    totals = torch.stack(
        [
            row_bonus.abs().sum() / turn_tokens.sum().clamp(min=1),
            row_bonus.sum(1).abs().amax() if batch_size else row_bonus.sum(),
            noise_flipped.sum().double(),
        ]
    )
    values = torch.cat([per_row.sum(1) / max(batch_size, 1), totals]).tolist()
    metrics = {"arew/active": 1.0, "arew/lam": float(config.lam)}
    metrics.update({f"arew/{name}": value for name, value in zip(_METRIC_NAMES, values, strict=True)})
    return metrics


def _gate_rows(
    pos_count: torch.Tensor, neg_count: torch.Tensor, one_sided: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which rows get a bonus, and the float32 counts to divide by (never 0).

    ``zero``: only rows with both signs. ``clamp``: every row with a critique, the empty side's count
    clamped to 1 (so the nonempty side keeps its bonus and the row is not zero-sum).
    """
    has_pos, has_neg = pos_count > 0, neg_count > 0
    row_on = (has_pos & has_neg) if one_sided == "zero" else (has_pos | has_neg)
    return row_on, pos_count.clamp(min=1).to(torch.float32), neg_count.clamp(min=1).to(torch.float32)


def _step_abs_sum_fallbacks(
    pos_turn: torch.Tensor,
    neg_turn: torch.Tensor,
    turn_exists: torch.Tensor,
    turn_role: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Promote zero turns of one-sided trajectories.

    Candidates are the zero turns other than the trajectory's final turn (usually the answer turn, whose
    0 says nothing about information gathering) and other than the ``EXEMPT`` ones (0 through no fault of
    the agent, e.g. the simulated user failed). No positive turn but some negative: the ``ELIGIBLE``
    candidates become positive. No negative turn but some positive: every candidate becomes negative.
    Both fallbacks leave the final turn alone, as the authors' code does (its ``neutral_mask`` drops the
    final step before either fallback picks from it).

    Args:
        pos_turn, neg_turn, turn_exists: (bs, num_turns) bool.
        turn_role: (bs, num_turns) integer :class:`~verl_selflock.contracts.critique.FallbackRole` of each turn.

    Returns:
        The new (pos_turn, neg_turn), (bs, num_turns) bool, and the (bs,) bool rows that changed.
    """
    pos_count, neg_count = pos_turn.sum(1), neg_turn.sum(1)
    zero_turn = turn_exists & ~pos_turn & ~neg_turn
    turn_index = torch.arange(pos_turn.shape[1], device=pos_turn.device)
    final_turn = torch.where(turn_exists, turn_index, -1).amax(1)
    eligible = turn_role == FallbackRole.ELIGIBLE
    exempt = turn_role == FallbackRole.EXEMPT
    candidate = zero_turn & ~exempt & (turn_index != final_turn[:, None])
    promote_pos = candidate & eligible & ((pos_count == 0) & (neg_count > 0))[:, None]
    promote_neg = candidate & ((neg_count == 0) & (pos_count > 0))[:, None]
    changed = (promote_pos | promote_neg).any(1)
    return pos_turn | promote_pos, neg_turn | promote_neg, changed


def _cap_negative_turns(pos_turn: torch.Tensor, neg_turn: torch.Tensor, keep_first: bool) -> torch.Tensor:
    """Where a row has more negative than positive turns, keep its first / last |P| negative turns.

    Args:
        pos_turn: (bs, num_turns) bool.
        neg_turn: (bs, num_turns) bool.
        keep_first: True keeps the first |P| (``prefix``), False the last |P| (``suffix``).

    Returns:
        (bs, num_turns) bool, the negative turns kept. Rows with |N| <= |P| are unchanged.
    """
    pos_count = pos_turn.sum(1, keepdim=True)
    neg_count = neg_turn.sum(1, keepdim=True)
    rank = neg_turn.cumsum(1)  # 1-based position of each negative turn among the row's negatives
    keep = rank <= pos_count if keep_first else rank > neg_count - pos_count
    return neg_turn & keep
