"""Batched sampling with a transformers causal LM: requests in, tokens and log-probs out (no veRL, no Ray).

The generation core of the ``hf`` rollout (:mod:`verl_selflock.verl_adapter.cpu.generation_server`).
Semantics match the actor's ``old_log_prob`` so that rollout-correction metrics are meaningful:
log-probs are ``log_softmax(logits / temperature)`` of the sampled token, before top-k/top-p filtering
(vLLM's ``processed_logprobs``, veRL's default ``logprobs_mode``); ``temperature == 0`` means greedy
with log-probs of the raw logits. Generation stops at the eos tokens (kept in the output, as vLLM does)
unless ``ignore_eos``, after ``max_tokens`` tokens, and, as vLLM does with ``stop`` strings, at the
token whose text completes one of them (kept in ``token_ids``: vLLM trims a stop string from the
reply's *text* only, and ``include_stop_str_in_output`` keeps it there; the ids are the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class GenerationRequest:
    """One prompt to continue.

    Attributes:
        prompt_ids: prompt token ids, unpadded.
        max_tokens: most new tokens to generate (>= 1).
        temperature: 0 means greedy.
        top_p: nucleus mass in (0, 1]; 1 disables.
        top_k: keep the k most likely tokens; <= 0 disables.
        repetition_penalty: HF-style penalty (1 disables) over prompt and generated tokens.
        ignore_eos: keep generating past eos until ``max_tokens``.
        stop: strings that end the generation once the generated text contains one (vLLM's ``stop``).
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()


@dataclass
class GenerationResult:
    """Continuation of one :class:`GenerationRequest`.

    Attributes:
        token_ids: generated ids, (num_generated,), ending with the eos token when one was hit.
        log_probs: log-prob of each generated token, (num_generated,), see module docstring.
        stop_reason: ``"completed"`` (eos or a stop string) or ``"length"`` (hit ``max_tokens``).
    """

    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    stop_reason: str = "length"


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (set to -inf) tokens outside each row's top-k and nucleus.

    Args:
        logits: (bs, vocab), already temperature-scaled.
        top_k: (bs,) long; <= 0 disables the filter for that row.
        top_p: (bs,) float; >= 1 disables the filter for that row.
    """
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab)).unsqueeze(1)
    remove = ranks >= k
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    # remove a token when the mass of the tokens strictly before it already reaches top_p
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove |= (mass_before >= top_p.unsqueeze(1)) & (top_p.unsqueeze(1) < 1.0)
    remove[:, 0] = False  # always keep the most likely token
    mask = torch.zeros_like(remove).scatter(1, sorted_idx, remove)
    return logits.masked_fill(mask, float("-inf"))


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



def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> torch.nn.Module:
    """Load ``path`` as an eval-mode causal LM with SDPA attention on the CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
    )
    return model.eval()


def eos_token_ids_of(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Every id that ends a generation: the tokenizer's eos and the generation config's eos."""
    ids: set[int] = set()
    for source in (tokenizer, generation_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)

