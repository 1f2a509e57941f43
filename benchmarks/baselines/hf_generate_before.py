"""The CPU rollout's decoding loop as it was before the prefix cache (commit d01a161, 2026-12-06).

Kept only as the baseline of ``benchmarks/bench_hf_rollout.py`` ("before"): every request re-prefills its
whole prompt, the prefill computes logits at every position, the KV cache grows by concatenation and
lives for one batch, and attention is plain sdpa (no grouped-query folding at decode). Same requests,
results and sampling semantics as :func:`verl_selflock.verl_adapter.cpu.sampling.generate_batch`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from verl_selflock.verl_adapter.cpu.sampling import GenerationRequest, GenerationResult, filter_top_k_top_p


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    requests: Sequence[GenerationRequest],
    eos_token_ids: Iterable[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> list[GenerationResult]:
    """Decode several prompts together: left padding, one KV cache, per-row sampling settings.

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids, past_key_values)``).
        requests: prompts and their sampling settings.
        eos_token_ids: ids that end a sequence (kept in the output).
        pad_token_id: id used to pad prompts on the left and finished rows.
        generator: RNG for sampling (None: torch's default generator).
        decode: token ids -> text, for requests with ``stop`` strings (required when any has them).

    Returns:
        One :class:`GenerationResult` per request, in order.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    bs = len(requests)
    prompt_lens = [len(r.prompt_ids) for r in requests]
    width = max(prompt_lens)
    input_ids = torch.full((bs, width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((bs, width), dtype=torch.long, device=device)
    for row, request in enumerate(requests):
        input_ids[row, width - prompt_lens[row] :] = torch.tensor(request.prompt_ids, dtype=torch.long)
        attention_mask[row, width - prompt_lens[row] :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    temperature = torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=device)
    greedy = temperature <= 0
    top_k = torch.tensor([r.top_k for r in requests], dtype=torch.long, device=device)
    top_p = torch.tensor([r.top_p for r in requests], dtype=torch.float32, device=device)
    penalty = torch.tensor([r.repetition_penalty for r in requests], dtype=torch.float32, device=device)
    use_penalty = bool((penalty != 1.0).any())
    max_tokens = torch.tensor([r.max_tokens for r in requests], dtype=torch.long, device=device)
    stops_at_eos = torch.tensor([not r.ignore_eos for r in requests], dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)

    results = [GenerationResult() for _ in requests]
    if any(r.stop for r in requests) and decode is None:
        raise ValueError("generate_batch: requests with stop strings need a decode function")
    # Text of the last few tokens is enough to see a stop string complete: each token adds >= 1 character.
    stop_window = [2 * max(map(len, r.stop)) + 2 if r.stop else 0 for r in requests]
    finished = torch.zeros(bs, dtype=torch.bool, device=device)
    seen = input_ids.clone() if use_penalty else None  # tokens for the repetition penalty
    cache = DynamicCache()
    step_input, step_positions = input_ids, position_ids
    for step in range(int(max_tokens.max())):
        out = model(
            input_ids=step_input,
            attention_mask=attention_mask,
            position_ids=step_positions,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        if use_penalty:
            scores = logits.gather(1, seen)
            scores = torch.where(scores > 0, scores / penalty[:, None], scores * penalty[:, None])
            logits = logits.scatter(1, seen, scores)
        scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
        log_probs = torch.log_softmax(scaled, dim=-1)
        filtered = filter_top_k_top_p(scaled, top_k, top_p)
        sampled = torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=generator).squeeze(1)
        next_tokens = torch.where(greedy, scaled.argmax(dim=-1), sampled)
        next_log_probs = log_probs.gather(1, next_tokens[:, None]).squeeze(1)

        hit_stop = torch.zeros(bs, dtype=torch.bool, device=device)
        for row in torch.nonzero(~finished).flatten().tolist():
            results[row].token_ids.append(int(next_tokens[row]))
            results[row].log_probs.append(float(next_log_probs[row]))
            if stop_window[row]:
                tail = decode(results[row].token_ids[-stop_window[row] :])
                hit_stop[row] = any(text in tail for text in requests[row].stop)
        hit_eos = (torch.isin(next_tokens, eos) & stops_at_eos) | hit_stop
        for row in torch.nonzero(hit_eos & ~finished).flatten().tolist():
            results[row].stop_reason = "completed"
        finished |= hit_eos | (max_tokens <= step + 1)
        if bool(finished.all()):
            break

        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        step_input = next_tokens[:, None]
        step_positions = step_positions[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=1)
        if use_penalty:
            seen = torch.cat([seen, next_tokens[:, None]], dim=1)
    return results

