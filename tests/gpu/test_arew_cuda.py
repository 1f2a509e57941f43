"""AREW's bonus on CUDA tensors equals the CPU result (the estimator runs wherever veRL's batch lives)."""

from __future__ import annotations

import random

import pytest
import torch

from verl_selflock.algorithms.arew import compute_arew_bonus
from verl_selflock.algorithms.arew_config import MODES, TURN_LEVEL_MODES, ArewConfig
from verl_selflock.algorithms.critique_batch import CritiqueBatch, collate_critiques
from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, FallbackRole, ResponseLayout, TurnLabel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


def _batch(seed: int, batch_size: int = 32, width: int = 64) -> tuple[CritiqueBatch, torch.Tensor]:
    """Random turns with critiques on both channels, observations, answer turns, holes in the mask."""
    rng = random.Random(seed)
    extra_fields = []
    for _ in range(batch_size):
        layout = ResponseLayout()
        turns = rng.randint(1, 8)
        for turn in range(turns):
            layout.add_turn_tokens(turn, rng.randint(1, 6))
            label = TurnLabel(rng.choice([-1, 0, 1, 1]), rng.choice([CHANNEL_AS, CHANNEL_BT]), rng.choice(list(FallbackRole)))
            layout.set_label(turn, TurnLabel() if turn == turns - 1 and rng.random() < 0.5 else label)
            if turn < turns - 1:
                layout.add_observation_tokens(rng.randint(0, 4))
        layout.truncate(width)
        extra_fields.append(layout.as_extra_fields())
    batch = collate_critiques(extra_fields, width)
    holes = torch.rand(batch.turn_ids.shape, generator=torch.Generator().manual_seed(seed)) < 0.1
    return batch, ((batch.turn_ids >= 0) & ~holes).float()


def _bonus(batch: CritiqueBatch, mask: torch.Tensor, config: ArewConfig, device: str):
    on = [t.to(device) for t in (batch.critique, batch.channel, batch.turn_ids, batch.fallback_eligible, mask)]
    counted = torch.ones(mask.shape[0], dtype=torch.bool, device=device)
    return compute_arew_bonus(*on, config, 1, counted)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_bonus_on_cuda_equals_cpu(mode, seed):
    batch, mask = _batch(seed)
    neg_cap = "prefix" if mode in TURN_LEVEL_MODES else "none"
    config = ArewConfig(lam=0.3, mode=mode, neg_cap=neg_cap, one_sided="clamp")
    cpu, cpu_metrics = _bonus(batch, mask, config, "cpu")
    gpu, gpu_metrics = _bonus(batch, mask, config, "cuda")
    assert gpu.device.type == "cuda" and gpu.dtype == cpu.dtype
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    assert cpu_metrics.keys() == gpu_metrics.keys()
    for key, value in cpu_metrics.items():
        assert gpu_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_noise_on_cuda_is_reproducible():
    # The noise generator lives on the batch's device, so CUDA draws differ from CPU ones by design;
    # on one device the same step gives the same flips.
    batch, mask = _batch(3)
    config = ArewConfig(lam=0.3, noise_alpha=0.5)
    first, m1 = _bonus(batch, mask, config, "cuda")
    second, m2 = _bonus(batch, mask, config, "cuda")
    assert torch.equal(first, second) and m1["arew/noise_flipped"] == m2["arew/noise_flipped"] > 0
