"""Cost of the AREW bonus next to veRL's GAE on a realistic multi-turn batch (CPU by default).

Times veRL's ``compute_gae_advantage_return`` alone against GAE + ``compute_arew_bonus`` + the add,
plus the bonus alone; reports medians after a warm-up. The add is timed two ways: the formula as written
(``A + response_mask * bonus``) and ``A.add_(bonus)``, which gives the same numbers because the bonus is
already exactly 0 where response_mask is 0. Variants run interleaved so that load from other processes
hits them alike. On a shared machine, ``--threads 1`` gives the steadiest numbers.

    python benchmarks/bench_arew.py --batch-size 512 --response-length 8192 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from verl_selflock.algorithms.arew import compute_arew_bonus
from verl_selflock.algorithms.arew_config import MODES, ArewConfig
from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, CHANNEL_NONE


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512, help="trajectories in the batch")
    parser.add_argument("--response-length", type=int, default=8192, help="padded response width")
    parser.add_argument("--turns", type=int, default=10, help="agent turns per trajectory (last = answer turn)")
    parser.add_argument("--obs-frac", type=float, default=0.3, help="fraction of used tokens that are observations")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    parser.add_argument("--mode", choices=MODES, default="minority_fixed", help="algorithm.arew.mode")
    parser.add_argument("--noise-alpha", type=float, default=0.0, help="algorithm.arew.noise_alpha")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave as is)")
    parser.add_argument("--device", default="cpu", help="torch device of the batch")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """A padded batch laid out like ``[turn_0, obs_0, ..., turn_T-1, padding]``.

    Each row uses a random 60-100 % of the width (right padding after it); its used span is cut into
    ``turns`` agent spans and ``turns - 1`` observation spans of random lengths whose total is about
    ``obs_frac`` of the span. Turns alternate Action (AS) / Update (BT) rounds with random critiques in
    {-1, 0, +1}; the last turn is the answer turn (no channel, critique 0).
    """
    gen = torch.Generator().manual_seed(args.seed)
    bs, width, turns = args.batch_size, args.response_length, args.turns
    used = (width * (0.6 + 0.4 * torch.rand(bs, generator=gen))).long()
    # Span weights: 2*turns-1 spans alternating turn / observation, with random jitter.
    jitter = 0.5 + torch.rand(bs, 2 * turns - 1, generator=gen)
    is_obs_span = torch.arange(2 * turns - 1) % 2 == 1
    share = torch.where(is_obs_span, args.obs_frac / (turns - 1), (1 - args.obs_frac) / turns) * jitter
    share = share / share.sum(1, keepdim=True)
    ends = (share.cumsum(1) * used[:, None]).long()  # exclusive end of every span, per row
    ends[:, -1] = used
    # Span index of each token: the number of span ends at or before it (2*turns-1 = padding).
    position = torch.arange(width)
    span = torch.searchsorted(ends, position.expand(bs, width).contiguous(), right=True)
    in_turn = (span % 2 == 0) & (span < 2 * turns - 1)
    turn_ids = torch.where(in_turn, span // 2, -1)

    turn_critique = torch.randint(-1, 2, (bs, turns), generator=gen, dtype=torch.int8)
    turn_channel = torch.where(torch.arange(turns) % 2 == 0, CHANNEL_AS, CHANNEL_BT).to(torch.int8).expand(bs, turns)
    turn_critique[:, -1] = 0
    turn_channel = turn_channel.clone()
    turn_channel[:, -1] = CHANNEL_NONE
    lookup = turn_ids.clamp(min=0)
    critique = torch.where(in_turn, turn_critique.gather(1, lookup), 0).to(torch.int8)
    channel = torch.where(in_turn, turn_channel.gather(1, lookup), CHANNEL_NONE).to(torch.int8)
    fallback = in_turn & (turn_critique.gather(1, lookup) == 0)
    response_mask = in_turn.to(torch.float32)  # veRL carries the mask as a float/int tensor

    device = torch.device(args.device)
    batch = {
        "critique": critique,
        "channel": channel,
        "turn_ids": turn_ids,
        "fallback_eligible": fallback,
        "response_mask": response_mask,
        "token_level_rewards": torch.zeros(bs, width),
        "values": torch.randn(bs, width, generator=gen),
        "is_observation": (span % 2 == 1) & (span < 2 * turns - 1),  # span 2*turns-1 is the padding
    }
    last_token = (turn_ids >= 0).long().cumsum(1).argmax(1)  # outcome reward on the last generated token
    batch["token_level_rewards"][torch.arange(bs), last_token] = torch.randint(0, 2, (bs,), generator=gen).float()
    return {key: value.to(device) for key, value in batch.items()}


def time_runs(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from verl.trainer.ppo.core_algos import compute_gae_advantage_return

    batch = build_batch(args)
    device = torch.device(args.device)
    config = ArewConfig(mode=args.mode, lam=0.5, noise_alpha=args.noise_alpha)
    mask = batch["response_mask"]

    def gae() -> torch.Tensor:
        advantages, _ = compute_gae_advantage_return(
            batch["token_level_rewards"], batch["values"], mask, gamma=1.0, lam=1.0
        )
        return advantages

    def bonus() -> tuple[torch.Tensor, dict[str, float]]:
        return compute_arew_bonus(
            batch["critique"], batch["channel"], batch["turn_ids"], batch["fallback_eligible"], mask, config, 1
        )

    def gae_with_bonus_masked_add() -> torch.Tensor:
        advantages = gae()
        arew_bonus, _ = bonus()
        return advantages + mask * arew_bonus  # the formula as written: two more full-size allocations

    def gae_with_bonus_inplace_add() -> torch.Tensor:
        advantages = gae()
        arew_bonus, _ = bonus()
        return advantages.add_(arew_bonus)  # same result: the bonus is already exactly 0 off the mask

    variants = {
        "gae": gae,
        "gae+arew (add_)": gae_with_bonus_inplace_add,
        "gae+arew (A+m*b)": gae_with_bonus_masked_add,
        "arew bonus alone": bonus,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(time_runs(fn, device))

    is_observation = batch["is_observation"]
    obs_frac = float(is_observation.sum()) / float(is_observation.sum() + (mask > 0).sum())
    pad_frac = 1.0 - float(is_observation.float().mean()) - float(mask.mean())
    _, metrics = bonus()
    print(
        f"batch {args.batch_size} x {args.response_length}, {args.turns} turns/row, mode={args.mode}, "
        f"device={device}, threads={torch.get_num_threads()}, repeats={args.repeats}"
    )
    print(
        f"  observation tokens: {obs_frac:.1%} of the used span; padding: {pad_frac:.1%} of the batch; "
        f"bonus_sum_abs_max={metrics['arew/bonus_sum_abs_max']:.2e}"
    )
    for name, samples in times.items():
        spread = f"min {min(samples) * 1e3:8.1f} ms, max {max(samples) * 1e3:8.1f} ms"
        print(f"  {name:<18} median {statistics.median(samples) * 1e3:8.1f} ms  ({spread})")
    # Ratios per repeat (each variant against the GAE run just before it), then the median: steadier than a
    # ratio of medians when other processes come and go.
    print("  ratio to gae, median over repeats of the paired ratio (target for gae+arew: <= 1.10x):")
    for name in ("gae+arew (add_)", "gae+arew (A+m*b)", "arew bonus alone"):
        paired = [variant / base for variant, base in zip(times[name], times["gae"], strict=True)]
        print(f"    {name:<18} {statistics.median(paired):.3f}x")


if __name__ == "__main__":
    main()
