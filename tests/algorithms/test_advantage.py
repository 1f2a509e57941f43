"""AREW through veRL's own advantage code and through our v1 trainer mode's advantage step."""

from __future__ import annotations

import pytest
import torch

from verl_selflock.algorithms.advantage import apply_arew_bonus
from verl_selflock.algorithms.arew import ArewConfig
from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, CHANNEL_NONE, ResponseLayout, TurnLabel

LAM = 0.2
WIDTH = 10


def _trajectory(turns: list[tuple[int, TurnLabel, int]]) -> tuple[dict, list[int]]:
    """turns: (generated tokens, label, observation tokens after it)."""
    layout, mask = ResponseLayout(), []
    for turn, (n_tokens, label, n_obs) in enumerate(turns):
        layout.add_turn_tokens(turn, n_tokens)
        layout.set_label(turn, label)
        mask += [1] * n_tokens
        layout.add_observation_tokens(n_obs)
        mask += [0] * n_obs
    return layout.as_extra_fields(), mask


def _batch():
    as_pos, bt_neg, answer = TurnLabel(1, CHANNEL_AS), TurnLabel(-1, CHANNEL_BT), TurnLabel(0, CHANNEL_NONE)
    rows = [
        # 3 positive tokens, 2 observation, 2 negative, 2 observation, 1 answer token
        _trajectory([(3, as_pos, 2), (2, bt_neg, 2), (1, answer, 0)]),
        # only a positive turn: zero-sum AREW gives it no bonus
        _trajectory([(4, as_pos, 2), (2, answer, 0)]),
        # all-zero critiques, shorter (right padding)
        _trajectory([(3, TurnLabel(0, CHANNEL_AS), 1), (2, answer, 0)]),
    ]
    extra_fields = [fields for fields, _ in rows] + [None]  # row 3: another agent loop, no critiques
    masks = [mask for _, mask in rows] + [[1] * 6]
    response_mask = torch.zeros(4, WIDTH, dtype=torch.int64)
    for i, mask in enumerate(masks):
        response_mask[i, : len(mask)] = torch.tensor(mask)
    # Expected bonus, minority_fixed: row 0 has S+ = 3, S- = 2; the minority (negative) class gets
    # -lam per token, the majority +lam * 2/3 per token: 3 * (2/15) - 2 * 0.2 = 0.
    expected_bonus = torch.zeros(4, WIDTH)
    expected_bonus[0, 0:3] = LAM * 2 / 3
    expected_bonus[0, 5:7] = -LAM
    return extra_fields, response_mask, expected_bonus


def _data_proto(response_mask: torch.Tensor):
    from verl import DataProto

    torch.manual_seed(0)
    bs, width = response_mask.shape
    lengths = response_mask.cumsum(-1).argmax(-1)  # index of the last generated token
    rewards = torch.zeros(bs, width)
    rewards[torch.arange(bs), lengths] = torch.tensor([1.0, 0.0, 1.0, 0.5])
    values = torch.randn(bs, width) * response_mask
    return DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "values": values, "response_mask": response_mask},
        non_tensors={"uid": __import__("numpy").array(["a", "b", "c", "d"], dtype=object)},
    )


def test_veRL_gae_then_arew_bonus_gives_the_expected_tensors():
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.ray_trainer import compute_advantage

    extra_fields, response_mask, expected_bonus = _batch()
    data = _data_proto(response_mask)
    algo = {"arew": {"lam": LAM, "mode": "minority_fixed", "base": "gae"}}
    data = compute_advantage(data, adv_estimator="gae", gamma=1.0, lam=1.0, config=__import__("omegaconf").OmegaConf.create(algo))
    base_adv, base_ret = core_algos.compute_gae_advantage_return(
        data.batch["token_level_rewards"], data.batch["values"], response_mask, gamma=1.0, lam=1.0
    )
    assert torch.equal(data.batch["advantages"], base_adv)

    cfg = ArewConfig.from_mapping(algo["arew"])
    advantages, metrics = apply_arew_bonus(data.batch["advantages"], response_mask, extra_fields, cfg, global_step=1)
    torch.testing.assert_close(advantages, base_adv + expected_bonus * response_mask)
    assert torch.equal(data.batch["returns"], base_ret)  # critic targets untouched
    assert metrics["arew/samples_without_critique"] == 1.0
    assert metrics["arew/active"] == 1.0
    # observation and padding tokens are exactly unchanged
    assert torch.equal(advantages[response_mask == 0], base_adv[response_mask == 0])


def test_lambda_zero_is_bit_identical():
    extra_fields, response_mask, _ = _batch()
    base = torch.randn(response_mask.shape)
    advantages, _ = apply_arew_bonus(base, response_mask, extra_fields, ArewConfig.from_mapping({"lam": 0.0}), 1)
    assert torch.equal(advantages, base)


def test_inactive_window_and_missing_fields_leave_advantages_alone():
    extra_fields, response_mask, _ = _batch()
    base = torch.randn(response_mask.shape)
    late = ArewConfig.from_mapping({"lam": LAM, "start_step": 5})
    advantages, metrics = apply_arew_bonus(base, response_mask, extra_fields, late, global_step=4)
    assert torch.equal(advantages, base) and metrics["arew/active"] == 0.0
    advantages, metrics = apply_arew_bonus(base, response_mask, [None] * 4, ArewConfig.from_mapping({"lam": LAM}), 1)
    assert torch.equal(advantages, base)
    assert metrics["arew/samples_without_critique"] == 4.0


def test_padding_rows_are_left_out_of_the_metrics():
    """veRL pads a batch to a multiple of its data-parallel size with rows that are not episodes (copies
    of real rows, or rows without critiques): they get no say in ``arew/*``, and the real rows' bonus is
    the same as without them."""
    extra_fields, response_mask, _ = _batch()
    cfg = ArewConfig.from_mapping({"lam": LAM})
    base = torch.randn(response_mask.shape)
    plain, plain_metrics = apply_arew_bonus(base, response_mask, extra_fields, cfg, global_step=1)
    padded_fields = extra_fields + [extra_fields[0], None]
    padded_mask = torch.cat([response_mask, response_mask[:1], response_mask[:1]])
    padded_base = torch.cat([base, base[:1], base[:1]])
    padding = [False] * len(extra_fields) + [True, True]
    advantages, metrics = apply_arew_bonus(padded_base, padded_mask, padded_fields, cfg, 1, is_padding=padding)
    torch.testing.assert_close(advantages[: len(extra_fields)], plain)
    assert metrics == pytest.approx(plain_metrics)
    _, unmasked = apply_arew_bonus(padded_base, padded_mask, padded_fields, cfg, 1)
    assert unmasked["arew/frac_samples_without_critique"] != plain_metrics["arew/frac_samples_without_critique"]


def test_gspo_policy_loss_accepts_arew_on_grpo_base():
    """GSPO = GRPO base + veRL's GSPO policy loss: the AREW advantages feed it like any other."""
    import numpy as np
    from verl.trainer.ppo import core_algos
    from verl.workers.config import ActorConfig

    extra_fields, response_mask, expected_bonus = _batch()
    rewards = torch.zeros(response_mask.shape)
    rewards[:, 0] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    base, _ = core_algos.compute_grpo_outcome_advantage(rewards, response_mask, np.array(["g", "g", "g", "g"], dtype=object))
    cfg = ArewConfig.from_mapping({"lam": LAM, "base": "grpo"})
    advantages, _ = apply_arew_bonus(base, response_mask, extra_fields, cfg, global_step=1)
    torch.testing.assert_close(advantages - base, expected_bonus * response_mask)

    actor_config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2)
    log_prob = torch.randn(response_mask.shape) * 0.1 - 1.0
    loss_fn = core_algos.get_policy_loss_fn("gspo")
    loss, loss_metrics = loss_fn(
        old_log_prob=log_prob.detach(), log_prob=log_prob + 0.01, advantages=advantages,
        response_mask=response_mask.float(), loss_agg_mode="seq-mean-token-mean", config=actor_config,
    )
    assert torch.isfinite(loss)
    # the bonus changes the GSPO loss (it is not averaged away)
    loss_base, _ = loss_fn(
        old_log_prob=log_prob.detach(), log_prob=log_prob + 0.01, advantages=base,
        response_mask=response_mask.float(), loss_agg_mode="seq-mean-token-mean", config=actor_config,
    )
    assert not torch.isclose(loss, loss_base)


@pytest.mark.slow
def test_selflock_trainer_mode_advantage_step_through_transfer_queue(verl_config):
    """Our trainer mode's real `_compute_advantage`, on a real TransferQueue with real Ray."""
    import numpy as np
    import ray
    import transfer_queue as tq
    from tensordict import NonTensorStack, TensorDict
    from verl.trainer.ppo import core_algos

    from verl_selflock.verl_adapter.trainer_mode import SelflockTrainer

    extra_fields, response_mask, expected_bonus = _batch()
    data = _data_proto(response_mask)
    lengths = response_mask.shape[1] - (response_mask.flip(-1).cumsum(-1) == 0).sum(-1)  # drop right padding

    def nested(t: torch.Tensor) -> torch.Tensor:
        return torch.nested.as_nested_tensor([row[:n] for row, n in zip(t, lengths.tolist())], layout=torch.jagged)

    config = verl_config(
        [
            "algorithm.adv_estimator=arew",
            "trainer.v1.trainer_mode=selflock",
            "critic.enable=True",
            f"+algorithm.arew.lam={LAM}",
            "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        ]
    )
    config.transfer_queue.enable = True
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    tq.init(config.transfer_queue)
    try:
        fields = TensorDict(
            {
                "uid": NonTensorStack(*["a", "b", "c", "d"]),
                "response_mask": nested(response_mask),
                "rm_scores": nested(data.batch["token_level_rewards"]),
                "values": nested(data.batch["values"]),
                "old_log_probs": nested(torch.full(response_mask.shape, -1.0)),
                "extra_fields": NonTensorStack(*[f if f is not None else {"other_loop": 1} for f in extra_fields]),
            },
            batch_size=4,
        )
        batch = tq.kv_batch_put(keys=[f"{u}_0_0" for u in "abcd"], partition_id="train", fields=fields)

        trainer = object.__new__(SelflockTrainer)  # only the advantage step is exercised
        trainer.config = config
        trainer.global_steps = 1
        metrics: dict = {}
        batch = trainer._compute_advantage(batch, metrics)

        out = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["advantages", "returns"])
        advantages = torch.nested.to_padded_tensor(out["advantages"], 0.0)
        returns = torch.nested.to_padded_tensor(out["returns"], 0.0)
    finally:
        tq.close()
        ray.shutdown()

    base_adv, base_ret = core_algos.compute_gae_advantage_return(
        data.batch["token_level_rewards"], data.batch["values"], response_mask, gamma=1.0, lam=1.0
    )
    # Rows come back at their own lengths (padding is not stored): compare inside each row.
    width = advantages.shape[1]
    inside = torch.arange(width)[None, :] < lengths[:, None]
    expected = (base_adv + expected_bonus * response_mask)[:, :width]
    torch.testing.assert_close(advantages[inside], expected[inside])
    torch.testing.assert_close(returns[inside], base_ret[:, :width][inside])
    assert config.algorithm.adv_estimator == "arew"  # restored after the base step
    assert metrics["arew/samples_without_critique"] == 1.0
    assert np.isclose(metrics["arew/active"], 1.0)
