"""The AREW bonus: hand-computed cases, invariants, and the vectorised code against a slow reference."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_selflock.algorithms.arew import apply_critique_noise, compute_arew_bonus, make_noise_generator
from verl_selflock.algorithms.arew_config import MODES, TOKEN_LEVEL_MODES, TURN_LEVEL_MODES, ArewConfig
from verl_selflock.algorithms.critique_batch import CritiqueBatch, collate_critiques
from verl_selflock.contracts.critique import (
    CHANNEL_AS,
    CHANNEL_BT,
    CHANNEL_NONE,
    FallbackRole,
    ResponseLayout,
    TurnLabel,
    iter_turn_labels,
)

AS, BT, NONE = CHANNEL_AS, CHANNEL_BT, CHANNEL_NONE


# ---------------------------------------------------------------------------------------------------
# Building batches through the real protocol (ResponseLayout -> extra_fields -> collate_critiques)
# ---------------------------------------------------------------------------------------------------


def build_batch(rows: list[list[tuple]], width: int) -> tuple[CritiqueBatch, torch.Tensor]:
    """rows: per row, spans ``("turn", n_tokens, critique, channel[, fallback])`` or ``("obs", n)``; ``fallback``
    is a :class:`FallbackRole` or a bool (True = ``ELIGIBLE``), ``ORDINARY`` when left out.

    Returns the collated critiques and a response_mask that is 1 exactly on turn tokens.
    """
    extra_fields = []
    for spans in rows:
        layout = ResponseLayout()
        turn = 0
        for span in spans:
            if span[0] == "obs":
                layout.add_observation_tokens(span[1])
                continue
            _, n_tokens, critique, channel, *fallback = span
            layout.add_turn_tokens(turn, n_tokens)
            layout.set_label(turn, TurnLabel(critique, channel, fallback[0] if fallback else FallbackRole.ORDINARY))
            turn += 1
        extra_fields.append(layout.as_extra_fields())
    batch = collate_critiques(extra_fields, width)
    return batch, (batch.turn_ids >= 0).to(torch.float32)


def bonus_of(batch: CritiqueBatch, mask: torch.Tensor, config: ArewConfig, step: int = 1):
    return compute_arew_bonus(
        batch.critique, batch.channel, batch.turn_ids, batch.fallback_eligible, mask, config, step
    )


def random_batch(seed: int, batch_size: int = 6, width: int = 40) -> tuple[CritiqueBatch, torch.Tensor]:
    """A ragged batch with every oddity the bonus must survive.

    Random turns (1-5 tokens, critique -1/0/+1 on AS/BT, random fallback roles, sometimes a final answer
    turn), observation spans, truncation at ``width``, right padding, response-mask holes inside turns,
    and rows without critique fields at all (turn ids -1 but response_mask 1, like another agent loop's).
    """
    rng = random.Random(seed)
    extra_fields, missing_rows = [], []
    for row in range(batch_size):
        if rng.random() < 0.1:
            extra_fields.append(None)
            missing_rows.append(row)
            continue
        layout = ResponseLayout()
        num_turns = rng.randint(0, 7)
        for turn in range(num_turns):
            layout.add_turn_tokens(turn, rng.randint(1, 5))
            if turn == num_turns - 1 and rng.random() < 0.5:
                label = TurnLabel()  # answer turn: no critique, no channel
            else:
                label = TurnLabel(rng.choice([-1, 0, 0, 1, 1]), rng.choice([AS, BT]), rng.choice(list(FallbackRole)))
            layout.set_label(turn, label)
            if turn < num_turns - 1:
                layout.add_observation_tokens(rng.randint(0, 4))
        layout.truncate(width)
        extra_fields.append(layout.as_extra_fields())
    batch = collate_critiques(extra_fields, width)
    mask = batch.turn_ids >= 0
    holes = torch.rand(batch.turn_ids.shape, generator=torch.Generator().manual_seed(seed)) < 0.1
    mask &= ~holes
    for row in missing_rows:
        mask[row, : rng.randint(0, width)] = True
    return batch, mask.to(torch.float32)


# ---------------------------------------------------------------------------------------------------
# Slow, obvious reference: one row at a time, one token at a time, the spec written out literally
# ---------------------------------------------------------------------------------------------------


def reference_bonus(batch: CritiqueBatch, mask: torch.Tensor, config: ArewConfig, step: int):
    """float64 bonus and the main metrics, computed row by row from the description in ArewConfig."""
    bs, width = batch.critique.shape
    bonus = torch.zeros(bs, width, dtype=torch.float64)
    if not (config.start_step <= step and (config.end_step == -1 or step < config.end_step)):
        return bonus, {"arew/active": 0.0, "arew/lam": config.lam}
    critique = batch.critique
    if config.noise_alpha > 0:
        critique = apply_critique_noise(
            critique, batch.turn_ids, config.noise_alpha, make_noise_generator(config.noise_seed, step)
        )
    kept = {"both": {AS, BT, NONE}, "as": {AS}, "bt": {BT}}[config.channels]
    sums = dict.fromkeys(
        "pos_turns neg_turns pos_tokens neg_tokens both only_pos only_neg none as_pos as_neg bt_pos bt_neg "
        "flipped fallback".split(),
        0.0,
    )
    for row in range(bs):
        turns: dict[int, dict] = {}
        for j in range(width):
            turn = int(batch.turn_ids[row, j])
            if turn < 0 or mask[row, j] == 0:
                continue
            if turn not in turns:
                channel = int(batch.channel[row, j])
                raw = int(batch.critique[row, j])
                z = int(critique[row, j]) if channel in kept else 0
                sums["flipped"] += int(z != 0 and channel in kept and z != raw)
                sums["as_pos"] += channel == AS and raw > 0
                sums["as_neg"] += channel == AS and raw < 0
                sums["bt_pos"] += channel == BT and raw > 0
                sums["bt_neg"] += channel == BT and raw < 0
                turns[turn] = {"z": z, "role": int(batch.fallback_eligible[row, j]), "tokens": []}
            turns[turn]["tokens"].append(j)
        positive = sorted(t for t, info in turns.items() if info["z"] > 0)
        negative = sorted(t for t, info in turns.items() if info["z"] < 0)
        s_pos = sum(len(turns[t]["tokens"]) for t in positive)
        s_neg = sum(len(turns[t]["tokens"]) for t in negative)
        sums["pos_turns"] += len(positive)
        sums["neg_turns"] += len(negative)
        sums["pos_tokens"] += s_pos
        sums["neg_tokens"] += s_neg
        key = "both" if positive and negative else "only_pos" if positive else "only_neg" if negative else "none"
        sums[key] += 1

        lam = config.lam
        values: dict[int, float] = {}  # per-token bonus of each turn
        if config.mode in TOKEN_LEVEL_MODES:
            if config.one_sided == "zero" and not (s_pos and s_neg):
                continue
            if not (s_pos or s_neg):
                continue
            s_pos, s_neg = max(s_pos, 1), max(s_neg, 1)
            if config.mode == "minority_fixed":
                if s_pos <= s_neg:  # positives are the minority
                    pos, neg = lam, -lam * s_pos / s_neg
                else:
                    pos, neg = lam * s_neg / s_pos, -lam
            elif config.mode == "fixed_pos":
                pos, neg = lam, -lam * s_pos / s_neg
            elif config.mode == "fixed_neg":
                pos, neg = lam * s_neg / s_pos, -lam
            else:
                pos, neg = lam / (2 * s_pos), -lam / (2 * s_neg)
            values.update({t: pos for t in positive})
            values.update({t: neg for t in negative})
        else:
            if config.mode == "step_abs_sum" and config.fallbacks:
                # As the authors' code: the final turn is no candidate for either fallback.
                final_turn = max(turns, default=-1)
                zero = [t for t in sorted(turns) if turns[t]["z"] == 0 and t != final_turn]
                if not positive and negative:
                    promoted = [t for t in zero if turns[t]["role"] == FallbackRole.ELIGIBLE]
                    positive = promoted
                    sums["fallback"] += bool(promoted)
                elif not negative and positive:
                    negative = [t for t in zero if turns[t]["role"] != FallbackRole.EXEMPT]
                    sums["fallback"] += bool(negative)
            if config.neg_cap != "none" and len(negative) > len(positive):
                keep = len(positive)
                negative = negative[:keep] if config.neg_cap == "prefix" else negative[len(negative) - keep :]
            if config.one_sided == "zero" and not (positive and negative):
                continue
            if not (positive or negative):
                continue
            budget = lam if config.mode == "turn" else lam / 2
            for t in positive:
                values[t] = budget / max(len(positive), 1) / len(turns[t]["tokens"])
            for t in negative:
                values[t] = -budget / max(len(negative), 1) / len(turns[t]["tokens"])
        for t, value in values.items():
            for j in turns[t]["tokens"]:
                bonus[row, j] = value

    metrics = {f"arew/{k}": v / bs for k, v in sums.items() if k not in ("both", "only_pos", "only_neg", "none")}
    metrics.update(
        {
            "arew/active": 1.0,
            "arew/lam": config.lam,
            "arew/frac_traj_both": sums["both"] / bs,
            "arew/frac_traj_only_pos": sums["only_pos"] / bs,
            "arew/frac_traj_only_neg": sums["only_neg"] / bs,
            "arew/frac_traj_no_critique_signal": sums["none"] / bs,
            "arew/noise_flipped": sums["flipped"],
            "arew/frac_traj_fallback": sums["fallback"] / bs,
            "arew/bonus_abs_mean": float(bonus.abs().sum() / max(float(((batch.turn_ids >= 0) & (mask > 0)).sum()), 1)),
            "arew/bonus_sum_abs_max": float(bonus.sum(1).abs().max()),
        }
    )
    del metrics["arew/flipped"], metrics["arew/fallback"]
    return bonus, metrics


# ---------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------

# Row 0: [t0 t0 | o | t1 t1 t1 | o | t2 | t3 | pad]  t0 = +1 (AS, 2 tok), t1 = -1 (BT, 3 tok),
#        t2 = -1 (AS, 1 tok), t3 = answer turn (0).  S+ = 2, S- = 4; |P| = 1, |N| = 2.
# Row 1: [t0 t0 t0 | o o | t1 | o | t2 t2 | t3]      t0 = +1 (3 tok), t1 = +1 (1 tok), t2 = -1 (2 tok),
#        t3 = answer.  S+ = 4, S- = 2; |P| = 2, |N| = 1.
# Row 2: [t0 t0 | o | t1 t1 | t2 | pad...]           only positives (t0 = +1, t1 = 0, t2 = answer): one-sided.
HAND_ROWS = [
    [("turn", 2, 1, AS), ("obs", 1), ("turn", 3, -1, BT), ("obs", 1), ("turn", 1, -1, AS), ("turn", 1, 0, NONE)],
    [("turn", 3, 1, AS), ("obs", 2), ("turn", 1, 1, BT), ("obs", 1), ("turn", 2, -1, AS), ("turn", 1, 0, NONE)],
    [("turn", 2, 1, AS), ("obs", 1), ("turn", 2, 0, BT), ("turn", 1, 0, NONE)],
]
LAM = 1.2
ZERO_ROW = [0.0] * 10
HAND_EXPECTED = {
    # minority gets lam, majority lam * minority / majority.
    # row 0: pos minority: +1.2; neg -1.2 * 2/4 = -0.6.   row 1: neg minority: -1.2; pos 1.2 * 2/4 = 0.6
    "minority_fixed": [
        [1.2, 1.2, 0, -0.6, -0.6, -0.6, 0, -0.6, 0, 0],
        [0.6, 0.6, 0.6, 0, 0, 0.6, 0, -1.2, -1.2, 0],
    ],
    # +lam per positive token, -lam * S+/S- per negative: row 0: -1.2 * 2/4 = -0.6; row 1: -1.2 * 4/2 = -2.4
    "fixed_pos": [
        [1.2, 1.2, 0, -0.6, -0.6, -0.6, 0, -0.6, 0, 0],
        [1.2, 1.2, 1.2, 0, 0, 1.2, 0, -2.4, -2.4, 0],
    ],
    # -lam per negative token, +lam * S-/S+ per positive: row 0: 1.2 * 4/2 = 2.4; row 1: 1.2 * 2/4 = 0.6
    "fixed_neg": [
        [2.4, 2.4, 0, -1.2, -1.2, -1.2, 0, -1.2, 0, 0],
        [0.6, 0.6, 0.6, 0, 0, 0.6, 0, -1.2, -1.2, 0],
    ],
    # +lam/(2 S+), -lam/(2 S-): row 0: 1.2/4 = 0.3, -1.2/8 = -0.15; row 1: 1.2/8 = 0.15, -1.2/4 = -0.3
    "abs_sum": [
        [0.3, 0.3, 0, -0.15, -0.15, -0.15, 0, -0.15, 0, 0],
        [0.15, 0.15, 0.15, 0, 0, 0.15, 0, -0.3, -0.3, 0],
    ],
    # per turn +lam/|P| or -lam/|N|, spread over the turn's tokens.
    # row 0: t0 +1.2/1 over 2 tok = 0.6; t1 -1.2/2 over 3 tok = -0.2; t2 -0.6 over 1 tok = -0.6
    # row 1: t0 +1.2/2 over 3 tok = 0.2; t1 +0.6 over 1 tok = 0.6; t2 -1.2/1 over 2 tok = -0.6
    "turn": [
        [0.6, 0.6, 0, -0.2, -0.2, -0.2, 0, -0.6, 0, 0],
        [0.2, 0.2, 0.2, 0, 0, 0.6, 0, -0.6, -0.6, 0],
    ],
    # the turn form with lam/2 on each side: half of "turn"
    "step_abs_sum": [
        [0.3, 0.3, 0, -0.1, -0.1, -0.1, 0, -0.3, 0, 0],
        [0.1, 0.1, 0.1, 0, 0, 0.3, 0, -0.3, -0.3, 0],
    ],
}


@pytest.mark.parametrize("mode", MODES)
def test_hand_computed_example(mode):
    batch, mask = build_batch(HAND_ROWS, width=10)
    config = ArewConfig(lam=LAM, mode=mode, fallbacks=False)
    bonus, metrics = bonus_of(batch, mask, config)
    expected = torch.tensor(HAND_EXPECTED[mode] + [ZERO_ROW])  # row 2 is one-sided: no bonus
    torch.testing.assert_close(bonus, expected, rtol=1e-6, atol=1e-6)
    assert bonus.dtype == torch.float32
    assert metrics["arew/pos_turns"] == pytest.approx((1 + 2 + 1) / 3)
    assert metrics["arew/neg_turns"] == pytest.approx((2 + 1 + 0) / 3)
    assert metrics["arew/pos_tokens"] == pytest.approx((2 + 4 + 2) / 3)
    assert metrics["arew/neg_tokens"] == pytest.approx((4 + 2 + 0) / 3)
    assert metrics["arew/frac_traj_both"] == pytest.approx(2 / 3)
    assert metrics["arew/frac_traj_only_pos"] == pytest.approx(1 / 3)
    # AS turns: row 0 t0 (+), t2 (-); row 1 t0 (+), t2 (-); row 2 t0 (+). BT: row 0 t1 (-), row 1 t1 (+).
    assert (metrics["arew/as_pos"], metrics["arew/as_neg"]) == pytest.approx((3 / 3, 2 / 3))
    assert (metrics["arew/bt_pos"], metrics["arew/bt_neg"]) == pytest.approx((1 / 3, 1 / 3))
    assert metrics["arew/bonus_sum_abs_max"] < 1e-6
    assert metrics["arew/bonus_abs_mean"] == pytest.approx(float(expected.abs().sum() / mask.sum()), rel=1e-6)


def test_step_abs_sum_is_turn_with_twice_the_lambda():
    batch, mask = random_batch(seed=3, batch_size=8)
    paper, _ = bonus_of(batch, mask, ArewConfig(lam=0.5, mode="turn"))
    code, _ = bonus_of(batch, mask, ArewConfig(lam=1.0, mode="step_abs_sum", fallbacks=False))
    torch.testing.assert_close(code, paper)


# ---------------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(MODES),
    neg_cap=st.sampled_from(["none", "prefix", "suffix"]),
    fallbacks=st.booleans(),
    lam=st.sampled_from([0.2, 1.0, 50.0]),
)
def test_every_trajectory_sums_to_zero(seed, mode, neg_cap, fallbacks, lam):
    batch, mask = random_batch(seed, batch_size=8)
    neg_cap = neg_cap if mode in TURN_LEVEL_MODES else "none"
    config = ArewConfig(lam=lam, mode=mode, neg_cap=neg_cap, fallbacks=fallbacks)
    bonus, metrics = bonus_of(batch, mask, config)
    row_sums = bonus.double().sum(1)
    assert row_sums.abs().max() <= 1e-5 * lam
    assert metrics["arew/bonus_sum_abs_max"] <= 1e-5 * lam


@pytest.mark.parametrize("mode", MODES)
def test_zero_lambda_leaves_advantages_bit_identical(mode):
    batch, mask = random_batch(seed=11, batch_size=16)
    bonus, metrics = bonus_of(batch, mask, ArewConfig(lam=0.0, mode=mode))
    assert torch.equal(bonus, torch.zeros_like(bonus))
    assert not torch.signbit(bonus).any()  # no -0.0 either
    advantages = torch.randn(bonus.shape)
    assert torch.equal(advantages + mask * bonus, advantages)
    assert metrics["arew/active"] == 1.0 and metrics["arew/bonus_abs_mean"] == 0.0


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["minority_fixed", "turn"])
def test_masked_tokens_get_exactly_zero(mask_dtype, mode):
    batch, mask = random_batch(seed=5, batch_size=16)
    bonus, _ = bonus_of(batch, mask.to(mask_dtype), ArewConfig(lam=1.0, mode=mode))
    masked = mask == 0
    assert masked.any() and (bonus[~masked] != 0).any()
    assert torch.equal(bonus[masked], torch.zeros(int(masked.sum())))
    assert not torch.signbit(bonus[masked]).any()
    reference, _ = bonus_of(batch, mask, ArewConfig(lam=1.0, mode=mode))
    assert torch.equal(bonus, reference)


def test_rows_without_critique_fields_get_nothing():
    batch, _ = build_batch([[("turn", 2, 1, AS), ("turn", 2, -1, BT)], []], width=4)
    mask = torch.ones(2, 4)  # row 1 has response tokens but no turn ids: another agent loop's sample
    bonus, metrics = bonus_of(batch, mask, ArewConfig(lam=1.0))
    assert torch.equal(bonus[1], torch.zeros(4)) and (bonus[0] != 0).all()
    assert metrics["arew/frac_traj_no_critique_signal"] == 0.5


def test_inputs_must_share_one_shape():
    batch, mask = build_batch(HAND_ROWS, width=10)
    with pytest.raises(ValueError, match="response_mask has shape"):
        bonus_of(batch, mask[:, :5], ArewConfig())


# ---------------------------------------------------------------------------------------------------
# Critique noise
# ---------------------------------------------------------------------------------------------------


def dense_batch(batch_size: int = 200, turns: int = 10) -> CritiqueBatch:
    """Every turn has a nonzero critique, 3 tokens, and an observation token after it."""
    rng = random.Random(0)
    rows = [
        [span for _ in range(turns) for span in (("turn", 3, rng.choice([-1, 1]), AS), ("obs", 1))]
        for _ in range(batch_size)
    ]
    return build_batch(rows, width=4 * turns)[0]


def test_noise_alpha_zero_changes_nothing():
    batch = dense_batch(20)
    noisy = apply_critique_noise(batch.critique, batch.turn_ids, 0.0, make_noise_generator(0, 1))
    assert torch.equal(noisy, batch.critique)


def test_noise_alpha_one_flips_every_nonzero_critique():
    batch, _ = random_batch(seed=2, batch_size=16)
    noisy = apply_critique_noise(batch.critique, batch.turn_ids, 1.0, make_noise_generator(0, 1))
    assert torch.equal(noisy, -batch.critique) and noisy.dtype == torch.int8


def test_noise_flips_about_alpha_of_the_turns_per_turn_and_reproducibly():
    batch = dense_batch()
    alpha = 0.3
    noisy = apply_critique_noise(batch.critique, batch.turn_ids, alpha, make_noise_generator(7, 3))
    flipped = noisy != batch.critique
    # A turn's tokens flip together: every (row, turn) is all-flipped or not at all.
    turn_tokens = batch.turn_ids >= 0
    flipped_turns = torch.zeros(200, 10, dtype=torch.long).scatter_add_(
        1, batch.turn_ids.clamp(min=0), (flipped & turn_tokens).long()
    )
    assert set(flipped_turns.unique().tolist()) <= {0, 3}
    fraction = float((flipped_turns == 3).float().mean())
    assert abs(fraction - alpha) < 0.05  # 2000 turns: std of the fraction ~0.01
    again = apply_critique_noise(batch.critique, batch.turn_ids, alpha, make_noise_generator(7, 3))
    assert torch.equal(noisy, again)
    other_step = apply_critique_noise(batch.critique, batch.turn_ids, alpha, make_noise_generator(7, 4))
    other_seed = apply_critique_noise(batch.critique, batch.turn_ids, alpha, make_noise_generator(8, 3))
    assert not torch.equal(noisy, other_step) and not torch.equal(noisy, other_seed)


def test_bonus_noise_matches_apply_critique_noise():
    batch = dense_batch(50)
    mask = (batch.turn_ids >= 0).float()
    config = ArewConfig(lam=1.0, mode="turn", noise_alpha=0.4, noise_seed=123)
    bonus, metrics = bonus_of(batch, mask, config, step=9)
    noisy = apply_critique_noise(batch.critique, batch.turn_ids, 0.4, make_noise_generator(123, 9))
    clean_config = ArewConfig(lam=1.0, mode="turn")
    expected, _ = bonus_of(batch._replace(critique=noisy), mask, clean_config, step=9)
    assert torch.equal(bonus, expected)
    assert metrics["arew/noise_flipped"] == float((noisy != batch.critique).sum()) / 3  # 3 tokens per turn
    assert metrics["arew/noise_flipped"] > 0


# ---------------------------------------------------------------------------------------------------
# Channels, window, cap, fallbacks, one-sided trajectories
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, kept", [("as", AS), ("bt", BT)])
def test_channels_zero_the_other_channel(channels, kept):
    batch, mask = random_batch(seed=4, batch_size=16)
    bonus, _ = bonus_of(batch, mask, ArewConfig(lam=1.0, mode="minority_fixed", channels=channels))
    only_kept = batch._replace(critique=torch.where(batch.channel == kept, batch.critique, 0))
    expected, _ = bonus_of(only_kept, mask, ArewConfig(lam=1.0, mode="minority_fixed"))
    assert torch.equal(bonus, expected)
    # Hand case, row 0 of HAND_ROWS: with "bt" only t1 (-1) is left (one-sided -> 0); with "as" t0 (+1)
    # and t2 (-1) remain.
    hand, hand_mask = build_batch(HAND_ROWS[:1], width=10)
    row, _ = bonus_of(hand, hand_mask, ArewConfig(lam=1.0, channels=channels))
    # "as": t0 is 2 positive tokens, t2 1 negative: minority (neg) -1 per token, majority +1 * 1/2.
    expected_row = [0.5, 0.5, 0, 0, 0, 0, 0, -1.0, 0, 0] if channels == "as" else [0.0] * 10
    torch.testing.assert_close(row, torch.tensor([expected_row]))


@pytest.mark.parametrize(
    "start, end, step, active",
    [
        (0, -1, 0, True),
        (0, -1, 10**6, True),
        (5, 10, 4, False),
        (5, 10, 5, True),
        (5, 10, 9, True),
        (5, 10, 10, False),
        (5, -1, 4, False),
        (5, -1, 5000, True),
    ],
)
def test_active_window(start, end, step, active):
    batch, mask = build_batch(HAND_ROWS, width=10)
    bonus, metrics = bonus_of(batch, mask, ArewConfig(lam=LAM, start_step=start, end_step=end), step=step)
    if active:
        torch.testing.assert_close(bonus[:2], torch.tensor(HAND_EXPECTED["minority_fixed"]))
        assert metrics["arew/active"] == 1.0
    else:
        assert torch.equal(bonus, torch.zeros(3, 10)) and bonus.dtype == torch.float32
        assert metrics == {"arew/active": 0.0, "arew/lam": LAM}


# One token per turn: t0 = -1, t1 = +1, t2 = -1, t3 = -1 (|P| = 1 < |N| = 3).
CAP_ROW = [("turn", 1, -1, AS), ("turn", 1, 1, BT), ("turn", 1, -1, AS), ("turn", 1, -1, BT)]


@pytest.mark.parametrize(
    "neg_cap, expected",
    [
        ("none", [-1 / 3, 1.0, -1 / 3, -1 / 3]),  # -lam/|N| on each of the three
        ("prefix", [-1.0, 1.0, 0.0, 0.0]),  # keep the first |P| = 1 negative: t0
        ("suffix", [0.0, 1.0, 0.0, -1.0]),  # keep the last one: t3
    ],
)
@pytest.mark.parametrize("mode", TURN_LEVEL_MODES)
def test_negative_cap(neg_cap, expected, mode):
    batch, mask = build_batch([CAP_ROW, CAP_ROW[1:3]], width=4)  # row 1: |N| = |P| = 1, never capped
    lam = 1.0 if mode == "turn" else 2.0  # same bonus in both forms
    bonus, _ = bonus_of(batch, mask, ArewConfig(lam=lam, mode=mode, neg_cap=neg_cap))
    torch.testing.assert_close(bonus, torch.tensor([expected, [1.0, -1.0, 0.0, 0.0]]))


def test_step_abs_sum_fallback_promotes_eligible_zero_turns_to_positive_except_the_final_one():
    # t0 = -1 (2 tok); t1 = 0 eligible (2 tok); t2 = 0 not eligible; t3 = 0 eligible, final turn (1 tok).
    row = [("turn", 2, -1, AS), ("turn", 2, 0, BT, True), ("turn", 1, 0, AS, False), ("turn", 1, 0, BT, True)]
    batch, mask = build_batch([row], width=6)
    bonus, metrics = bonus_of(batch, mask, ArewConfig(lam=2.0, mode="step_abs_sum"))
    # lam/2 = 1 per side. P = {t1} (t3 is final: never promoted): +1 over 2 tok. N = {t0}: -1 over 2 tok.
    torch.testing.assert_close(bonus, torch.tensor([[-0.5, -0.5, 0.5, 0.5, 0.0, 0.0]]))
    assert metrics["arew/frac_traj_fallback"] == 1.0
    assert metrics["arew/frac_traj_only_neg"] == 1.0  # the metrics describe the critiques, pre-fallback


def test_step_abs_sum_fallback_demotes_zero_turns_except_the_final_one():
    # t0 = +1 (1 tok); t1 = 0 (2 tok); t2 = 0 (1 tok); t3 = answer turn (0, final, 1 tok).
    row = [("turn", 1, 1, AS), ("obs", 1), ("turn", 2, 0, BT), ("turn", 1, 0, AS), ("turn", 1, 0, NONE)]
    batch, mask = build_batch([row], width=6)
    bonus, _ = bonus_of(batch, mask, ArewConfig(lam=2.0, mode="step_abs_sum"))
    # P = {t0}: +1. N = {t1, t2}: -1/2 each -> t1 -0.25 per token, t2 -0.5. t3 stays 0.
    torch.testing.assert_close(bonus, torch.tensor([[1.0, 0.0, -0.25, -0.25, -0.5, 0.0]]))


@pytest.mark.parametrize(
    "row",
    [
        [("turn", 1, 1, AS), ("turn", 1, 0, NONE)],  # the only zero turn is the final one
        [("turn", 1, -1, AS), ("turn", 1, 0, BT, False)],  # no eligible zero turn
        # negatives only, and the only zero turn is the final one, eligible (tau2 warm-up role): the
        # authors' code never promotes the final turn, so the row stays one-sided and gets nothing
        [("turn", 1, -1, AS), ("turn", 1, 0, AS, True)],
    ],
)
def test_step_abs_sum_fallback_needs_a_candidate(row):
    batch, mask = build_batch([row], width=2)
    bonus, metrics = bonus_of(batch, mask, ArewConfig(lam=1.0, mode="step_abs_sum"))
    assert torch.equal(bonus, torch.zeros(1, 2)) and metrics["arew/frac_traj_fallback"] == 0.0


def test_step_abs_sum_never_promotes_the_final_turn_of_a_negative_only_trajectory():
    # Row 0: t0 = -1 (2 tok), obs, t1 = 0 eligible and final (2 tok): the final turn is the only zero turn,
    # so there is no positive candidate and the row gets no bonus (before the fix t1 got +lam/2).
    # Row 1: t0 = -1 (1 tok), t1 = 0 eligible (1 tok), obs, t2 = 0 eligible and final (2 tok): only t1 is
    # promoted. lam = 2: each side carries 1.
    rows = [
        [("turn", 2, -1, AS), ("obs", 1), ("turn", 2, 0, AS, True)],
        [("turn", 1, -1, AS), ("turn", 1, 0, AS, True), ("obs", 1), ("turn", 2, 0, BT, True)],
    ]
    batch, mask = build_batch(rows, width=6)
    bonus, metrics = bonus_of(batch, mask, ArewConfig(lam=2.0, mode="step_abs_sum"))
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(bonus, expected)
    assert metrics["arew/frac_traj_fallback"] == 0.5
    # With one_sided=clamp row 0 keeps its one-sided negative bonus, and still no positive on its final turn.
    bonus, _ = bonus_of(batch, mask, ArewConfig(lam=2.0, mode="step_abs_sum", one_sided="clamp"))
    torch.testing.assert_close(bonus[0], torch.tensor([-0.5, -0.5, 0.0, 0.0, 0.0, 0.0]))


EXEMPT, ELIGIBLE, ORDINARY = FallbackRole.EXEMPT, FallbackRole.ELIGIBLE, FallbackRole.ORDINARY


def test_step_abs_sum_fallbacks_never_promote_exempt_turns():
    # Row 0, positives only: t0 = +1 (1 tok); t1 = 0 EXEMPT (2 tok: the simulated user failed); t2 = 0
    # ordinary (1 tok); t3 = final turn (1 tok). Only t2 becomes negative.
    # Row 1, negatives only: t0 = -1 (2 tok); t1 = 0 EXEMPT (1 tok); t2 = 0 ELIGIBLE (1 tok); t3 = final turn
    # (1 tok). Only t2 becomes positive.
    rows = [
        [("turn", 1, 1, AS), ("turn", 2, 0, AS, EXEMPT), ("turn", 1, 0, AS, ORDINARY), ("turn", 1, 0, NONE)],
        [("turn", 2, -1, AS), ("turn", 1, 0, AS, EXEMPT), ("turn", 1, 0, AS, ELIGIBLE), ("turn", 1, 0, NONE)],
    ]
    batch, mask = build_batch(rows, width=5)
    bonus, metrics = bonus_of(batch, mask, ArewConfig(lam=2.0, mode="step_abs_sum"))
    # lam/2 = 1 per side. Row 0: P = {t0} +1, N = {t2} -1. Row 1: P = {t2} +1, N = {t0} -1 over 2 tokens.
    expected = torch.tensor([[1.0, 0.0, 0.0, -1.0, 0.0], [-0.5, -0.5, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(bonus, expected)
    assert metrics["arew/frac_traj_fallback"] == 1.0


@pytest.mark.parametrize(
    "row",
    [
        [("turn", 1, 1, AS), ("turn", 1, 0, AS, EXEMPT), ("turn", 1, 0, NONE)],  # the only demotable turn is exempt
        [("turn", 1, -1, AS), ("turn", 1, 0, AS, EXEMPT)],  # the only zero turn is exempt
    ],
)
def test_a_trajectory_whose_only_candidates_are_exempt_gets_no_bonus(row):
    batch, mask = build_batch([row], width=3)
    bonus, metrics = bonus_of(batch, mask, ArewConfig(lam=2.0, mode="step_abs_sum"))
    assert torch.equal(bonus, torch.zeros(1, 3)) and metrics["arew/frac_traj_fallback"] == 0.0


def test_old_samples_with_0_1_flags_and_bool_tensors_read_as_before():
    # A sample written before the EXEMPT role: fallback_eligible holds 0/1 flags.
    fields = {
        "critique": [-1, -1, 0, 0, 0],
        "critique_channel": [AS, AS, 0, AS, AS],
        "turn_ids": [0, 0, -1, 1, 2],
        "fallback_eligible": [0, 0, 0, 1, 0],
    }
    batch = collate_critiques([fields], 5)
    assert batch.fallback_eligible.tolist() == [[0, 0, 0, 1, 0]]
    mask = (batch.turn_ids >= 0).float()
    config = ArewConfig(lam=2.0, mode="step_abs_sum")
    inputs = [t.clone() for t in batch[:4]]
    from_roles, _ = bonus_of(batch, mask, config)
    assert all(torch.equal(t, before) for t, before in zip(batch[:4], inputs, strict=True))  # inputs untouched
    # P = {t1} (eligible): +1; N = {t0}: -1 over 2 tokens; t2 (ordinary) is not promoted to positive.
    torch.testing.assert_close(from_roles, torch.tensor([[-0.5, -0.5, 0.0, 1.0, 0.0]]))
    as_bool = batch.fallback_eligible.bool()
    from_bool, _ = compute_arew_bonus(batch.critique, batch.channel, batch.turn_ids, as_bool, mask, config, 1)
    assert torch.equal(from_bool, from_roles)


def test_fallback_role_round_trips_through_the_protocol():
    layout = ResponseLayout()
    for turn, role in enumerate([ORDINARY, ELIGIBLE, EXEMPT]):
        layout.add_turn_tokens(turn, 2)
        layout.set_label(turn, TurnLabel(0, AS, role))
        layout.add_observation_tokens(1)
    fields = layout.as_extra_fields()
    assert fields["fallback_eligible"] == [0, 0, 0, 1, 1, 0, 2, 2, 0]
    labels = dict(iter_turn_labels(fields))
    assert [labels[t].fallback for t in range(3)] == [ORDINARY, ELIGIBLE, EXEMPT]
    assert [labels[t].fallback_eligible for t in range(3)] == [False, True, False]
    assert TurnLabel(0, AS, True).fallback is ELIGIBLE and TurnLabel(0, AS, False).fallback is ORDINARY
    with pytest.raises(ValueError, match="fallback must be one of"):
        TurnLabel(0, AS, 3)


@pytest.mark.parametrize("config", [dict(mode="step_abs_sum", fallbacks=False), dict(mode="turn")])
def test_fallbacks_off_or_other_mode(config):
    row = [("turn", 2, -1, AS), ("turn", 2, 0, BT, True), ("turn", 1, 1, AS), ("turn", 1, 0, NONE)]
    one_sided = [("turn", 1, 1, AS), ("turn", 2, 0, BT, True), ("turn", 1, 0, NONE)]
    batch, mask = build_batch([row, one_sided], width=6)
    bonus, metrics = bonus_of(batch, mask, ArewConfig(lam=1.0, **config))
    assert torch.equal(bonus[1], torch.zeros(6)) and metrics["arew/frac_traj_fallback"] == 0.0
    assert bonus[0].abs().sum() > 0


def test_one_sided_clamp_keeps_the_bonus_and_is_not_zero_sum():
    # Row 0: two positive turns (3 and 1 tokens), nothing negative. Row 1: one negative turn of 2 tokens.
    rows = [[("turn", 3, 1, AS), ("obs", 1), ("turn", 1, 1, BT)], [("turn", 2, -1, AS)]]
    batch, mask = build_batch(rows, width=5)
    zero, _ = bonus_of(batch, mask, ArewConfig(lam=1.0, mode="turn"))
    assert torch.equal(zero, torch.zeros(2, 5))
    clamped, metrics = bonus_of(batch, mask, ArewConfig(lam=1.0, mode="turn", one_sided="clamp"))
    # |N| clamped to 1 but unused; |P| = 2: each positive turn +1/2 -> 1/6 per token on t0, 1/2 on t1.
    # Row 1: |N| = 1: -1 over 2 tokens.
    torch.testing.assert_close(clamped, torch.tensor([[1 / 6] * 3 + [0.0, 0.5], [-0.5, -0.5, 0, 0, 0]]))
    assert metrics["arew/bonus_sum_abs_max"] == pytest.approx(1.0)
    token_level, _ = bonus_of(batch, mask, ArewConfig(lam=1.0, mode="minority_fixed", one_sided="clamp"))
    # S+ = 4, S- clamped to 1: the positives are the majority: +1 * 1/4 per token. Row 1: S- = 2, S+ -> 1: -1/2.
    torch.testing.assert_close(token_level, torch.tensor([[0.25] * 3 + [0.0, 0.25], [-0.5, -0.5, 0, 0, 0]]))


# ---------------------------------------------------------------------------------------------------
# Vectorised == slow reference on random batches
# ---------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 100_000),
    mode=st.sampled_from(MODES),
    channels=st.sampled_from(["both", "as", "bt"]),
    neg_cap=st.sampled_from(["none", "prefix", "suffix"]),
    fallbacks=st.booleans(),
    one_sided=st.sampled_from(["zero", "clamp"]),
    noise_alpha=st.sampled_from([0.0, 0.0, 0.3, 1.0]),
    lam=st.sampled_from([0.0, 0.2, 1.0, 3.7]),
    step=st.integers(0, 20),
)
def test_matches_slow_reference(seed, mode, channels, neg_cap, fallbacks, one_sided, noise_alpha, lam, step):
    batch, mask = random_batch(seed)
    config = ArewConfig(
        lam=lam,
        mode=mode,
        channels=channels,
        neg_cap=neg_cap if mode in TURN_LEVEL_MODES else "none",
        fallbacks=fallbacks,
        one_sided=one_sided,
        noise_alpha=noise_alpha,
        noise_seed=seed % 7,
        start_step=2,
    )
    bonus, metrics = bonus_of(batch, mask, config, step)
    expected, expected_metrics = reference_bonus(batch, mask, config, step)
    torch.testing.assert_close(bonus.double(), expected, rtol=1e-5, atol=1e-6)
    assert metrics.keys() == expected_metrics.keys()
    for name, value in expected_metrics.items():
        # The float32 bonus sums to 0 only up to rounding; the float64 reference exactly.
        tolerance = 1e-5 * max(lam, 1.0) if name == "arew/bonus_sum_abs_max" else 1e-6
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=tolerance), name


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


def test_config_defaults_and_mappings():
    assert ArewConfig.from_mapping(None) == ArewConfig() == ArewConfig.from_mapping({})
    default = ArewConfig()
    assert (default.lam, default.mode, default.base, default.channels) == (0.2, "minority_fixed", "gae", "both")
    assert (default.start_step, default.end_step, default.noise_alpha, default.neg_cap) == (0, -1, 0.0, "none")
    assert default.fallbacks is True and default.one_sided == "zero"
    from omegaconf import OmegaConf

    node = OmegaConf.create({"lam": 1.0, "mode": "step_abs_sum", "neg_cap": "suffix", "end_step": 100})
    config = ArewConfig.from_mapping(node)
    assert (config.lam, config.mode, config.neg_cap, config.end_step) == (1.0, "step_abs_sum", "suffix", 100)
    assert isinstance(ArewConfig.from_mapping({"lam": 1}).lam, float)
    with pytest.raises(Exception):
        config.lam = 2.0  # frozen
    with pytest.raises(ValueError, match=re.escape("algorithm.arew must be a mapping of settings, got list")):
        ArewConfig.from_mapping(["lam"])


BAD_VALUES = [
    ("lam", -1, "algorithm.arew.lam must be a finite number >= 0, got -1"),
    ("lam", math.inf, "algorithm.arew.lam must be a finite number >= 0, got inf"),
    ("lam", math.nan, "algorithm.arew.lam must be a finite number >= 0, got nan"),
    ("lam", "0.2", "algorithm.arew.lam must be a finite number >= 0, got '0.2'"),
    ("lam", True, "algorithm.arew.lam must be a finite number >= 0, got True"),
    ("mode", "paper", "algorithm.arew.mode must be one of " + str(list(MODES)) + ", got 'paper'"),
    ("channels", "all", "algorithm.arew.channels must be one of ['both', 'as', 'bt'], got 'all'"),
    ("neg_cap", "middle", "algorithm.arew.neg_cap must be one of ['none', 'prefix', 'suffix'], got 'middle'"),
    ("one_sided", "skip", "algorithm.arew.one_sided must be one of ['zero', 'clamp'], got 'skip'"),
    ("base", "", "algorithm.arew.base must be a non-empty estimator name, got ''"),
    (
        "base",
        "arew",
        (
            "algorithm.arew.base must name a base advantage estimator that the bonus is added to (e.g. one of "
            "['gae', 'grpo'], or rloo, reinforce_plus_plus, ...), not 'arew', which is one of our own estimators (arew, igpo)"
        ),
    ),
    ("base", "igpo", "not 'igpo', which is one of our own estimators (arew, igpo)"),
    ("start_step", -1, "algorithm.arew.start_step must be an integer >= 0, got -1"),
    ("start_step", 1.5, "algorithm.arew.start_step must be an integer >= 0, got 1.5"),
    ("end_step", 0, "algorithm.arew.end_step must be -1 (no end) or an integer > start_step=0, got 0"),
    ("end_step", -2, "algorithm.arew.end_step must be -1 (no end) or an integer > start_step=0, got -2"),
    ("end_step", 10.0, "algorithm.arew.end_step must be -1 (no end) or an integer > start_step=0, got 10.0"),
    ("noise_alpha", 1.5, "algorithm.arew.noise_alpha must be a number in [0, 1], got 1.5"),
    ("noise_alpha", -0.1, "algorithm.arew.noise_alpha must be a number in [0, 1], got -0.1"),
    ("noise_seed", 1.5, "algorithm.arew.noise_seed must be an integer, got 1.5"),
    ("fallbacks", "yes", "algorithm.arew.fallbacks must be true or false, got 'yes'"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_raises_the_documented_message(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ArewConfig.from_mapping({key: value})


def test_end_step_must_follow_start_step():
    with pytest.raises(ValueError, match=re.escape("integer > start_step=5, got 5")):
        ArewConfig.from_mapping({"start_step": 5, "end_step": 5})


@pytest.mark.parametrize("mode", TOKEN_LEVEL_MODES)
def test_neg_cap_only_for_turn_level_modes(mode):
    with pytest.raises(ValueError, match=re.escape("algorithm.arew.neg_cap=prefix applies to the turn-level")):
        ArewConfig(mode=mode, neg_cap="prefix")


def test_unknown_key_lists_the_known_keys():
    with pytest.raises(ValueError) as err:
        ArewConfig.from_mapping({"lamda": 0.3, "lam": 0.3})
    assert "algorithm.arew.lamda" in str(err.value)
    for known in ("lam", "mode", "base", "channels", "start_step", "end_step", "noise_alpha", "neg_cap"):
        assert f"'{known}'" in str(err.value)


def test_validate_base():
    registry = {"gae": None, "grpo": None, "rloo": None, "arew": None}
    ArewConfig(base="rloo").validate_base(registry)
    with pytest.raises(ValueError, match=re.escape("algorithm.arew.base must be one of veRL's advantage estimators")):
        ArewConfig(base="nope").validate_base(registry)
    with pytest.raises(ValueError, match=re.escape("['gae', 'grpo', 'rloo'], got 'nope'")):
        ArewConfig(base="nope").validate_base(registry)
    # veRL's real registry is checked in tests/verl_adapter/test_config_validation.py.
