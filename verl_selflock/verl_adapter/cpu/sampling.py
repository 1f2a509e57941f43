"""Batched sampling with a transformers causal LM: requests in, tokens and log-probs out (no veRL, no Ray).

The generation core of the ``hf`` rollout (:mod:`verl_selflock.verl_adapter.cpu.generation_server`).
Semantics match the actor's ``old_log_prob`` so that rollout-correction metrics are meaningful:
log-probs are ``log_softmax(logits / temperature)`` of the sampled token, before top-k/top-p filtering
(vLLM's ``processed_logprobs``, veRL's default ``logprobs_mode``); ``temperature == 0`` means greedy
with log-probs of the raw logits. Generation stops at the eos tokens (kept in the output, as vLLM does)
unless ``ignore_eos``, after ``max_tokens`` tokens, and, as vLLM does with ``stop`` strings, at the
token whose text completes one of them (kept in ``token_ids``: vLLM trims a stop string from the
reply's *text* only, and ``include_stop_str_in_output`` keeps it there; the ids are the same).

A request can come with the K/V of a prefix of its prompt (the conversation's previous turn,
:mod:`~verl_selflock.verl_adapter.cpu.prefix_cache`): only the rest of the prompt is run, and the tokens
and log-probs are those of a full prefill up to float rounding (~1e-6).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from verl_selflock.verl_adapter.cpu.packed_linear import use_packed_linears
from verl_selflock.verl_adapter.cpu.prefix_cache import (
    CachedPrefix,
    batch_cache_of,
    dynamic_cache_of,
    prefix_of,
    reusable_layers,
    row_kv,
)
from verl_selflock.verl_adapter.cpu.speculation import NgramSpeculation, accept_drafts


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
        cache: with ``generate_batch(keep_kv=True)``, the K/V of ``prompt_ids + token_ids[:-1]``.
        drafted: draft tokens checked for this request (speculative decoding; 0 without).
        accepted: draft tokens it emitted.
    """

    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    stop_reason: str = "length"
    cache: CachedPrefix | None = field(default=None, repr=False)
    drafted: int = 0
    accepted: int = 0


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


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    requests: Sequence[GenerationRequest],
    eos_token_ids: Iterable[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    decode: Callable[[list[int]], str] | None = None,
    prefixes: Sequence[CachedPrefix | None] | None = None,
    keep_kv: bool = False,
    speculation: NgramSpeculation | None = None,
) -> list[GenerationResult]:
    """Decode several prompts together: per-row prefill, then one left-padded KV cache, per-row settings.

    Each prompt is prefilled on its own (after the part of it that ``prefixes`` already holds): a batch
    mixing a 1,000-token first turn with a 60-token continuation pads nothing, and large prefills keep
    the matmuls busy at batch size 1. The rows' caches are then laid out left-padded, as a batched
    prefill would leave them, and decoded together (decoding is where batching pays on a CPU).

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids, past_key_values)``) whose
            cache is transformers' ``DynamicCache`` of full-attention layers.
        requests: prompts and their sampling settings.
        eos_token_ids: ids that end a sequence (kept in the output).
        pad_token_id: id fed to finished rows.
        generator: RNG for sampling (None: torch's default generator).
        decode: token ids -> text, for requests with ``stop`` strings (required when any has them).
        prefixes: per request, None or the K/V of a strict prefix of its ``prompt_ids``
            (:meth:`~verl_selflock.verl_adapter.cpu.prefix_cache.PrefixCache.lookup`); only the rest is run.
        keep_kv: set each result's ``cache`` to the K/V of ``prompt_ids + token_ids[:-1]`` (the last
            token was never fed to the model), for the next turn.
        speculation: draft tokens from each row's own sequence, checked several per forward
            (:mod:`~verl_selflock.verl_adapter.cpu.speculation`: the same tokens when greedy, the same
            distribution when sampling); None decodes one token per step. Ignored under a repetition penalty.

    Returns:
        One :class:`GenerationResult` per request, in order.
    """
    device = next(model.parameters()).device
    bs = len(requests)
    prompt_lens = [len(r.prompt_ids) for r in requests]
    if min(prompt_lens) == 0:
        raise ValueError("generate_batch: every request needs at least one prompt token")
    if any(r.stop for r in requests) and decode is None:
        raise ValueError("generate_batch: requests with stop strings need a decode function")

    # 1. prefill row by row, after its cached prefix; only the last position's logits are needed (the
    # LM head over every prompt position is ~20% of a SmolLM2 prefill)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    first_logits, prompt_kv = [], []
    for row, request in enumerate(requests):
        prefix = prefixes[row] if prefixes is not None else None
        start = len(prefix) if prefix is not None else 0
        ids = torch.tensor([request.prompt_ids[start:]], dtype=torch.long, device=device)
        positions = torch.arange(start, prompt_lens[row], device=device)[None]
        past = dynamic_cache_of(prefix)
        out = model(input_ids=ids, position_ids=positions, past_key_values=past, use_cache=True, **last_only)
        if not reusable_layers(out.past_key_values):
            raise NotImplementedError("the hf rollout needs a model whose KV cache is a DynamicCache of full layers")
        first_logits.append(out.logits[0, -1].float())
        prompt_kv.append(row_kv(out.past_key_values))
    max_steps = max(r.max_tokens for r in requests)
    cache, attention_mask = batch_cache_of(prompt_kv, extra=max_steps)
    width = attention_mask.shape[1]

    temperature = torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=device)
    greedy = temperature <= 0
    top_k = torch.tensor([r.top_k for r in requests], dtype=torch.long, device=device)
    top_p = torch.tensor([r.top_p for r in requests], dtype=torch.float32, device=device)
    penalty = torch.tensor([r.repetition_penalty for r in requests], dtype=torch.float32, device=device)
    use_penalty = bool((penalty != 1.0).any())
    samples = bool((~greedy).any())
    filters = bool(((top_k > 0) | (top_p < 1.0)).any())
    eos_ids = {int(t) for t in eos_token_ids}

    results = [GenerationResult() for _ in requests]
    # Text of the last few tokens is enough to see a stop string complete: each token adds >= 1 character.
    stop_window = [2 * max(map(len, r.stop)) + 2 if r.stop else 0 for r in requests]
    finished = torch.zeros(bs, dtype=torch.bool, device=device)
    # (bs, vocab) tokens seen so far, for the repetition penalty (HF's processor penalises each seen id once)
    seen = None
    if use_penalty:
        seen = torch.zeros((bs, first_logits[0].shape[-1]), dtype=torch.bool, device=device)
        for row, request in enumerate(requests):
            seen[row, torch.tensor(request.prompt_ids, dtype=torch.long, device=device)] = True
        speculation = None  # the penalty of a draft position depends on the drafts before it
    logits = torch.stack(first_logits)[:, None]  # (bs, Q, vocab): Q fed positions, 1 after the prefill
    lengths = torch.tensor(prompt_lens, dtype=torch.long, device=device)  # prompt + generated tokens per row
    step_input = torch.full((bs, 1), pad_token_id, dtype=torch.long, device=device)  # last emitted token
    drafts = torch.zeros((bs, 0), dtype=torch.long, device=device)
    draft_lens = torch.zeros(bs, dtype=torch.long, device=device)
    divisor = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None, None]
    # 2. sample from the prefill's logits, then feed each row's last token (and its draft) per step
    for step in range(max_steps):  # every step emits at least one token per unfinished row
        if step > 0:
            fed = torch.cat([step_input, drafts], dim=1)  # (bs, Q)
            offsets = torch.arange(fed.shape[1], device=device)
            # columns of finished rows and beyond a row's draft are masked (holes, skipped by attention)
            columns = (~finished)[:, None] & (offsets[None] <= draft_lens[:, None])
            attention_mask = torch.cat([attention_mask, columns.long()], dim=1)
            out = model(
                input_ids=fed,
                attention_mask=attention_mask,
                position_ids=(lengths - 1)[:, None] + offsets,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits.float()
        if use_penalty:
            penalised = torch.where(logits > 0, logits / penalty[:, None, None], logits * penalty[:, None, None])
            logits = torch.where(seen[:, None], penalised, logits)
        scaled = logits / divisor
        log_probs = torch.log_softmax(scaled, dim=-1)
        probs = None
        if samples:
            # a sort of the vocabulary per step only when some row filters (vLLM skips it likewise)
            if filters:
                q_len = scaled.shape[1]
                flat = filter_top_k_top_p(
                    scaled.flatten(0, 1), top_k.repeat_interleave(q_len), top_p.repeat_interleave(q_len)
                )
                probs = torch.softmax(flat, dim=-1).view_as(scaled)
            else:
                probs = log_probs.exp()
        tokens, num_emitted = accept_drafts(scaled, probs, drafts, draft_lens, greedy, generator)
        token_log_probs = log_probs.gather(2, tokens[..., None]).squeeze(2)

        # emit row by row, token by token: eos, stop strings and max_tokens may end a row inside its draft
        taken = [0] * bs
        emitted, emitted_log_probs, counts = tokens.tolist(), token_log_probs.tolist(), num_emitted.tolist()
        for row in torch.nonzero(~finished).flatten().tolist():
            result, request = results[row], requests[row]
            for token, log_prob in zip(emitted[row][: counts[row]], emitted_log_probs[row][: counts[row]]):
                result.token_ids.append(token)
                result.log_probs.append(log_prob)
                taken[row] += 1
                hit_stop = bool(stop_window[row]) and any(
                    text in decode(result.token_ids[-stop_window[row] :]) for text in request.stop
                )
                if hit_stop or (token in eos_ids and not request.ignore_eos):
                    result.stop_reason = "completed"
                if result.stop_reason == "completed" or len(result.token_ids) >= request.max_tokens:
                    finished[row] = True
                    break
            if use_penalty:
                seen[row, result.token_ids[-1]] = True
        num_taken = torch.tensor(taken, dtype=torch.long, device=device)
        if step > 0:
            # the fed columns a row keeps: its last token and the drafts it emitted before the final one
            attention_mask[:, -fed.shape[1] :] *= (offsets[None] < num_taken[:, None]).long()
            for row, drafted in enumerate(draft_lens.tolist()):
                results[row].drafted += drafted
                results[row].accepted += min(taken[row], counts[row] - 1)
        lengths += num_taken
        if bool(finished.all()):
            break

        last = tokens.gather(1, (num_taken - 1).clamp(min=0)[:, None])
        step_input = torch.where(finished[:, None], torch.full_like(last, pad_token_id), last)
        drafts, draft_lens = _next_drafts(speculation, requests, results, finished, pad_token_id, device)

    # 3. each row's K/V for its next turn: the prompt's, then the generated tokens that were fed back
    if keep_kv:
        for row, (request, result) in enumerate(zip(requests, results, strict=True)):
            kept = width + torch.nonzero(attention_mask[row, width:]).flatten()  # fed, not masked: no holes
            if kept.numel() != len(result.token_ids) - 1:
                raise RuntimeError(f"generate_batch: row {row} kept {kept.numel()} columns for {len(result.token_ids)} tokens")
            decoded = [(layer.keys[row][:, kept], layer.values[row][:, kept]) for layer in cache.layers]
            parts = [prompt_kv[row]] + ([decoded] if kept.numel() else [])
            result.cache = prefix_of(request.prompt_ids + result.token_ids[:-1], parts)
    return results


def _next_drafts(
    speculation: NgramSpeculation | None,
    requests: Sequence[GenerationRequest],
    results: Sequence[GenerationResult],
    finished: torch.Tensor,
    pad_token_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unfinished row's draft for the next forward, right-padded: (bs, D) tokens and (bs,) lengths.

    A draft never runs past the row's ``max_tokens`` (the forward emits it plus one more token)."""
    bs = len(requests)
    proposals: list[list[int]] = [[] for _ in range(bs)]
    if speculation is not None:
        for row in torch.nonzero(~finished).flatten().tolist():
            request, result = requests[row], results[row]
            room = request.max_tokens - len(result.token_ids) - 1
            if room > 0:
                sequence = torch.tensor(request.prompt_ids + result.token_ids, dtype=torch.long)
                proposals[row] = speculation.propose(sequence, room)
    width = max(map(len, proposals))
    drafts = torch.full((bs, width), pad_token_id, dtype=torch.long, device=device)
    for row, proposal in enumerate(proposals):
        if proposal:
            drafts[row, : len(proposal)] = torch.tensor(proposal, dtype=torch.long, device=device)
    return drafts, torch.tensor([len(p) for p in proposals], dtype=torch.long, device=device)


GQA_DECODE_ATTENTION = "selflock_sdpa_gqa_decode"
"""Attention implementation of the rollout's model: transformers' SDPA, except for short queries."""
MAX_FOLDED_QUERY = 16
"""Longest query (a decode token and its draft) whose heads are folded onto their K/V heads."""


def _sdpa_gqa_decode(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA for decode steps without copying K/V per query head.

    With a padding mask, transformers' SDPA path repeats K/V (batch, kv_heads, L, head_dim) n_rep times
    to match the query heads at every layer and step (``repeat_kv``): an O(L) copy that dominates a CPU
    decode step at 1,000 cached tokens. For a short query (one token, or a speculative draft) the n_rep
    query heads that share a K/V head are instead laid along the query-length axis, (batch, heads, q, d)
    -> (batch, kv_heads, n_rep * q, d) (head h reads K/V head h // n_rep, as in ``repeat_kv``), with the
    (batch, 1, q, L) mask repeated n_rep times along its query axis: the same products, no K/V copied.
    Longer queries (prefill), and a multi-token query without an explicit mask, take transformers' path.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_rep = int(getattr(module, "num_key_value_groups", 1))
    batch, heads, q_len, head_dim = query.shape
    explicit = attention_mask is not None and attention_mask.shape[-2] == q_len
    if n_rep == 1 or q_len > MAX_FOLDED_QUERY or not (explicit or (q_len == 1 and attention_mask is None)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    grouped = query.reshape(batch, heads // n_rep, n_rep * q_len, head_dim)
    mask = attention_mask
    if mask is not None:
        mask = mask[..., : key.shape[-2]]
        mask = mask.repeat(1, 1, n_rep, 1) if q_len > 1 else mask
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=kwargs.get("scaling"))
    # transformers' layout: (batch, q_len, heads, head_dim)
    return out.reshape(batch, heads, q_len, head_dim).transpose(1, 2).contiguous(), None


def use_gqa_decode_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` (loaded with SDPA attention) to :func:`_sdpa_gqa_decode`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_DECODE_ATTENTION, _sdpa_gqa_decode)
    AttentionMaskInterface.register(GQA_DECODE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(GQA_DECODE_ATTENTION)


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> torch.nn.Module:
    """Load ``path`` as an eval-mode causal LM with SDPA attention on the CPU: decode steps without
    K/V copies (:func:`use_gqa_decode_attention`) and with oneDNN-packed weights
    (:func:`~verl_selflock.verl_adapter.cpu.packed_linear.use_packed_linears`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
    )
    use_gqa_decode_attention(model)
    use_packed_linears(model)
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
