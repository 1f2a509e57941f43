"""The ``hf`` rollout's generation server: a Ray actor that batches concurrent requests for one model.

The agent loops talk to it through ``LLMServerClient.generate`` (``workers/rollout/llm_server.py:150``)
exactly as to veRL's vLLM/SGLang servers: ``generate(request_id, prompt_ids, sampling_params, ...) ->
TokenOutput`` with token ids and per-token log-probs (:mod:`~verl_selflock.verl_adapter.cpu.sampling`).
Concurrent requests are gathered into one batch: each prompt is prefilled on its own, then all are
decoded together with one left-padded KV cache (on 2 cores, batching the decode is where the speed is).
Each conversation's KV cache is kept for its next turn (:mod:`~verl_selflock.verl_adapter.cpu.prefix_cache`:
LRU keyed by request id, matched on the longest common token prefix), so a turn only runs the tokens
after what it shares with the previous one. The trainer's weights arrive through
:meth:`HFGenerationServer.load_weights` (from
:class:`~verl_selflock.verl_adapter.cpu.hf_rollout.HFServerAdapter`), which drops that cache, as do
``sleep``, ``clear_kv_cache`` and ``release_kv_cache``; the other control methods are no-ops.

``max_tokens`` of a request is ``min(rollout.response_length, max_tokens)``, where ``max_tokens`` (or
``max_new_tokens``) is taken from the request when given, else veRL's default ``prompt_length +
response_length - len(prompt)``.

Options under ``actor_rollout_ref.rollout.engine_kwargs.hf`` (all optional; ``+`` prefix needed):
``dtype`` (default ``float32``: faster than bf16 on most CPUs and closer to the trainer's
log-probs), ``max_batch_size`` (default ``rollout.max_num_seqs``), ``batch_wait_ms`` (default 20:
how long the server waits for concurrent requests before it starts a batch), ``num_threads``
(default 1, or ``VERL_SELFLOCK_CPU_THREADS``: on a busy 2-core machine more threads are slower),
``prefix_cache_mb`` (default 512) and ``prefix_cache_entries`` (default 64): bounds of the prefix
cache, which veRL's ``rollout.enable_prefix_caching`` (default true) switches and
``rollout.full_determinism`` turns off; ``speculative_config`` (default none): vLLM's n-gram speculative
decoding keys, ``{method: ngram, num_speculative_tokens: K, prompt_lookup_max: 3, prompt_lookup_min: 1}``
(:mod:`~verl_selflock.verl_adapter.cpu.speculation`: exact, several tokens per forward when the agent
repeats itself). An unknown key is an error (:func:`check_hf_engine_options`, also run on the driver).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import torch
from verl.workers.rollout.replica import TokenOutput

from verl_selflock.verl_adapter.cpu.engine_options import check_hf_engine_options
from verl_selflock.verl_adapter.cpu.prefix_cache import PrefixCache, prefix_cache_from_config
from verl_selflock.verl_adapter.cpu.sampling import (
    GenerationRequest,
    GenerationResult,
    eos_token_ids_of,
    generate_batch,
    load_causal_lm,
)
from verl_selflock.verl_adapter.cpu.selection import ROLLOUT_NAME, THREADS_ENV

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

SERVER_NAME_PREFIX = "hf_server_"
"""Ray actor names of the servers: ``hf_server_[reward_|teacher_]{replica_rank}_0{suffix}``."""


def _engine_kwargs(config: Any) -> dict[str, Any]:
    kwargs = getattr(config, "engine_kwargs", None) or {}
    return dict(kwargs.get(ROLLOUT_NAME, None) or {})


class HFGenerationServer:
    """Ray actor (async, created by :class:`HFReplica`) that generates with a transformers model.

    Requests arriving while a batch runs are queued and decoded together in the next batch; the
    model runs in a worker thread so the actor keeps accepting requests. One asyncio lock orders
    batches and weight updates.
    """

    prefix_cache: PrefixCache | None = None
    """Each conversation's K/V from its previous turn; None: every turn prefills its whole prompt."""

    def __init__(self, config: Any, model_config: Any, replica_rank: int = 0) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.model_config = model_config
        self.replica_rank = replica_rank
        options = _engine_kwargs(config)
        self.speculation = check_hf_engine_options(options)
        torch.set_num_threads(int(options.get("num_threads", os.environ.get(THREADS_ENV, 1))))
        self.dtype = getattr(torch, str(options.get("dtype", "float32")))
        self.max_batch_size = int(options.get("max_batch_size", getattr(config, "max_num_seqs", 64) or 64))
        self.batch_wait_s = float(options.get("batch_wait_ms", 20)) / 1000.0

        path = getattr(model_config, "local_path", None) or model_config.path
        trust = bool(getattr(model_config, "trust_remote_code", False))
        self.model = load_causal_lm(path, self.dtype, trust)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids_of(tokenizer, getattr(self.model, "generation_config", None))
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        self.generator = torch.Generator().manual_seed(int(getattr(config, "seed", 0)) + replica_rank)
        self.prefix_cache = prefix_cache_from_config(config, options)

        self.global_steps: int | None = None
        self._pending_names: set[str] = set()
        self._pending_unexpected: list[str] = []
        self._queue: list[tuple[str, GenerationRequest, asyncio.Future]] = []
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None
        self.stats = {"requests": 0, "batches": 0, "tokens": 0, "generate_s": 0.0, "weight_updates": 0}
        self.stats.update(prefill_tokens=0, reused_tokens=0, draft_tokens=0, accepted_draft_tokens=0)

    # -- request handling -----------------------------------------------------------------------
    def _request_from(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> GenerationRequest:
        cfg = self.config
        params = dict(sampling_params or {})
        budget = cfg.prompt_length + cfg.response_length - len(prompt_ids)
        requested = params.get("max_tokens", params.get("max_new_tokens"))
        max_tokens = min(cfg.response_length, budget if requested is None else int(requested))
        if getattr(cfg, "max_model_len", None):
            max_tokens = min(max_tokens, int(cfg.max_model_len) - len(prompt_ids))
        top_k = params.get("top_k", -1)
        stop = params.get("stop") or ()
        return GenerationRequest(
            prompt_ids=[int(t) for t in prompt_ids],
            max_tokens=max(1, int(max_tokens)),
            temperature=float(params.get("temperature", cfg.temperature)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=int(top_k if top_k is not None else -1),
            repetition_penalty=float(params.get("repetition_penalty", getattr(cfg, "repetition_penalty", 1.0))),
            ignore_eos=bool(params.get("ignore_eos", getattr(cfg, "ignore_eos", False))),
            stop=(stop,) if isinstance(stop, str) else tuple(str(text) for text in stop if text),
        )

    def _ensure_loop_objects(self) -> None:
        # Created lazily inside the actor's event loop (and again if called from a new loop).
        loop = asyncio.get_running_loop()
        if self._lock is None or getattr(self, "_loop", None) is not loop:
            self._loop = loop
            self._lock = asyncio.Lock()
            self._wakeup = asyncio.Event()
            self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ) -> TokenOutput:
        """Continue ``prompt_ids``; the interface of veRL's vLLM/SGLang servers."""
        if image_data is not None or video_data is not None:
            raise NotImplementedError("the hf rollout is text-only")
        self._ensure_loop_objects()
        request = self._request_from(prompt_ids, sampling_params)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((str(request_id), request, future))
        self._wakeup.set()
        result: GenerationResult = await future
        return TokenOutput(
            token_ids=result.token_ids,
            log_probs=result.log_probs,
            stop_reason=result.stop_reason if result.stop_reason == "completed" else None,
            extra_fields={"global_steps": self.global_steps},
        )

    async def _batch_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await asyncio.sleep(self.batch_wait_s)  # let concurrent requests arrive
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch_size], self._queue[self.max_batch_size :]
                requests = [(request_id, request) for request_id, request, _ in batch]
                try:
                    async with self._lock:
                        started = time.perf_counter()
                        results = await asyncio.to_thread(self._run_batch, requests)
                        self.stats["generate_s"] += time.perf_counter() - started
                except Exception as error:  # noqa: BLE001  (hand the failure to every waiting caller)
                    logger.exception("hf rollout batch failed")
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                self.stats["batches"] += 1
                self.stats["requests"] += len(batch)
                for (_, _, future), result in zip(batch, results, strict=True):
                    self.stats["tokens"] += len(result.token_ids)
                    if not future.done():
                        future.set_result(result)

    def _run_batch(self, batch: list[tuple[str, GenerationRequest]]) -> list[GenerationResult]:
        """Generate for ``(request_id, request)`` pairs, reusing and then updating the prefix cache."""
        cache = self.prefix_cache
        requests = [request for _, request in batch]
        prefixes, epoch = None, None
        if cache is not None:
            found = [cache.lookup(request_id, request.prompt_ids) for request_id, request in batch]
            prefixes, epoch = [prefix for prefix, _ in found], found[0][1]
        results = generate_batch(
            self.model,
            requests,
            self.eos_token_ids,
            self.pad_token_id,
            self.generator,
            decode=self._decode,
            prefixes=prefixes,
            keep_kv=cache is not None,
            speculation=self.speculation,
        )
        reused = sum(len(prefix) for prefix in prefixes or () if prefix is not None)
        prefilled = sum(len(request.prompt_ids) for request in requests) - reused
        self.stats["prefill_tokens"] = self.stats.get("prefill_tokens", 0) + prefilled
        self.stats["reused_tokens"] = self.stats.get("reused_tokens", 0) + reused
        self.stats["draft_tokens"] = self.stats.get("draft_tokens", 0) + sum(r.drafted for r in results)
        self.stats["accepted_draft_tokens"] = self.stats.get("accepted_draft_tokens", 0) + sum(r.accepted for r in results)
        for (request_id, _), result in zip(batch, results, strict=True):
            if cache is not None and result.cache is not None:
                cache.store(request_id, result.cache, epoch)
            result.cache = None  # the K/V stay here, never in the reply
        return results

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # -- weights --------------------------------------------------------------------------------
    async def load_weights(
        self, tensors: dict[str, torch.Tensor], finished: bool = False, global_steps: int | None = None
    ) -> dict:
        """Copy one bucket of trainer weights (HF names, full tensors) into the model.

        Buckets of one update arrive in order; ``finished=True`` marks the last one, which reports the
        parameters that no bucket of this update carried (tied ``lm_head.weight`` excepted).
        """
        self._ensure_loop_objects()
        async with self._lock:
            # Cached K/V were computed with the old weights; clearing under the lock (no batch runs)
            # and on every bucket also covers a generation between two buckets of one update.
            self._drop_prefix_cache()
            unexpected = await asyncio.to_thread(self._copy_in, tensors)
        self._pending_names.update(tensors)
        self._pending_unexpected += unexpected
        report = {"loaded": len(tensors) - len(unexpected), "unexpected": unexpected, "missing": []}
        if finished:
            tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
            own = self.model.state_dict()
            report["missing"] = sorted(n for n in own if n not in self._pending_names and n not in tied)
            report["unexpected"] = self._pending_unexpected
            if report["missing"] or report["unexpected"]:
                logger.warning("hf rollout weight update: unexpected %s, missing %s", report["unexpected"], report["missing"])
            self._pending_names, self._pending_unexpected = set(), []
            if global_steps is not None:
                self.global_steps = global_steps
            self.stats["weight_updates"] += 1
        return report

    async def update_weights(self, state_dict: dict[str, torch.Tensor], global_steps: int | None = None) -> dict:
        """Load a whole state dict at once (one-bucket :meth:`load_weights`)."""
        return await self.load_weights(state_dict, finished=True, global_steps=global_steps)

    def _copy_in(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        own = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in tensors.items():
                if name in own:
                    own[name].copy_(tensor.to(own[name].dtype))
        return sorted(name for name in tensors if name not in own)

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def get_stats(self) -> dict:
        stats = dict(self.stats)
        if self.prefix_cache is not None:
            stats.update({f"prefix_cache_{k}": v for k, v in self.prefix_cache.stats.items()})
            stats["prefix_cache_entries"] = len(self.prefix_cache)
            stats["prefix_cache_bytes"] = self.prefix_cache.nbytes
        return stats

    def _drop_prefix_cache(self) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    # -- control methods (RolloutReplica, replica.py:265-309): only the prefix cache to free on a CPU ----
    async def wake_up(self) -> None:
        return None

    async def sleep(self) -> None:
        # veRL puts the servers to sleep before a weight update (free_cache_engine): free the memory now.
        self._drop_prefix_cache()

    async def abort_all_requests(self, reject_request: bool = False) -> dict:
        return {"aborted_count": 0, "request_ids": []}

    async def resume_generation(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        self._drop_prefix_cache()

    async def release_kv_cache(self) -> None:
        # The checkpoint engine releases the KV cache before a weight sync (checkpoint_engine/base.py:533).
        self._drop_prefix_cache()

    async def resume_kv_cache(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


def server_actor_name(replica_rank: int, node_rank: int = 0, suffix: str = "", kind: str = "") -> str:
    """Ray actor name of a server; ``kind`` is ``""``, ``"reward_"`` or ``"teacher_"``."""
    return f"{SERVER_NAME_PREFIX}{kind}{replica_rank}_{node_rank}{suffix}"

