"""IGPO scoring in bounded chunks: same advantages as one call, chunk and sequence bounds kept, shared
prefixes scored once, over-long sequences left unscored, and the chunk size validated on the driver."""

from __future__ import annotations

import random

import pytest
import torch

from verl_selflock.algorithms.igpo_config import DEFAULT_SCORING_CHUNK_TOKENS, IgpoConfig
from verl_selflock.algorithms.igpo_plan import chunk_by_tokens, plan_scoring, turn_starts
from verl_selflock.contracts import episode as ef
from verl_selflock.contracts.critique import ResponseLayout, TurnLabel
from verl_selflock.verl_adapter.igpo_step import compute_igpo_step

BRIDGE = "<a>"


class _CharTokenizer:
    """One token per character (ord)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def _fake_logprob(ids: torch.Tensor, answer_len: int) -> float:
    """A deterministic stand-in for the actor: a function of the whole sequence (prefix included), so a
    sequence scored under the wrong prefix, or mixed up with another, gives a different number."""
    weights = torch.arange(1, ids.numel() + 1, dtype=torch.float64)
    return -float(((ids.double() * weights).sum() % 997) / 997 + answer_len / 10)


def _batch(seed: int, groups: int = 3, n: int = 4) -> dict:
    """A batch of ``groups`` prompts x ``n`` rollouts with 1-5 turns, varied turn and observation lengths,
    one padding row, a few rows cut short, and a shared prompt (and answer) within each group."""
    rng = random.Random(seed)
    prompts, responses, extra, uids, padding, masks, outcome = [], [], [], [], [], [], []
    for g in range(groups):
        prompt = [rng.randrange(40, 120) for _ in range(rng.randrange(3, 9))]
        answer = "".join(rng.choice("0123456789,.") for _ in range(rng.randrange(2, 6)))
        first = [rng.randrange(200, 300) for _ in range(rng.randrange(1, 5))]
        for r in range(n):
            layout, response, mask = ResponseLayout(), [], []
            for turn in range(rng.randrange(1, 6)):
                # every group's rollouts 0 and 1 start with the same first turn: a prefix they share
                tokens = first if turn == 0 and r < 2 else [rng.randrange(200, 300) for _ in range(rng.randrange(1, 5))]
                layout.add_turn_tokens(turn, len(tokens))
                layout.set_label(turn, TurnLabel())
                response += tokens
                mask += [1] * len(tokens)
                obs = rng.randrange(0, 4)
                layout.add_observation_tokens(obs)
                response += [rng.randrange(300, 400) for _ in range(obs)]
                mask += [0] * obs
            fields = layout.as_extra_fields()
            fields[ef.STOP_REASON] = ef.STOP_T3 if rng.random() < 0.2 else ef.STOP_ANSWER
            fields[ef.GT_ANSWER] = answer
            prompts.append(prompt), responses.append(response), extra.append(fields), uids.append(f"g{g}")
            padding.append(False), masks.append(mask), outcome.append(float(rng.random() < 0.5))
    # veRL's synthetic padding row
    prompts.append([1]), responses.append([2]), extra.append({}), uids.append("pad"), padding.append(True)
    masks.append([1]), outcome.append(0.0)
    width = max(len(m) for m in masks)
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return {
        "prompts": prompts, "responses": responses, "extra_fields": extra, "uids": uids, "is_padding": padding,
        "response_mask": mask, "outcome": torch.tensor(outcome), "tokenizer": _CharTokenizer(),
    }


def _run(batch: dict, config: IgpoConfig, limit: int | None = None) -> tuple[torch.Tensor, dict, list]:
    calls: list = []

    def score(chunk):
        seqs = chunk.input_ids
        calls.append([s.clone() for s in seqs])
        return torch.tensor([_fake_logprob(s, n) for s, n in zip(seqs, chunk.answer_lens, strict=True)])

    advantages, metrics = compute_igpo_step(**batch, config=config, score=score, max_sequence_tokens=limit)
    return advantages, metrics, calls


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_tokens", [1, 23, 60, 200])
def test_chunked_scoring_gives_the_advantages_of_one_call(seed, chunk_tokens):
    batch = _batch(seed)
    one, one_metrics, one_calls = _run(batch, IgpoConfig(bridge=BRIDGE, scoring_chunk_tokens=10**9))
    chunked, metrics, calls = _run(batch, IgpoConfig(bridge=BRIDGE, scoring_chunk_tokens=chunk_tokens))
    assert len(one_calls) == 1
    assert torch.equal(one, chunked)  # bitwise: each sequence's score does not depend on its chunk
    skip = {"igpo/scoring_time_s", "igpo/scoring_time_ratio_to_gen", "igpo/scoring_chunks"}
    assert {k: v for k, v in metrics.items() if k not in skip} == {k: v for k, v in one_metrics.items() if k not in skip}
    # Every sequence once, in chunks of at most chunk_tokens tokens (one longer sequence alone).
    assert metrics["igpo/scoring_chunks"] == len(calls) > 1
    assert sum(len(c) for c in calls) == len(one_calls[0])
    for call in calls:
        assert sum(s.numel() for s in call) <= chunk_tokens or len(call) == 1


def test_shared_prefixes_are_scored_once_and_give_every_turn_its_own_score():
    batch = _batch(3, groups=2, n=4)
    plan = plan_scoring(
        batch["prompts"], batch["responses"], [f.get("turn_ids") for f in batch["extra_fields"]],
        [f.get(ef.GT_ANSWER) if f.get(ef.STOP_REASON) == ef.STOP_ANSWER else None for f in batch["extra_fields"]],
        batch["tokenizer"], IgpoConfig(bridge=BRIDGE), skip=batch["is_padding"],
    )
    seqs = plan.input_ids
    scores = torch.tensor([_fake_logprob(s, n) for s, n in zip(seqs, plan.answer_lens, strict=True)])
    table = plan.to_table(scores)
    # Independently: every (row, turn) sequence built by hand from the batch and scored on its own.
    expected = torch.full_like(table, float("nan"))
    for row, fields in enumerate(batch["extra_fields"]):
        if not plan.scored[row]:
            continue
        answer = [ord(c) for c in fields[ef.GT_ANSWER]]
        for k, start in enumerate(turn_starts(fields["turn_ids"])):
            ids = batch["prompts"][row] + batch["responses"][row][:start] + [ord(c) for c in BRIDGE] + answer
            expected[row, k] = _fake_logprob(torch.tensor(ids), len(answer))
    torch.testing.assert_close(table, expected, equal_nan=True, rtol=0, atol=0)
    # Distinct sequences only: prefix 0 of a group's finished rows is one sequence, and so is prefix 1 of
    # rows 0 and 1 (same first turn) when both are scored.
    assert len({tuple(s.tolist()) for s in seqs}) == len(seqs) < plan.entry_seq.numel()
    assert plan.lengths.tolist() == [s.numel() for s in seqs]


def test_over_long_rows_get_the_outcome_only_and_nothing_longer_is_scored():
    batch = _batch(4)
    config = IgpoConfig(bridge=BRIDGE, scoring_chunk_tokens=40)
    _, free, free_calls = _run(batch, config)
    longest = max(s.numel() for call in free_calls for s in call)
    limit = longest - 3
    advantages, metrics, calls = _run(batch, config, limit=limit)
    assert all(s.numel() <= limit for call in calls for s in call)
    assert metrics["igpo/rows_over_token_limit"] >= 1
    assert metrics["igpo/frac_rows_outcome_only"] > free["igpo/frac_rows_outcome_only"]
    assert torch.isfinite(advantages).all()
    # A limit equal to the longest sequence keeps every row.
    _, exact, _ = _run(batch, config, limit=longest)
    assert exact["igpo/rows_over_token_limit"] == 0 and exact["igpo/scored_sequences"] == free["igpo/scored_sequences"]


def test_chunk_by_tokens():
    assert chunk_by_tokens([3, 3, 3, 3], 6) == [[0, 1], [2, 3]]
    assert chunk_by_tokens([3, 10, 2, 2], 6) == [[0], [1], [2, 3]]  # a sequence over the budget goes alone
    assert chunk_by_tokens([], 6) == []
    with pytest.raises(ValueError):
        chunk_by_tokens([1], 0)


@pytest.mark.parametrize("bad", [0, -5, 1.5, "2M", True, None])
def test_bad_chunk_size_is_refused_with_the_key(bad):
    with pytest.raises(ValueError, match=r"algorithm\.igpo\.scoring_chunk_tokens must be a whole number"):
        IgpoConfig.from_mapping({"scoring_chunk_tokens": bad})
    assert IgpoConfig().scoring_chunk_tokens == DEFAULT_SCORING_CHUNK_TOKENS


def test_bad_chunk_size_fails_driver_validation(verl_config):
    from verl_selflock.verl_adapter.config_validation import SelflockConfigError, validate_selflock_config

    overrides = ["algorithm.adv_estimator=igpo", "trainer.v1.trainer_mode=selflock", "actor_rollout_ref.rollout.n=2"]
    with pytest.raises(SelflockConfigError, match=r"algorithm\.igpo\.scoring_chunk_tokens"):
        validate_selflock_config(verl_config(overrides + ["+algorithm.igpo.scoring_chunk_tokens=0"]))


def test_scoring_token_limit_follows_veRLs_dynamic_batching(verl_config):
    from verl_selflock.verl_adapter.igpo_scoring import scoring_token_limit

    assert scoring_token_limit(verl_config(["actor_rollout_ref.actor.use_dynamic_bsz=false"])) is None
    dynamic = ["actor_rollout_ref.actor.use_dynamic_bsz=true", "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=3000"]
    assert scoring_token_limit(verl_config(dynamic)) == 3000
    sp = ["actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2"]
    assert scoring_token_limit(verl_config(dynamic + sp)) == 6000


class _FakeQueue:
    """The three TransferQueue calls :func:`score_with_actor` makes, on a dict; records the partition's
    largest content (rows, tokens) so the test can see one chunk at a time."""

    def __init__(self) -> None:
        self.store: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self.peak_rows = self.peak_tokens = 0

    def kv_batch_put(self, keys, partition_id, fields, tags=None):
        from transfer_queue import KVBatchMeta

        part = self.store.setdefault(partition_id, {})
        for i, key in enumerate(keys):
            row = part.setdefault(key, {})
            for name in fields.keys():  # noqa: SIM118  (a TensorDict)
                value = fields[name]
                if isinstance(value, torch.Tensor):
                    row[name] = value[i]
        self.peak_rows = max(self.peak_rows, len(part))
        self.peak_tokens = max(self.peak_tokens, sum(int(r["input_ids"].numel()) for r in part.values()))
        return KVBatchMeta(keys=list(keys), tags=list(tags or [{}] * len(keys)), partition_id=partition_id)

    def kv_batch_get(self, keys, partition_id, select_fields):
        from tensordict import TensorDict

        part = self.store[partition_id]
        return TensorDict(
            {f: torch.nested.as_nested_tensor([part[k][f] for k in keys], layout=torch.jagged) for f in select_fields},
            batch_size=len(keys),
        )

    def kv_clear(self, keys, partition_id):
        for key in keys:
            self.store[partition_id].pop(key)


class _Actor:
    """The actor worker group: ``compute_log_prob`` writes per-position log-probs (position p holds the
    log-prob of token p + 1, as veRL's engine does) from :func:`_position_logprob`."""

    def __init__(self, queue: _FakeQueue) -> None:
        self.queue, self.calls = queue, 0
        self._dispatch_info = {"actor": [0]}  # DP size 1

    def compute_log_prob(self, meta):
        self.calls += 1
        for key in meta.keys:
            row = self.queue.store[meta.partition_id][key]
            ids = row["input_ids"]
            row["log_probs"] = torch.tensor([_position_logprob(ids[: p + 2]) for p in range(ids.numel())])
        return meta


def _position_logprob(ids: torch.Tensor) -> float:
    """log pi(ids[-1] | ids[:-1]) of the fake actor (depends on the whole context)."""
    return -float((ids.double() * torch.arange(1, ids.numel() + 1)).sum() % 101) / 50


def test_actor_scoring_in_chunks_keeps_one_chunk_in_the_partition(monkeypatch, verl_config):
    import transfer_queue

    from verl_selflock.verl_adapter.igpo_scoring import score_with_actor

    queue = _FakeQueue()
    for name in ("kv_batch_put", "kv_batch_get", "kv_clear"):
        monkeypatch.setattr(transfer_queue, name, getattr(queue, name))
    trainer = type("Trainer", (), {})()
    trainer.config = verl_config(["actor_rollout_ref.actor.use_dynamic_bsz=true"])
    trainer.actor_rollout_wg = _Actor(queue)
    trainer.tokenizer = type("Tok", (), {"eos_token_id": 0})()
    batch = _batch(5)
    config = IgpoConfig(bridge=BRIDGE, scoring_chunk_tokens=50)

    def score(chunk):
        return score_with_actor(trainer, chunk, 1.0, batch["uids"])

    advantages, metrics = compute_igpo_step(**batch, config=config, score=score)
    assert trainer.actor_rollout_wg.calls == metrics["igpo/scoring_chunks"] > 1
    longest = max(int(n) for n in _plan(batch, config).lengths)
    assert queue.peak_tokens <= max(50, longest) and queue.store["selflock_igpo"] == {}  # cleared after each
    # The actor's answer log-probs, cut by veRL's own helper, equal the mean over the answer tokens.
    plan = _plan(batch, config)
    expected = []
    for ids, n in zip(plan.input_ids, plan.answer_lens, strict=True):
        expected.append(sum(_position_logprob(ids[: t + 1]) for t in range(ids.numel() - n, ids.numel())) / n)
    one, _ = compute_igpo_step(
        **batch, config=config, score=lambda chunk: torch.tensor(expected)[_positions(plan, chunk)]
    )
    torch.testing.assert_close(advantages, one)


def _plan(batch: dict, config: IgpoConfig):
    return plan_scoring(
        batch["prompts"], batch["responses"], [f.get("turn_ids") for f in batch["extra_fields"]],
        [f.get(ef.GT_ANSWER) if f.get(ef.STOP_REASON) in (ef.STOP_ANSWER, ef.STOP_DONE) else None
         for f in batch["extra_fields"]],
        batch["tokenizer"], config, skip=batch["is_padding"],
    )


def _positions(plan, chunk) -> torch.Tensor:
    """Indices into ``plan`` of the sequences of a chunk (matched by their materialised ids)."""
    index = {tuple(s.tolist()): i for i, s in enumerate(plan.input_ids)}
    return torch.tensor([index[tuple(s.tolist())] for s in chunk.input_ids])
