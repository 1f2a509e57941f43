"""Prefix caching in the ``hf`` rollout: each conversation's K/V reused by its next turn.

The cache must be invisible in the outputs: the same greedy tokens and (up to float rounding) the same
log-probs as a full prefill, over multi-turn conversations whose next prompt leaves the cached sequence
(the agent loop cuts turns), under a batch that mixes cached and uncached rows; dropped with new weights;
bounded. Tiny random Llama, fast.
"""

from __future__ import annotations

import asyncio
import copy
from types import SimpleNamespace

import pytest
import torch
from fixtures.hf_server import server_on
from fixtures.log_probs import teacher_forced_log_probs

from verl_selflock.verl_adapter.cpu.generation_server import HFGenerationServer
from verl_selflock.verl_adapter.cpu.prefix_cache import (
    CachedPrefix,
    PrefixCache,
    common_prefix_len,
    prefix_cache_from_config,
)
from verl_selflock.verl_adapter.cpu.sampling import GenerationRequest, generate_batch

torch.set_num_threads(1)  # shared 2-core machines: see test_cpu_backend.py






def _play(model, cache: PrefixCache | None, temperature: float = 0.0, turns: int = 3, seed: int = 0):
    """Two conversations decoded together for ``turns`` turns. Each next prompt keeps only part of the
    turn (a cut, as the agent loop makes after a closing tag), then closing + observation tokens; the
    second conversation starts later, so the first batch mixes a cached row with an uncached one."""
    generator = torch.Generator().manual_seed(seed)
    prompts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [3, 4, 20]}
    played: list[tuple[str, list[int], list[int], list[float]]] = []
    for turn in range(turns):
        ids = ["a"] if turn == 0 else ["a", "b"]  # "a" is one turn ahead of "b"
        requests = [GenerationRequest(prompts[i], max_tokens=5 + turn, temperature=temperature) for i in ids]
        found = [cache.lookup(i, r.prompt_ids) for i, r in zip(ids, requests)] if cache is not None else None
        prefixes = [prefix for prefix, _ in found] if found is not None else None
        results = generate_batch(model, requests, [], 0, generator, prefixes=prefixes, keep_kv=cache is not None)
        for i, request, result in zip(ids, requests, results, strict=True):
            played.append((i, request.prompt_ids, result.token_ids, result.log_probs))
            if cache is not None:
                assert cache.store(i, result.cache, found[0][1])
            kept = result.token_ids[: max(1, len(result.token_ids) - 2)]
            prompts[i] = request.prompt_ids + kept + [60, 61 + turn, 40 + len(i)]
    return played


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_three_turns_same_tokens_and_log_probs_with_and_without_cache(tiny_lm, temperature):
    cache = PrefixCache()
    cached = _play(tiny_lm, cache, temperature)
    plain = _play(tiny_lm, None, temperature)
    assert cache.stats["hits"] == 3 and cache.stats["reused_tokens"] > 0  # "a" turns 2-3, "b" turn 3
    for (i, prompt, tokens, log_probs), (_, prompt_ref, tokens_ref, log_probs_ref) in zip(cached, plain, strict=True):
        assert prompt == prompt_ref and tokens == tokens_ref, i
        torch.testing.assert_close(torch.tensor(log_probs), torch.tensor(log_probs_ref), atol=1e-5, rtol=0)
        expected = teacher_forced_log_probs(tiny_lm, prompt, tokens, temperature)
        torch.testing.assert_close(torch.tensor(log_probs), expected, atol=1e-4, rtol=0)


def test_stored_kv_equals_a_fresh_forward(tiny_lm):
    """The K/V kept for the next turn (prompt columns from a per-row prefill on top of a reused prefix, then
    decode columns from a left-padded batch) are those of one forward over prompt + generated[:-1]."""
    cache = PrefixCache()
    _play(tiny_lm, cache, turns=2)
    for key in ("a", "b"):
        entry = cache._entries[key]
        with torch.no_grad():
            fresh = tiny_lm(entry.token_ids[None], use_cache=True).past_key_values
        for layer, (keys, values) in zip(fresh.layers, entry.kv, strict=True):
            torch.testing.assert_close(keys, layer.keys[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(values, layer.values[0], atol=1e-5, rtol=0)


def test_diverging_prefix_uses_the_common_part_and_generates_as_without_cache(tiny_lm):
    cache = PrefixCache()
    base = [5, 6, 7, 8, 9, 10, 11, 12]
    (first,) = generate_batch(tiny_lm, [GenerationRequest(base, 6, temperature=0.0)], [], 0, keep_kv=True)
    cache.store("x", first.cache)
    assert len(first.cache) == len(base) + 5  # prompt + every generated token but the last
    diverged = base[:4] + [30, 31, 32]
    prefix, _ = cache.lookup("x", diverged)
    assert len(prefix) == 4 and prefix.token_ids.tolist() == base[:4]
    (with_cache,) = generate_batch(tiny_lm, [GenerationRequest(diverged, 8, temperature=0.0)], [], 0, prefixes=[prefix])
    (without,) = generate_batch(tiny_lm, [GenerationRequest(diverged, 8, temperature=0.0)], [], 0)
    assert with_cache.token_ids == without.token_ids
    torch.testing.assert_close(torch.tensor(with_cache.log_probs), torch.tensor(without.log_probs), atol=1e-5, rtol=0)
    # the same prompt again (a retry) reuses all but its last token; nothing shared: no hit
    assert len(cache.lookup("x", base)[0]) == len(base) - 1
    assert cache.lookup("y", [50, 51, 52])[0] is None
    # another request id with the same beginning (GRPO's n samples of a prompt) shares it too
    assert len(cache.lookup("other", base + first.token_ids[:2] + [1])[0]) == len(base) + 2


def test_repetition_penalty_and_stop_strings_unchanged_by_the_cache(tiny_lm):
    def bracketed(ids: list[int]) -> str:
        return "".join(f"<{t}>" for t in ids)

    prompt = [5, 6, 7, 8, 9, 10]
    (probe,) = generate_batch(tiny_lm, [GenerationRequest(prompt, 10, temperature=0.0, repetition_penalty=1.3)], [], 0)
    stop = f"<{probe.token_ids[5]}>"
    request = GenerationRequest(prompt, 10, temperature=0.0, repetition_penalty=1.3, stop=(stop,))
    (plain,) = generate_batch(tiny_lm, [request], [], 0, decode=bracketed, keep_kv=True)
    prefix = CachedPrefix(plain.cache.token_ids[:4], plain.cache.kv[..., :4, :])
    (cached,) = generate_batch(tiny_lm, [request], [], 0, decode=bracketed, prefixes=[prefix])
    assert cached.token_ids == plain.token_ids and plain.stop_reason == cached.stop_reason == "completed"
    assert stop in bracketed(plain.token_ids) and plain.token_ids == probe.token_ids[: len(plain.token_ids)]
    # a short row padded next to a long one is penalised on its own tokens only (pad id 0 is not "seen")
    short = GenerationRequest([3, 4], 6, temperature=0.0, repetition_penalty=1.3)
    together = generate_batch(tiny_lm, [GenerationRequest(prompt * 3, 6, 0.0, repetition_penalty=1.3), short], [], 0)
    assert together[1].token_ids == generate_batch(tiny_lm, [short], [], 0)[0].token_ids


def _kv_prefix(n: int, width: int = 8) -> CachedPrefix:
    return CachedPrefix(torch.arange(n, dtype=torch.long), torch.zeros((2, 2, 1, n, width)))


def test_lru_respects_entry_and_byte_caps():
    one = _kv_prefix(10).nbytes
    cache = PrefixCache(max_bytes=3 * one, max_entries=2)
    for key in ("a", "b", "c"):
        assert cache.store(key, _kv_prefix(10))
    assert list(cache._entries) == ["b", "c"] and cache.stats["evictions"] == 1  # entry cap
    cache.lookup("b", list(range(12)))  # a hit makes "b" the most recently used
    cache.max_entries = 10
    assert cache.store("d", _kv_prefix(20))  # bytes: 1 + 1 + 2 entries' worth > 3: the LRU one ("c") goes
    assert list(cache._entries) == ["b", "d"] and cache.nbytes == 3 * one - _kv_prefix(10).nbytes + one
    assert cache.nbytes <= cache.max_bytes
    assert not cache.store("e", _kv_prefix(40))  # larger than the whole cache: not kept
    assert "e" not in cache._entries
    assert cache.store("b", _kv_prefix(5)) and len(cache) == 2  # a request's new turn replaces its entry
    epoch = cache.epoch
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    assert not cache.store("f", _kv_prefix(5), epoch)  # computed before the clear: stale
    assert common_prefix_len(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])) == 2


def test_config_switches_and_bounds():
    options = {"prefix_cache_mb": 2, "prefix_cache_entries": 3}
    cache = prefix_cache_from_config(SimpleNamespace(), options)
    assert cache is not None and cache.max_bytes == 2 << 20 and cache.max_entries == 3
    assert prefix_cache_from_config(SimpleNamespace(enable_prefix_caching=False), {}) is None
    assert prefix_cache_from_config(SimpleNamespace(full_determinism=True), {}) is None
    assert prefix_cache_from_config(SimpleNamespace(), {"prefix_cache_mb": 0}) is None
    with pytest.raises(ValueError, match="positive"):
        PrefixCache(max_bytes=0)


def _turns(server: HFGenerationServer, prompt: list[int], n: int) -> list[list[int]]:
    async def main():
        ids, outs = list(prompt), []
        for turn in range(n):
            out = await server.generate(request_id="ep", prompt_ids=ids, sampling_params={"temperature": 0.0})
            outs.append(list(out.token_ids))
            ids = ids + list(out.token_ids) + [50 + turn, 51]
        return outs

    return asyncio.run(main())


def test_server_reuses_per_request_and_drops_the_cache_on_weight_update(tiny_lm):
    model = copy.deepcopy(tiny_lm)
    server = server_on(model, 63, 8, PrefixCache())
    reference = server_on(copy.deepcopy(tiny_lm), 63, 8, None)
    assert _turns(server, [5, 6, 7], 3) == _turns(reference, [5, 6, 7], 3)
    stats = asyncio.run(server.get_stats())
    assert stats["prefix_cache_hits"] == 2 and stats["reused_tokens"] > stats["prefill_tokens"] / 2
    assert stats["prefix_cache_entries"] == 1 and stats["prefix_cache_bytes"] > 0

    new_state = {name: torch.randn_like(t) for name, t in tiny_lm.state_dict().items()}
    asyncio.run(server.update_weights(new_state, global_steps=1))
    asyncio.run(reference.update_weights(new_state, global_steps=1))
    assert len(server.prefix_cache) == 0 and server.prefix_cache.stats["clears"] == 1
    hits = server.prefix_cache.stats["hits"]
    # the same conversation again: nothing stale is reused, and the tokens are those of the new weights
    assert _turns(server, [5, 6, 7], 2) == _turns(reference, [5, 6, 7], 2)
    assert server.prefix_cache.stats["hits"] == hits + 1  # only its own second turn
    for control in (server.sleep, server.clear_kv_cache, server.release_kv_cache):
        _turns(server, [5, 6, 7], 1)
        asyncio.run(control())
        assert len(server.prefix_cache) == 0


def test_gqa_decode_attention_matches_sdpa(tiny_lm):
    """The rollout's decode attention (query heads folded onto their K/V head, no repeat_kv copy) gives
    the tokens and log-probs of transformers' SDPA, over a left-padded batch with a cached prefix."""
    from verl_selflock.verl_adapter.cpu.sampling import use_gqa_decode_attention

    folded = copy.deepcopy(tiny_lm)
    use_gqa_decode_attention(folded)
    assert tiny_lm.config._attn_implementation == "sdpa"
    played = {name: _play(model, PrefixCache()) for name, model in (("sdpa", tiny_lm), ("folded", folded))}
    for (_, _, tokens, log_probs), (_, _, tokens_ref, log_probs_ref) in zip(played["folded"], played["sdpa"]):
        assert tokens == tokens_ref
        torch.testing.assert_close(torch.tensor(log_probs), torch.tensor(log_probs_ref), atol=1e-5, rtol=0)
