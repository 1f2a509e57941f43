"""IGPO's packed scoring: one forward per row under a tree mask gives the per-prefix scores.

The reference is :func:`score_with_hf_model` (one causal forward per turn prefix, already checked against
an independently rendered conversation in ``tests/verl_adapter/agent_loop/test_igpo_scoring.py``), on
SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import pytest
import torch

from verl_selflock.algorithms.igpo_config import IgpoConfig, resolve_scoring_mode
from verl_selflock.algorithms.igpo_packing import (
    PackedRow,
    pack_plan,
    packed_answer_logprobs,
    packed_chunks,
    packed_lengths,
    score_packed_with_hf_model,
    tree_attention_mask,
)
from verl_selflock.algorithms.igpo_plan import plan_scoring, score_with_hf_model

ANSWER = "0.412,0.335,0.253"


@pytest.fixture(scope="module")
def smollm2_model(smollm2_dir):
    from verl_selflock.verl_adapter.cpu.sampling import load_causal_lm

    return load_causal_lm(smollm2_dir).float().eval()


def _batch(prompts: int = 2, n: int = 3, turns: int = 4, seed: int = 0):
    """Random-token trajectories, PE-like layout: turns of 5-14 tokens with 7-token observations between;
    the rollouts of a prompt share it (so their prefix 0 is one shared sequence)."""
    gen = torch.Generator().manual_seed(seed)
    out_prompts, responses, turn_ids = [], [], []
    for _ in range(prompts):
        prompt = torch.randint(1000, (30,), generator=gen)
        for _ in range(n):
            pieces, ids = [], []
            for k in range(turns):
                length = int(torch.randint(5, 15, (1,), generator=gen))
                pieces.append(torch.randint(1000, (length,), generator=gen))
                ids += [k] * length
                if k < turns - 1:
                    pieces.append(torch.randint(1000, (7,), generator=gen))
                    ids += [-1] * 7
            out_prompts.append(prompt)
            responses.append(torch.cat(pieces))
            turn_ids.append(ids)
    return out_prompts, responses, turn_ids


@pytest.mark.parametrize("bridge", [IgpoConfig().bridge, ""], ids=["bridge", "no-bridge"])
@pytest.mark.parametrize("max_tokens", [1, 150, 8192], ids=["row-alone", "some-rows", "all-rows"])
def test_packed_scores_equal_per_prefix_scores(smollm2_model, chatml_tokenizer, bridge, max_tokens):
    prompts, responses, turn_ids = _batch()
    plan = plan_scoring(prompts, responses, turn_ids, [ANSWER] * len(prompts), chatml_tokenizer, IgpoConfig(bridge=bridge))
    assert plan.entry_seq.numel() > len(plan)  # shared prefixes: some contexts own fewer tails than turns
    reference = score_with_hf_model(smollm2_model, plan)
    packed = score_packed_with_hf_model(smollm2_model, plan, max_tokens=max_tokens)
    assert torch.isfinite(packed).all()
    torch.testing.assert_close(packed, reference, atol=2e-5, rtol=0)


def test_eager_attention_gets_an_additive_mask_and_the_same_scores(smollm2_dir, chatml_tokenizer):
    from verl_selflock.verl_adapter.cpu.sampling import load_causal_lm

    model = load_causal_lm(smollm2_dir).float().eval()
    prompts, responses, turn_ids = _batch(prompts=1, n=2, seed=1)
    plan = plan_scoring(prompts, responses, turn_ids, [ANSWER] * 2, chatml_tokenizer, IgpoConfig())
    reference = score_with_hf_model(model, plan)
    model.set_attn_implementation("eager")
    torch.testing.assert_close(score_packed_with_hf_model(model, plan), reference, atol=2e-5, rtol=0)
    assert model.config._attn_implementation == "eager"


def test_packed_rows_and_chunks_hold_whole_contexts(chatml_tokenizer):
    prompts, responses, turn_ids = _batch()
    plan = plan_scoring(prompts, responses, turn_ids, [ANSWER] * len(prompts), chatml_tokenizer, IgpoConfig())
    rows = pack_plan(plan)
    lengths = packed_lengths(plan)
    assert [len(r) for r in rows] == [int(n) for n in lengths if n > 0]
    assert sorted(torch.cat([r.sequences for r in rows]).tolist()) == list(range(len(plan)))
    # Packed: each row's dialogue once (up to its last scored turn) plus one tail per scored prefix.
    tail = plan.tails[0].numel()
    for r in rows:
        context = int(plan.seq_context[r.sequences[0]])
        trunk = prompts[context].numel() + int(plan.seq_response_len[r.sequences].max())
        assert len(r) == trunk + tail * r.sequences.numel()
    assert int(lengths.sum()) < plan.num_tokens
    for budget in (1, 100, 10_000):
        chunks = packed_chunks(plan, budget)
        assert sorted(i for chunk in chunks for i in chunk) == list(range(len(plan)))
        for chunk in chunks:
            contexts = set(plan.seq_context[chunk].tolist())
            # no context split across chunks, and each chunk within budget unless it is one context alone
            assert all(set(torch.nonzero(plan.seq_context == c)[:, 0].tolist()) <= set(chunk) for c in contexts)
            assert len(contexts) == 1 or int(lengths[list(contexts)].sum()) <= budget


def test_tree_mask_on_a_hand_example():
    # Row 0: trunk of 3 tokens, tail 1 cut after 1 trunk token (2 tokens), tail 2 cut after 3 (1 token).
    # Row 1: trunk of 2 tokens.
    row = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    segment = torch.tensor([0, 0, 0, 1, 1, 2, 0, 0])
    position = torch.tensor([0, 1, 2, 1, 2, 3, 0, 1])
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 0, 0, 1, 0, 0, 0, 0],  # tail 1 sees trunk token 0 and itself
        [1, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],  # tail 2 sees the whole trunk, not tail 1
        [0, 0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(tree_attention_mask(row, segment, position), expected)


def test_a_padding_row_forwards_and_scores_nothing(smollm2_model):
    (out,) = packed_answer_logprobs(smollm2_model, [PackedRow.padding(0)])
    assert out.shape == (1,) and float(out[0]) == 0.0


@pytest.mark.parametrize(
    ("requested", "strategy", "fused", "expected"),
    [
        ("auto", "fsdp", False, "packed"),
        ("auto", "fsdp2", False, "packed"),
        ("auto", "megatron", False, "prefix"),
        ("auto", "fsdp", True, "prefix"),
        ("prefix", "fsdp", False, "prefix"),
        ("packed", "fsdp2", False, "packed"),
    ],
)
def test_scoring_mode_resolution(requested, strategy, fused, expected):
    assert resolve_scoring_mode(requested, strategy, fused) == expected


def test_packed_where_it_cannot_run_says_what_to_change():
    with pytest.raises(ValueError, match=r"strategy=megatron.*use_fused_kernels=true.*scoring=prefix"):
        resolve_scoring_mode("packed", "megatron", True)
