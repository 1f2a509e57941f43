"""Prefix caching for the ``hf`` rollout: keep each conversation's KV cache from one turn to the next.

A multi-turn episode sends the server ``prompt_t+1 = prompt_t + kept part of turn t + closing tokens +
observation + next header`` under one ``request_id`` (our agent loop, veRL's tool loop). Without a
cache every turn re-runs the whole conversation through the model; with it, a turn only runs the
tokens after the longest prefix it shares with a cached sequence, as vLLM's automatic prefix caching
does. Reuse is exact by construction: a cached K/V column depends only on the tokens before it (causal
attention, positions 0..n-1), so the match is made on token ids, never on the request id alone.

* **Key.** Entries are stored under the request id (one per conversation: the next turn replaces the
  previous one); a lookup scans every entry for the longest common token prefix with the prompt, so a
  counterfactual branch, a diverging prefix (the agent loop cuts a turn after its closing tag, so the
  next prompt leaves the cached sequence there) or another episode with the same system prompt
  (GRPO's ``n`` samples) still reuse what they share. At least one prompt token is always recomputed,
  because sampling needs its logits.
* **Eviction.** LRU over entries, bounded by ``max_bytes`` and ``max_entries``; an entry larger than
  ``max_bytes`` is not kept.
* **Invalidation.** :meth:`PrefixCache.clear` drops everything and bumps an epoch, so that a batch that
  looked up entries before the clear cannot store K/V computed with old weights after it. The server
  clears on every weight bucket it loads and on ``sleep`` / ``clear_kv_cache`` / ``release_kv_cache``.

Config (``actor_rollout_ref.rollout``): veRL's ``enable_prefix_caching`` (default true) switches it,
``full_determinism=true`` switches it off (reused K/V come from another shape of computation, so a
turn's bits would depend on what was cached); ``engine_kwargs.hf.prefix_cache_mb`` (default 512) and
``engine_kwargs.hf.prefix_cache_entries`` (default 64) bound it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_MB = 512
"""Default byte cap: SmolLM2-135M keeps 45 KiB of fp32 K/V per token, so ~11k tokens (8 full
1,472-token PE-G conversations of the CPU smoke run)."""
DEFAULT_MAX_ENTRIES = 64

RowKV = list[tuple[torch.Tensor, torch.Tensor]]
"""One sequence's K/V, per layer: keys and values of shape (num_kv_heads, L, head_dim)."""


@dataclass(frozen=True)
class CachedPrefix:
    """The K/V of a token sequence, for one conversation (never modified in place: views are shared).

    Attributes:
        token_ids: (L,) long, the tokens whose K/V are held.
        kv: (num_layers, 2, num_kv_heads, L, head_dim): keys ([:, 0]) and values ([:, 1]) of every
            layer, RoPE already applied (as HF caches them), for positions 0..L-1.
    """

    token_ids: torch.Tensor
    kv: torch.Tensor

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.token_ids.numel() * self.token_ids.element_size()

    def crop(self, length: int) -> CachedPrefix:
        """The first ``length`` tokens (views, no copy)."""
        return CachedPrefix(self.token_ids[:length], self.kv[..., :length, :])


def common_prefix_len(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D id tensors."""
    n = min(a.shape[0], b.shape[0])
    differ = torch.nonzero(a[:n] != b[:n])
    return int(differ[0, 0]) if differ.numel() else n


class PrefixCache:
    """LRU of :class:`CachedPrefix` keyed by request id, looked up by longest common token prefix.

    Thread-safe: the server looks up and stores from its generation thread and clears from its event loop.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_MB << 20, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_bytes <= 0 or max_entries <= 0:
            raise ValueError(f"PrefixCache needs positive bounds, got max_bytes={max_bytes}, max_entries={max_entries}")
        self.max_bytes = int(max_bytes)
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[str, CachedPrefix] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.epoch = 0
        self.stats = {"lookups": 0, "hits": 0, "reused_tokens": 0, "evictions": 0, "clears": 0}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def lookup(self, request_id: str, prompt_ids: Sequence[int]) -> tuple[CachedPrefix | None, int]:
        """The longest cached prefix of ``prompt_ids`` (shorter than the prompt), and the current epoch.

        Ties go to the entry of ``request_id``. A hit becomes the most recently used entry.
        """
        prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long)
        limit = prompt.shape[0] - 1  # the last prompt token is always run: its logits pick the first token
        with self._lock:
            self.stats["lookups"] += 1
            best_key, best_len = None, 0
            for key, entry in self._entries.items():
                n = min(common_prefix_len(entry.token_ids, prompt), limit)
                if n > best_len or (n == best_len and n > 0 and key == request_id):
                    best_key, best_len = key, n
            if best_key is None:
                return None, self.epoch
            self._entries.move_to_end(best_key)
            self.stats["hits"] += 1
            self.stats["reused_tokens"] += best_len
            return self._entries[best_key].crop(best_len), self.epoch

    def store(self, request_id: str, prefix: CachedPrefix, epoch: int | None = None) -> bool:
        """Keep ``prefix`` as ``request_id``'s entry (replacing its previous one), then evict LRU entries
        until both bounds hold. False (nothing kept) if ``epoch`` is stale or the entry alone is too big."""
        with self._lock:
            if epoch is not None and epoch != self.epoch:
                return False
            old = self._entries.pop(request_id, None)
            if old is not None:
                self._bytes -= old.nbytes
            if prefix.nbytes > self.max_bytes or len(prefix) == 0:
                return False
            self._entries[request_id] = prefix
            self._bytes += prefix.nbytes
            while self._bytes > self.max_bytes or len(self._entries) > self.max_entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.stats["evictions"] += 1
            return True

    def clear(self) -> None:
        """Drop every entry (new weights make every cached K/V stale) and start a new epoch."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.epoch += 1
            self.stats["clears"] += 1


def prefix_cache_from_config(config: Any, options: Mapping[str, Any]) -> PrefixCache | None:
    """The server's cache from the rollout config and its ``engine_kwargs.hf`` options; None when off.

    Args:
        config: ``actor_rollout_ref.rollout`` (reads ``enable_prefix_caching``, ``full_determinism``).
        options: ``engine_kwargs.hf`` (reads ``prefix_cache_mb``, ``prefix_cache_entries``).
    """
    if not bool(getattr(config, "enable_prefix_caching", True)):
        return None
    if bool(getattr(config, "full_determinism", False)):
        logger.warning("hf rollout: full_determinism=true turns prefix caching off")
        return None
    max_mb = float(options.get("prefix_cache_mb", DEFAULT_MAX_MB))
    max_entries = int(options.get("prefix_cache_entries", DEFAULT_MAX_ENTRIES))
    if max_mb <= 0 or max_entries <= 0:
        return None
    return PrefixCache(max_bytes=int(max_mb * (1 << 20)), max_entries=max_entries)


# -- between CachedPrefix and transformers' DynamicCache ------------------------------------------
def dynamic_cache_of(prefix: CachedPrefix | None) -> Any:
    """A batch-of-one ``DynamicCache`` holding ``prefix`` (an empty one for None)."""
    from transformers import DynamicCache

    if prefix is None or len(prefix) == 0:
        return DynamicCache()
    # DynamicLayer.update concatenates into new tensors, so the shared views are never written.
    return DynamicCache(ddp_cache_data=[(layer[0][None], layer[1][None]) for layer in prefix.kv])


def reusable_layers(cache: Any) -> bool:
    """True when every layer of ``cache`` is a plain full-attention ``DynamicLayer`` (K/V columns are
    positions, so a prefix of them is the K/V of a prefix of tokens); sliding, quantised or linear
    attention layers are not reused."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    full = (DynamicLayer, preallocated_layer_class())
    return bool(layers) and all(type(layer) in full and layer.is_initialized for layer in layers)


def row_kv(cache: Any, row: int = 0, start: int = 0, stop: int | None = None) -> RowKV:
    """Row ``row``'s K/V columns ``start:stop`` of a ``DynamicCache``, per layer (views, no copy)."""
    return [(layer.keys[row, :, start:stop], layer.values[row, :, start:stop]) for layer in cache.layers]


def prefix_of(token_ids: Sequence[int], parts: Sequence[RowKV]) -> CachedPrefix:
    """A :class:`CachedPrefix` of ``token_ids`` from consecutive column ranges of one row (one copy)."""
    kv = torch.stack(
        [
            torch.stack((torch.cat([p[i][0] for p in parts], dim=-2), torch.cat([p[i][1] for p in parts], dim=-2)))
            for i in range(len(parts[0]))
        ]
    )
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if kv.shape[-2] != ids.shape[0]:
        raise ValueError(f"prefix_of: {ids.shape[0]} tokens but {kv.shape[-2]} K/V columns")
    return CachedPrefix(ids, kv)


@functools.cache
def preallocated_layer_class() -> type:
    """The cache layer of the decode phase (defined on first use: transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class _PreallocatedLayer(DynamicLayer):
        """A ``DynamicLayer`` whose K/V live in buffers sized for the whole generation: a decode step
        writes one column instead of re-concatenating the whole cache (``DynamicLayer.update``'s
        ``torch.cat`` copies all K/V of every layer at every step: at 1,000+ cached tokens that costs
        as much as the rest of a CPU decode step). ``keys`` / ``values`` are views of the filled part."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
            super().__init__()
            self._keys_buffer, self._values_buffer, self._length = keys, values, length
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            end = self._length + key_states.shape[-2]
            if end > self._keys_buffer.shape[-2]:  # more than planned: grow by doubling (amortised O(1))
                batch, heads, _, head_dim = self._keys_buffer.shape
                grown = self._keys_buffer.new_empty((batch, heads, 2 * end, head_dim))
                grown_values = torch.empty_like(grown)
                grown[:, :, : self._length] = self.keys
                grown_values[:, :, : self._length] = self.values
                self._keys_buffer, self._values_buffer = grown, grown_values
            self._keys_buffer[:, :, self._length : end] = key_states
            self._values_buffer[:, :, self._length : end] = value_states
            self._length = end
            self.keys, self.values = self._keys_buffer[:, :, :end], self._values_buffer[:, :, :end]
            return self.keys, self.values

    return _PreallocatedLayer


def batch_cache_of(rows: Sequence[RowKV], extra: int = 0) -> tuple[Any, torch.Tensor]:
    """One left-padded batch ``DynamicCache`` from per-row K/V, and its (bs, W) attention mask.

    Args:
        rows: per row, per layer, keys and values of shape (heads, L_i, head_dim).
        extra: columns to reserve for the decode steps (appending beyond them still works).

    Returns:
        The cache, with row i's K/V in the last L_i of W = max L_i columns (zeros before them; masked),
        and the long mask that is 1 on those columns. The same layout as a left-padded batched prefill.
    """
    from transformers import DynamicCache

    layer_class = preallocated_layer_class()
    lengths = [row[0][0].shape[-2] for row in rows]
    width = max(lengths)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=rows[0][0][0].device)
    cache = DynamicCache()
    for i in range(len(rows[0])):
        heads, _, head_dim = rows[0][i][0].shape
        keys = rows[0][i][0].new_zeros((len(rows), heads, width + extra, head_dim))
        values = torch.zeros_like(keys)
        for r, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            keys[r, :, width - length : width] = row[i][0]
            values[r, :, width - length : width] = row[i][1]
        cache.layers.append(layer_class(keys, values, width))
    for r, length in enumerate(lengths):
        mask[r, width - length :] = 1
    return cache, mask
