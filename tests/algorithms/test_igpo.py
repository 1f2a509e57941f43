"""IGPO's turn advantages (hand-computed cases, a slow reference), its config, and the scoring plan."""

from __future__ import annotations

import math
import random

import pytest
import torch

from verl_selflock.algorithms.igpo import (
    IgpoConfig,
    broadcast_turn_values,
    compute_igpo_turn_advantages,
    dense_turn_index,
    group_ids,
)
from verl_selflock.algorithms.igpo_plan import plan_scoring, scoring_answers, segment_means, turn_starts
from verl_selflock.contracts import episode as ef
from verl_selflock.contracts.critique import ResponseLayout, TurnLabel
from verl_selflock.verl_adapter.igpo_scoring import balance_for_forward, forward_batch_multiple
from verl_selflock.verl_adapter.igpo_step import compute_igpo_step

LOG = math.log


def _batch():
    """Rows 0 and 1 share a prompt (group 0); row 2 is alone (group 1)."""
    logprob = torch.tensor([[LOG(0.1), LOG(0.3), LOG(0.2)], [LOG(0.5), LOG(0.4), 0.0], [LOG(0.9), 0.0, 0.0]])
    num_turns = torch.tensor([3, 2, 1])
    outcome = torch.tensor([1.0, 0.0, 1.0])
    return logprob, torch.ones(3, dtype=torch.bool), num_turns, outcome, group_ids(["a", "a", "b"])


def test_joint_prob_diff_by_hand():
    table = compute_igpo_turn_advantages(*_batch(), IgpoConfig())
    # rewards: row 0 IG 0.3-0.1, 0.2-0.3 then outcome 1; row 1 IG 0.4-0.5 then outcome 0; row 2 outcome 1
    assert torch.allclose(table.rewards, torch.tensor([[0.2, -0.1, 1.0], [-0.1, 0.0, 0.0], [1.0, 0.0, 0.0]]), atol=1e-6)
    # group 0 values 0.2, -0.1, 1.0, -0.1, 0.0: mean 0.2, population std sqrt(0.172)
    s = math.sqrt(0.172) + 1e-6
    expected_norm = torch.tensor([[0.0, -0.3 / s, 0.8 / s], [-0.3 / s, -0.2 / s, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(table.normalized, expected_norm, atol=1e-5)
    # gamma = 1: each turn gets the sum of the normalised rewards from it to the end
    expected_adv = torch.tensor([[0.5 / s, 0.5 / s, 0.8 / s], [-0.5 / s, -0.2 / s, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(table.advantages, expected_adv, atol=1e-5)
    assert table.reward_mask.tolist() == [[True] * 3, [True, True, False], [True, False, False]]


def test_separate_log_prob_diff_gamma_and_no_std_by_hand():
    logprob, scored, num_turns, outcome, group = _batch()
    sep = compute_igpo_turn_advantages(logprob, scored, num_turns, outcome, group, IgpoConfig(norm_mode="separate"))
    # outcomes of group 0: 1, 0 -> +-1; IG of group 0: 0.2, -0.1, -0.1 (mean 0, std sqrt(0.02))
    s_ig = math.sqrt(0.02) + 1e-6
    assert torch.allclose(sep.normalized[:2], torch.tensor([[0.2 / s_ig, -0.1 / s_ig, 0.5 / 0.500001], [-0.1 / s_ig, -0.5 / 0.500001, 0.0]]), atol=1e-5)

    log_cfg = IgpoConfig(info_gain_type="log_prob_diff", norm_by_std=False, gamma=0.5)
    table = compute_igpo_turn_advantages(logprob, scored, num_turns, outcome, group, log_cfg)
    r0 = [LOG(0.3) - LOG(0.1), LOG(0.2) - LOG(0.3), 1.0]
    r1 = [LOG(0.4) - LOG(0.5), 0.0]
    mean = (sum(r0) + sum(r1)) / 5
    n0, n1 = [r - mean for r in r0], [r - mean for r in r1]
    assert torch.allclose(table.rewards[0], torch.tensor(r0), atol=1e-6)
    expected0 = [n0[0] + 0.5 * n0[1] + 0.25 * n0[2], n0[1] + 0.5 * n0[2], n0[2]]
    expected1 = [n1[0] + 0.5 * n1[1], n1[1], 0.0]
    assert torch.allclose(table.advantages[0], torch.tensor(expected0), atol=1e-5)
    assert torch.allclose(table.advantages[1], torch.tensor(expected1), atol=1e-5)


def test_unscored_rows_get_the_outcome_only_and_padding_takes_no_part():
    logprob, scored, num_turns, outcome, group = _batch()
    logprob[1, 1] = float("nan")  # a non-finite score: row 1 falls back to outcome only
    num_turns = torch.tensor([3, 2, 0])  # row 2 is padding
    table = compute_igpo_turn_advantages(logprob, scored, num_turns, outcome, group, IgpoConfig(gamma=0.5))
    assert table.scored.tolist() == [True, False, False]
    assert table.reward_mask.tolist() == [[True] * 3, [False, True, False], [False] * 3]
    assert torch.all(table.advantages[2] == 0)
    # row 1: zero reward at turn 0, so A_0 = gamma * A_1
    assert table.advantages[1, 0] == pytest.approx(0.5 * float(table.advantages[1, 1]))
    assert torch.isfinite(table.advantages).all()


def _reference(logprob, scored, num_turns, outcome, group, cfg: IgpoConfig):
    """Slow, obvious IGPO: python loops over rows, groups and turns."""
    bs, width = logprob.shape
    rewards: dict[tuple[int, int], float] = {}
    kind: dict[tuple[int, int], int] = {}
    for i in range(bs):
        t_i = int(num_turns[i])
        ok = bool(scored[i]) and all(math.isfinite(float(logprob[i, k])) for k in range(t_i))
        for k in range(t_i):
            if k == t_i - 1:
                rewards[i, k], kind[i, k] = cfg.outcome_weight * float(outcome[i]), 1
            elif ok:
                b = [float(logprob[i, j]) for j in (k, k + 1)]
                if cfg.info_gain_type == "prob_diff":
                    b = [math.exp(v) for v in b]
                rewards[i, k], kind[i, k] = cfg.ig_weight * (b[1] - b[0]), 0
    buckets: dict[tuple, list[float]] = {}
    for (i, k), r in rewards.items():
        key = (int(group[i]),) if cfg.norm_mode == "joint" else (int(group[i]), kind[i, k])
        buckets.setdefault(key, []).append(r)
    normalized = torch.zeros(bs, width)
    for (i, k), r in rewards.items():
        key = (int(group[i]),) if cfg.norm_mode == "joint" else (int(group[i]), kind[i, k])
        values = buckets[key]
        mu = sum(values) / len(values)
        sd = math.sqrt(sum((v - mu) ** 2 for v in values) / len(values)) if len(values) > 1 else 1.0
        normalized[i, k] = (r - mu) / (sd + cfg.epsilon) if cfg.norm_by_std else r - mu
    advantages = torch.zeros(bs, width)
    for i in range(bs):
        running = 0.0
        for k in reversed(range(int(num_turns[i]))):
            running = float(normalized[i, k]) + cfg.gamma * running
            advantages[i, k] = running
    return normalized, advantages


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_equals_reference(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    bs, width = rng.randint(1, 12), rng.randint(1, 6)
    logprob = -torch.rand(bs, width, generator=gen) * 3
    num_turns = torch.randint(0, width + 1, (bs,), generator=gen)
    scored = torch.rand(bs, generator=gen) > 0.2
    outcome = (torch.rand(bs, generator=gen) > 0.5).float()
    group = torch.randint(0, 3, (bs,), generator=gen)
    cfg = IgpoConfig(
        info_gain_type=rng.choice(["prob_diff", "log_prob_diff"]),
        norm_mode=rng.choice(["joint", "separate"]),
        norm_by_std=rng.random() > 0.3,
        gamma=rng.choice([1.0, 0.9, 0.0]),
        ig_weight=rng.choice([1.0, 0.5]),
    )
    table = compute_igpo_turn_advantages(logprob, scored, num_turns, outcome, group, cfg)
    ref_norm, ref_adv = _reference(logprob, scored, num_turns, outcome, group, cfg)
    assert torch.allclose(table.normalized, ref_norm, atol=1e-4), cfg
    assert torch.allclose(table.advantages, ref_adv, atol=1e-4), cfg


@pytest.mark.parametrize("norm_mode", ["separate", "joint"])
def test_nearly_equal_group_keeps_its_digits(norm_mode):
    """A prompt group whose beliefs and outcomes differ by ~1e-5 around 0.5 / 0.7 (std ~1e-5): z-scores
    match a float64 numpy reference to float32 precision (in float32 the centred values kept 2-3 digits)."""
    np = pytest.importorskip("numpy")
    d = np.array([0.0, 1e-5, -1e-5, 2e-5])  # belief gains of the 4 rollouts
    e = np.array([1e-5, 0.0, 3e-5, -2e-5])  # outcome offsets
    p0, p1 = np.full(4, 0.5), 0.5 + d
    outcome = 0.7 + e
    logprob = torch.tensor(np.log(np.stack([p0, p1], axis=1)), dtype=torch.float64)
    cfg = IgpoConfig(norm_mode=norm_mode, gamma=0.9)
    table = compute_igpo_turn_advantages(
        logprob, torch.ones(4, dtype=torch.bool), torch.tensor([2, 2, 2, 2]),
        torch.tensor(outcome, dtype=torch.float64), group_ids(["q"] * 4), cfg,
    )

    def z(values):
        return (values - values.mean()) / (values.std() + cfg.epsilon)  # numpy's std is the population std

    gain = np.exp(np.log(p1)) - np.exp(np.log(p0))
    if norm_mode == "separate":
        z_ig, z_out = z(gain), z(outcome)
    else:
        joint = z(np.concatenate([gain, outcome]))
        z_ig, z_out = joint[:4], joint[4:]
    ref_norm = np.stack([z_ig, z_out], axis=1)
    ref_adv = np.stack([z_ig + cfg.gamma * z_out, z_out], axis=1)
    if norm_mode == "separate":
        assert np.abs(ref_norm).max() > 0.5  # the z-scores are O(1): nothing hides behind the tolerance
    np.testing.assert_allclose(table.normalized.numpy(), ref_norm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(table.advantages.numpy(), ref_adv, rtol=1e-5, atol=1e-6)
    assert table.normalized.dtype == table.advantages.dtype == torch.float32


def test_broadcast_puts_turn_values_on_generated_tokens_only():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    turn_ids = torch.tensor([[0, 0, -1, 1, -1, 2, 2], [0, -1, 1, 1, -1, -1, -1]])
    mask = torch.tensor([[1, 1, 0, 1, 0, 1, 0], [1, 0, 1, 1, 0, 0, 0]])
    out = broadcast_turn_values(values, turn_ids, mask)
    assert out.tolist() == [[1, 1, 0, 2, 0, 3, 0], [4, 0, 5, 5, 0, 0, 0]]
    assert broadcast_turn_values(torch.zeros(2, 0), turn_ids, mask).abs().sum() == 0


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match=r"algorithm\.igpo\.gamma must be a number in \[0, 1\]"):
        IgpoConfig.from_mapping({"gamma": 1.5})
    with pytest.raises(ValueError, match=r"algorithm\.igpo\.info_gain_type must be one of"):
        IgpoConfig(info_gain_type="kl")
    with pytest.raises(ValueError, match=r"algorithm\.igpo\.norm_mode"):
        IgpoConfig(norm_mode="global")
    with pytest.raises(ValueError, match=r"algorithm\.igpo\.epsilon"):
        IgpoConfig(epsilon=0)
    with pytest.raises(ValueError, match=r"algorithm\.igpo\.ig_weight"):
        IgpoConfig(ig_weight=-1)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['algorithm\.igpo\.lam'\]"):
        IgpoConfig.from_mapping({"lam": 0.2})


def test_selflock_validation_of_igpo_runs(verl_config, tmp_path):
    from verl_selflock.data.pe import build_pe_dataset
    from verl_selflock.verl_adapter.config_validation import SelflockConfigError, validate_selflock_config

    # a run of ours has its data files checked on the driver too: real ones, from our builder
    paths = build_pe_dataset("gated", 3, 4, 2, 0, tmp_path, max_turns=4, progress=False)
    good = [
        "algorithm.adv_estimator=igpo",
        "trainer.v1.trainer_mode=selflock",
        "actor_rollout_ref.rollout.n=4",
        "+algorithm.igpo.norm_mode=separate",
        f"data.train_files={paths['train']}",
        f"data.val_files={paths['test']}",
    ]
    validate_selflock_config(verl_config(good))
    with pytest.raises(SelflockConfigError, match=r"algorithm\.igpo\.gamma"):
        validate_selflock_config(verl_config(good + ["+algorithm.igpo.gamma=-1"]))
    with pytest.raises(SelflockConfigError, match=r"trainer\.v1\.trainer_mode=selflock"):
        validate_selflock_config(verl_config(["algorithm.adv_estimator=igpo"]))
    with pytest.raises(SelflockConfigError, match=r"algorithm\.use_kl_in_reward=false"):
        validate_selflock_config(verl_config(good + ["algorithm.use_kl_in_reward=true"]))
    # a spare igpo node is validated even when another estimator runs
    with pytest.raises(ValueError, match=r"algorithm\.igpo\.norm_mode"):
        validate_selflock_config(verl_config(["+algorithm.igpo.norm_mode=x"]))


class _CharTokenizer:
    """One token per character (ord): makes expected ids easy to write by hand."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def test_turn_starts_and_scoring_plan():
    assert turn_starts([0, 0, -1, -1, 1, -1, 2, 2]) == [0, 4, 6]
    assert turn_starts([-1, 0, 0, -1, 1]) == [1, 4]
    # A turn that kept no tokens leaves a gap in the ids: the turns present still count.
    assert turn_starts([0, 0, -1, 2]) == [0, 3] and turn_starts([-1, -1]) is None

    cfg = IgpoConfig(bridge="<a>")
    prompts = [[1, 2], [3], [4], [5]]
    responses = [[10, 11, 12, 13, 14], [20, 21], [30], [40]]
    turn_ids = [[0, 0, -1, 1, 1], [0, 0], [0], None]
    answers = ["xy", "xy", None, "z"]
    plan = plan_scoring(prompts, responses, turn_ids, answers, _CharTokenizer(), cfg, skip=[False, False, False, False])
    tail = [ord(c) for c in "<a>xy"]
    assert [ids.tolist() for ids in plan.input_ids] == [[1, 2, *tail], [1, 2, 10, 11, 12, *tail], [3, *tail]]
    assert plan.answer_lens == [2, 2, 2]
    assert plan.rows.tolist() == [0, 0, 1] and plan.prefixes.tolist() == [0, 1, 0]
    assert plan.num_turns.tolist() == [2, 1, 1, 0] and plan.scored.tolist() == [True, True, False, False]
    assert plan.num_tokens == sum(len(s) for s in plan.input_ids)
    table = plan.to_table(torch.tensor([-1.0, -2.0, -3.0]))
    assert table[0].tolist() == [-1.0, -2.0] and table[1, 0] == -3.0 and torch.isnan(table[2:]).all()
    skipped = plan_scoring(prompts, responses, turn_ids, answers, _CharTokenizer(), cfg, skip=[True, False, False, False])
    assert skipped.num_turns.tolist() == [0, 1, 1, 0] and len(skipped) == 1

    assert segment_means(torch.tensor([1.0, 3.0, 5.0, 2.0]), torch.tensor([2, 1, 1])).tolist() == [2.0, 5.0, 2.0]


def test_dense_turn_index_tolerates_gaps_and_gives_turnless_rows_one_turn():
    turn_ids = torch.tensor(
        [
            [0, 0, -1, 2, 2, -1],  # turn 1 kept no tokens: turns 0 and 2 are dense turns 0 and 1
            [-1, -1, -1, -1, -1, -1],  # no turn at all: one turn over every token
            [1, 1, -1, 3, -1, 4],  # starts at 1, gap at 2
            [0, 0, 1, 1, -1, -1],  # padding row
        ]
    )
    index, num_turns = dense_turn_index(turn_ids, torch.tensor([True, True, True, False]))
    assert index.tolist() == [
        [0, 0, -1, 1, 1, -1],
        [0, 0, 0, 0, 0, 0],
        [0, 0, -1, 1, -1, 2],
        [-1, -1, -1, -1, -1, -1],
    ]
    assert num_turns.tolist() == [2, 1, 3, 0]
    # The plan's turn starts follow the same rule.
    assert [turn_starts(row.tolist()) for row in turn_ids[:3]] == [[0, 3], None, [0, 3, 5]]


def test_a_table_narrower_than_the_turns_falls_back_to_the_outcome():
    # Row 0 has 2 turns but the score table holds 1 column (nothing scored for turn 1): outcome only.
    table = compute_igpo_turn_advantages(
        torch.tensor([[LOG(0.5)], [0.0]]), torch.tensor([True, False]), torch.tensor([2, 1]),
        torch.tensor([1.0, 0.0]), group_ids(["a", "a"]), IgpoConfig(norm_by_std=False),
    )
    assert table.scored.tolist() == [False, False]
    assert table.reward_mask.tolist() == [[False, True], [True, False]]
    assert table.advantages.tolist() == [[0.5, 0.5], [-0.5, 0.0]]


def _fields(turns: list[tuple[int, int]], stop: str | None, answer: str | None = "x") -> dict:
    """extra_fields of an episode: ``turns`` = (turn id, n tokens) spans, turn id -1 for observations."""
    layout = ResponseLayout()
    for turn, n in turns:
        if turn < 0:
            layout.add_observation_tokens(n)
        else:
            layout.add_turn_tokens(turn, n)
            layout.set_label(turn, TurnLabel())
    fields = layout.as_extra_fields()
    if stop is not None:
        fields[ef.STOP_REASON] = stop
    if answer is not None:
        fields[ef.GT_ANSWER] = answer
    return fields


def test_scoring_answers_only_for_episodes_that_ended_at_a_final_turn():
    rows = [
        _fields([(0, 1)], ef.STOP_ANSWER),
        _fields([(0, 1)], ef.STOP_DONE),
        _fields([(0, 1)], ef.STOP_T3),
        _fields([(0, 1)], ef.STOP_MAX_TURNS),
        _fields([(0, 1)], ef.STOP_RESPONSE_LENGTH),
        _fields([(0, 1)], None),
        _fields([(0, 1)], ef.STOP_ANSWER, answer=None),
        None,
    ]
    assert scoring_answers(rows) == ["x", "x", None, None, None, None, None, None]
    # algorithm.igpo.unfinished=score: rows cut short are scored too; rows without an answer still are not.
    assert scoring_answers(rows, "score") == ["x", "x", "x", "x", "x", "x", None, None]


def test_igpo_step_by_hand_gaps_turnless_rows_and_rows_cut_short():
    """One prompt group: row 0 answered, with a gap in its turn ids (turn 1 kept no tokens); row 1 has no
    turn ids at all (another agent loop); row 2 was cut by T3; row 3 is veRL padding."""
    cfg = IgpoConfig(norm_by_std=False, bridge="<a>")
    extra_fields = [
        _fields([(0, 2), (-1, 1), (2, 2)], ef.STOP_ANSWER),
        {},
        _fields([(0, 1), (-1, 1), (1, 1)], ef.STOP_T3),
        _fields([(0, 1)], ef.STOP_ANSWER),
    ]
    response_mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 0, 0], [1, 0, 0, 0, 0]])
    prompts = [[1], [2], [3], [4]]
    responses = [[10, 11, 12, 13, 14], [20, 21, 22], [30, 31, 32], [40]]
    beliefs = {(0, 0): 0.2, (0, 1): 0.5}  # p of the answer before row 0's first and second turn
    asked = []

    def score(plan):
        asked.extend(zip(plan.rows.tolist(), plan.prefixes.tolist(), [ids.tolist() for ids in plan.input_ids]))
        return torch.tensor([LOG(beliefs[r, k]) for r, k in zip(plan.rows.tolist(), plan.prefixes.tolist())])

    advantages, metrics = compute_igpo_step(
        prompts, responses, extra_fields, ["a", "a", "a", "pad"], [False, False, False, True], response_mask,
        torch.tensor([1.0, 0.0, 0.5, 0.0]), _CharTokenizer(), cfg, score,
    )
    tail = [ord(c) for c in "<a>x"]
    # Only row 0 is scored: before its turn 0, and before its second turn (response[:3]).
    assert asked == [(0, 0, [1, *tail]), (0, 1, [1, 10, 11, 12, *tail])]
    # Rewards: row 0 IG 0.5 - 0.2 = 0.3 then outcome 1.0; row 1 outcome 0.0; row 2 outcome 0.5 on its last
    # turn only. Group mean (0.3 + 1.0 + 0.0 + 0.5) / 4 = 0.45; centred: -0.15, 0.55 | -0.45 | 0.05.
    # gamma 1: row 0 A = (0.4, 0.55); row 1 A = -0.45 on its whole response; row 2 A = (0.05, 0.05).
    expected = torch.tensor(
        [[0.4, 0.4, 0.0, 0.55, 0.55], [-0.45, -0.45, -0.45, 0.0, 0.0], [0.05, 0.0, 0.05, 0.0, 0.0], [0.0] * 5]
    )
    torch.testing.assert_close(advantages, expected)
    assert metrics["igpo/frac_rows_outcome_only"] == pytest.approx(2 / 3)
    assert metrics["igpo/scored_sequences"] == 2.0 and metrics["igpo/ig_mean"] == pytest.approx(0.3)
    assert metrics["igpo/outcome_mean"] == pytest.approx(0.5)  # (1.0 + 0.0 + 0.5) / 3: padding left out


def test_igpo_step_with_nothing_to_score_never_calls_the_scorer():
    def score(plan):
        raise AssertionError("nothing should be scored")

    advantages, metrics = compute_igpo_step(
        [[1], [2]], [[10, 11], [20]], [_fields([(0, 2)], ef.STOP_MAX_TURNS), None], ["a", "a"], [False, False],
        torch.tensor([[1, 1], [1, 0]]), torch.tensor([1.0, 0.0]), _CharTokenizer(), IgpoConfig(), score,
    )
    # Outcomes 1 and 0 in one group: z-scores +-1 (population std 0.5), on every generated token.
    torch.testing.assert_close(advantages, torch.tensor([[1.0, 1.0], [-1.0, 0.0]]), atol=1e-5, rtol=0)
    assert metrics["igpo/frac_rows_outcome_only"] == 1.0 and metrics["igpo/scored_sequences"] == 0.0


@pytest.mark.parametrize(
    "dp, dynamic, micro, expected",
    [(4, True, 8, 4), (4, False, 2, 8), (1, False, 1, 1), (2, False, None, 2)],
)
def test_forward_batch_multiple(dp, dynamic, micro, expected):
    assert forward_batch_multiple(dp, dynamic, micro) == expected


class _WorkerGroup:
    """The two attributes of veRL's worker group that the dispatch (and our balancing) read."""

    def __init__(self, mapping: list[int]) -> None:
        self._dispatch_info: dict[str, list[int]] = {}
        self.mapping = mapping

    def _query_dispatch_info(self, mesh: str) -> list[int]:
        assert mesh == "actor"
        return self.mapping


def test_scoring_batch_is_padded_to_the_dp_size_not_the_mini_batch(monkeypatch):
    """5 sequences, actor DP size 2 (4 workers, TP 2), dynamic batch sizes, PPO mini-batch 4 x n 8: veRL's
    ``_balance_batch`` would pad to lcm(2, 32) = 32 rows; a forward pass needs 6."""
    from omegaconf import OmegaConf
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo import padding_utils

    asked = []

    def upsample(meta, multiple, eos_token_id):  # veRL's, minus the TransferQueue writes
        asked.append(multiple)
        pad = -len(meta) % multiple
        keys = meta.keys + [f"pad{i}" for i in range(pad)]
        tags = meta.tags + [{"seq_len": 2, "is_padding": True}] * pad
        return KVBatchMeta(keys=keys, tags=tags, partition_id=meta.partition_id)

    monkeypatch.setattr(padding_utils, "upsample_batch_to_divisible_size", upsample)
    config = OmegaConf.create(
        {
            "actor_rollout_ref": {
                "actor": {"use_dynamic_bsz": True, "ppo_mini_batch_size": 4},
                "rollout": {"n": 8, "log_prob_micro_batch_size_per_gpu": 2},
            }
        }
    )
    trainer = type("Trainer", (), {})()
    trainer.config, trainer.actor_rollout_wg = config, _WorkerGroup([0, 0, 1, 1])
    trainer.tokenizer = type("Tok", (), {"eos_token_id": 0})()
    lengths = [100, 10, 60, 50, 40]
    meta = KVBatchMeta(keys=[f"s{i}" for i in range(5)], tags=[{"seq_len": n} for n in lengths], partition_id="p")
    out = balance_for_forward(trainer, meta)
    assert asked == [2] and len(out) == 6
    # Equal halves, one per DP rank, with similar token work (100 + 10 + 2 against 60 + 50 + 40 or so).
    halves = [sum(tag["seq_len"] for tag in out.tags[:3]), sum(tag["seq_len"] for tag in out.tags[3:])]
    assert sorted(out.keys) == sorted([*meta.keys, "pad0"]) and max(halves) <= 150
    # Fixed micro-batches: every rank must also hold whole micro-batches of 2.
    config.actor_rollout_ref.actor.use_dynamic_bsz = False
    asked.clear()
    out = balance_for_forward(trainer, KVBatchMeta(keys=["a", "b", "c"], tags=[{"seq_len": 5}] * 3, partition_id="p"))
    assert asked == [4] and len(out) == 4
