"""N-gram speculative decoding in the ``hf`` rollout: drafts from the sequence itself, checked several per forward.

It must be invisible in what is generated: greedy rows give the tokens of plain decoding, sampling rows
tokens with the plain sampler's distribution (checked on the acceptance rule itself, over many draws),
log-probs of the emitted tokens, and a kept K/V without the rejected drafts' columns. Tiny random Llama.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from fixtures.hf_server import server_on
from fixtures.log_probs import teacher_forced_log_probs

from verl_selflock.verl_adapter.cpu.engine_options import check_hf_engine_options
from verl_selflock.verl_adapter.cpu.prefix_cache import PrefixCache
from verl_selflock.verl_adapter.cpu.sampling import GenerationRequest, generate_batch, use_gqa_decode_attention
from verl_selflock.verl_adapter.cpu.speculation import NgramSpeculation, accept_drafts

torch.set_num_threads(1)

SPEC = NgramSpeculation(num_tokens=4, lookup_max=3, lookup_min=1)
# prompts that repeat themselves, so that drafts exist from the first step
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [3, 4, 20, 3, 4, 20, 3], [12, 13, 14, 15, 12]]


# -- drafts ----------------------------------------------------------------------------------------
def test_propose_takes_the_latest_occurrence_of_the_longest_suffix():
    sequence = torch.tensor([1, 2, 3, 4, 5, 6, 1, 2, 3, 7, 8, 1, 2, 3])
    assert NgramSpeculation(3).propose(sequence, limit=10) == [7, 8, 1]  # [1,2,3] at 6, not at 0
    assert NgramSpeculation(3).propose(sequence, limit=2) == [7, 8]
    assert NgramSpeculation(3).propose(sequence, limit=0) == []
    only_unigram = torch.tensor([4, 5, 6, 4, 9, 7, 4])  # [9,7,4] and [7,4] never occurred before
    assert NgramSpeculation(2, lookup_max=3).propose(only_unigram, limit=5) == [9, 7]
    assert NgramSpeculation(2, lookup_max=3, lookup_min=2).propose(only_unigram, limit=5) == []
    assert NgramSpeculation(2).propose(torch.tensor([1, 2, 3]), limit=5) == []
    assert NgramSpeculation(2).propose(torch.tensor([7]), limit=5) == []
    # a draft may run into the suffix itself (periodic text)
    assert NgramSpeculation(4, lookup_max=2).propose(torch.tensor([1, 2, 1, 2]), limit=5) == [1, 2]


def test_config_is_vllms_ngram_keys_and_bad_keys_are_errors():
    assert NgramSpeculation.from_options(None) is None and NgramSpeculation.from_options({}) is None
    parsed = NgramSpeculation.from_options(
        {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    )
    assert parsed == NgramSpeculation(5, 4, 2)
    for bad, message in (
        ({"num_speculative_tokens": 3, "lookahead": 2}, "unknown keys"),
        ({"method": "eagle", "num_speculative_tokens": 3}, "'ngram' only"),
        ({"method": "ngram"}, "needs num_speculative_tokens"),
        ({"num_speculative_tokens": 0}, ">= 1"),
        ({"num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ):
        with pytest.raises(ValueError, match=message):
            NgramSpeculation.from_options(bad)
    assert check_hf_engine_options({"prefix_cache_mb": 64, "speculative_config": {"num_speculative_tokens": 2}}) == NgramSpeculation(2)
    with pytest.raises(ValueError, match="unknown keys \\['prefix_cache_megabytes'\\]"):
        check_hf_engine_options({"prefix_cache_megabytes": 64})


# -- the acceptance rule ---------------------------------------------------------------------------
def test_greedy_keeps_the_drafts_that_are_the_argmax_then_the_argmax():
    vocab = 6
    argmax = torch.tensor([[2, 3, 4, 1], [5, 5, 5, 5], [1, 0, 0, 0]])  # per row, per position
    scaled = torch.nn.functional.one_hot(argmax, vocab).float() * 3.0
    drafts = torch.tensor([[2, 3, 0], [4, 5, 5], [9 % vocab, 0, 0]])
    draft_lens = torch.tensor([3, 3, 0])
    tokens, emitted = accept_drafts(scaled, None, drafts, draft_lens, torch.ones(3, dtype=torch.bool))
    assert emitted.tolist() == [3, 1, 1]
    assert tokens[0, :3].tolist() == [2, 3, 4]  # two drafts kept, then position 2's argmax
    assert tokens[1, 0] == 5 and tokens[2, 0] == 1  # first draft wrong; no draft at all


def test_without_drafts_it_draws_exactly_as_plain_sampling():
    probs = torch.softmax(torch.randn(4, 1, 9, generator=torch.Generator().manual_seed(3)), dim=-1)
    tokens, emitted = accept_drafts(
        probs.log(), probs, torch.zeros((4, 0), dtype=torch.long), torch.zeros(4, dtype=torch.long),
        torch.zeros(4, dtype=torch.bool), torch.Generator().manual_seed(7),
    )
    plain = torch.multinomial(probs[:, 0], 1, generator=torch.Generator().manual_seed(7)).squeeze(1)
    assert emitted.tolist() == [1, 1, 1, 1] and tokens[:, 0].tolist() == plain.tolist()


@pytest.mark.parametrize("draft_mass", ["typical", "zero", "certain"])
def test_sampling_with_a_draft_has_the_plain_distribution(draft_mass):
    """Over 200k draws: the first emitted token is distributed as p0, and after an accepted draft the next
    one as p1, whatever mass p0 puts on the draft (zero: a top-k that filtered it out; one: a certain token)."""
    n, vocab, draft = 200_000, 5, 2
    p0 = {"typical": [0.1, 0.2, 0.4, 0.25, 0.05], "zero": [0.3, 0.3, 0.0, 0.2, 0.2], "certain": [0, 0, 1.0, 0, 0]}
    p0 = torch.tensor(p0[draft_mass])
    p1 = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.2])
    probs = torch.stack([p0, p1])[None].expand(n, 2, vocab)
    scaled = probs.clamp_min(1e-12).log()
    drafts = torch.full((n, 1), draft)
    tokens, emitted = accept_drafts(
        scaled, probs, drafts, torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool),
        torch.Generator().manual_seed(0),
    )
    first = torch.bincount(tokens[:, 0], minlength=vocab).float() / n
    torch.testing.assert_close(first, p0, atol=0.005, rtol=0)  # 4+ standard errors
    kept = emitted == 2
    assert torch.equal(kept, tokens[:, 0] == draft)  # a second token exactly when the draft was kept
    if kept.sum() > 1000:
        second = torch.bincount(tokens[kept, 1], minlength=vocab).float() / kept.sum()
        torch.testing.assert_close(second, p1, atol=0.01, rtol=0)


# -- in generate_batch ----------------------------------------------------------------------------
def _requests(max_tokens: int = 24, temperature: float = 0.0, **kwargs) -> list[GenerationRequest]:
    return [GenerationRequest(p, max_tokens=max_tokens, temperature=temperature, **kwargs) for p in PROMPTS]


def test_greedy_tokens_and_log_probs_are_those_of_plain_decoding(tiny_lm):
    plain = generate_batch(tiny_lm, _requests(), [], 0)
    spec = generate_batch(tiny_lm, _requests(), [], 0, speculation=SPEC)
    assert sum(r.drafted for r in spec) > 0 and sum(r.accepted for r in spec) > 0  # the path is exercised
    assert sum(r.accepted for r in spec) < sum(r.drafted for r in spec)  # and so are rejections
    for a, b in zip(plain, spec, strict=True):
        assert a.token_ids == b.token_ids and a.stop_reason == b.stop_reason
        torch.testing.assert_close(torch.tensor(b.log_probs), torch.tensor(a.log_probs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_sampled_log_probs_are_those_of_the_emitted_tokens(tiny_lm, temperature):
    requests = _requests(temperature=temperature)
    results = generate_batch(tiny_lm, requests, [], 0, torch.Generator().manual_seed(1), speculation=SPEC)
    assert sum(r.drafted for r in results) > 0
    for request, result in zip(requests, results, strict=True):
        assert len(result.token_ids) == request.max_tokens and result.stop_reason == "length"
        expected = teacher_forced_log_probs(tiny_lm, request.prompt_ids, result.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(result.log_probs), expected, atol=1e-4, rtol=0)


def test_eos_stop_strings_and_max_tokens_end_a_row_inside_its_draft(tiny_lm):
    plain = generate_batch(tiny_lm, _requests(), [], 0)
    for k in range(1, 12):
        eos = [plain[0].token_ids[k]]
        for max_tokens in (k, 24):
            a = generate_batch(tiny_lm, _requests(max_tokens), eos, 0)
            b = generate_batch(tiny_lm, _requests(max_tokens), eos, 0, speculation=SPEC)
            assert [r.token_ids for r in a] == [r.token_ids for r in b]
            assert [r.stop_reason for r in a] == [r.stop_reason for r in b]

    def bracketed(ids: list[int]) -> str:
        return "".join(f"<{t}>" for t in ids)

    for k in range(2, 10):
        stop = (f"<{plain[1].token_ids[k]}>",)
        a = generate_batch(tiny_lm, _requests(stop=stop), [], 0, decode=bracketed)
        b = generate_batch(tiny_lm, _requests(stop=stop), [], 0, decode=bracketed, speculation=SPEC)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_repetition_penalty_decodes_one_token_a_step(tiny_lm):
    requests = _requests(repetition_penalty=1.3)
    spec = generate_batch(tiny_lm, requests, [], 0, speculation=SPEC)
    assert sum(r.drafted for r in spec) == 0
    assert [r.token_ids for r in spec] == [r.token_ids for r in generate_batch(tiny_lm, requests, [], 0)]


def test_kept_kv_has_no_rejected_draft_columns(tiny_lm):
    """The K/V kept for the next turn equal one forward over prompt + generated[:-1], and a next turn that
    reuses them generates what it would from scratch."""
    results = generate_batch(tiny_lm, _requests(), [], 0, keep_kv=True, speculation=SPEC)
    assert sum(r.drafted - r.accepted for r in results) > 0
    for request, result in zip(_requests(), results, strict=True):
        assert result.cache.token_ids.tolist() == request.prompt_ids + result.token_ids[:-1]
        with torch.no_grad():
            fresh = tiny_lm(result.cache.token_ids[None], use_cache=True).past_key_values
        for layer, (keys, values) in zip(fresh.layers, result.cache.kv, strict=True):
            torch.testing.assert_close(keys, layer.keys[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(values, layer.values[0], atol=1e-5, rtol=0)
    cache = PrefixCache()
    for i, result in enumerate(results):
        cache.store(str(i), result.cache)
    follow_ups = [GenerationRequest(r.prompt_ids + res.token_ids + [60, 61], 16, 0.0) for r, res in zip(_requests(), results)]
    prefixes = [cache.lookup(str(i), r.prompt_ids)[0] for i, r in enumerate(follow_ups)]
    assert all(p is not None and len(p) == len(r.prompt_ids) - 3 for p, r in zip(prefixes, follow_ups))
    reused = generate_batch(tiny_lm, follow_ups, [], 0, prefixes=prefixes, speculation=SPEC)
    assert [r.token_ids for r in reused] == [r.token_ids for r in generate_batch(tiny_lm, follow_ups, [], 0)]


def test_folded_attention_of_a_draft_matches_sdpa(tiny_lm):
    """Draft checks run multi-token queries through the folded GQA attention: the same as transformers' SDPA."""
    folded = copy.deepcopy(tiny_lm)
    use_gqa_decode_attention(folded)
    a = generate_batch(tiny_lm, _requests(), [], 0, speculation=SPEC)
    b = generate_batch(folded, _requests(), [], 0, speculation=SPEC)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        torch.testing.assert_close(torch.tensor(x.log_probs), torch.tensor(y.log_probs), atol=1e-5, rtol=0)


def test_server_speculates_and_counts_drafts(tiny_lm):
    async def turns(server):
        return [
            list((await server.generate(request_id=f"r{i}", prompt_ids=p, sampling_params={"temperature": 0.0})).token_ids)
            for i, p in enumerate(PROMPTS)
        ]

    spec = server_on(tiny_lm, 63, 16, PrefixCache(), speculation=SPEC)
    plain = server_on(tiny_lm, 63, 16, PrefixCache())
    assert asyncio.run(turns(spec)) == asyncio.run(turns(plain))
    stats = asyncio.run(spec.get_stats())
    assert 0 < stats["accepted_draft_tokens"] <= stats["draft_tokens"]
    assert asyncio.run(plain.get_stats())["draft_tokens"] == 0
