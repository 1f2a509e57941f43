"""A Hugging Face transformers rollout for veRL's agent-loop server path, for CPUs.

veRL 0.9.1 ships no CPU rollout on the agent-loop path (vLLM, SGLang, TRT-LLM only;
``workers/rollout/hf_rollout.py`` is the old synchronous one and is not reachable from the v1
trainer). This module supplies the three pieces veRL expects from a rollout backend, registered
under the name ``hf`` (``actor_rollout_ref.rollout.name=hf``):

* :class:`HFGenerationServer`: the server actor the agent loops talk to through
  ``LLMServerClient.generate`` (``workers/rollout/llm_server.py:150``). It holds its own copy of the
  model and answers ``generate(request_id, prompt_ids, sampling_params, ...) -> TokenOutput`` with
  token ids and per-token log-probs. Concurrent requests are gathered into one left-padded batch
  and decoded with a KV cache (2 cores: batching is where the speed is). The control methods veRL
  calls on every server (``wake_up``, ``sleep``, ``clear_kv_cache`` ...) are no-ops; the KV cache
  lives only for one batch.
* :class:`HFReplica`: the ``RolloutReplica`` that starts one server per replica
  (``RolloutReplicaRegistry`` name ``hf``).
* :class:`HFServerAdapter`: the ``BaseRollout`` living in each trainer (FSDP) worker
  (``_ROLLOUT_REGISTRY[("hf", "async")]``). ``update_weights`` receives the FSDP weights from
  ``ActorRolloutRefWorker.update_weights`` (``workers/engine_workers.py:728-827``, the "naive"
  checkpoint engine the v1 trainer uses) and loads them into its server.

Sampling semantics (match the actor's ``old_log_prob`` so that rollout-correction metrics are
meaningful): log-probs are ``log_softmax(logits / temperature)`` of the sampled token, before
top-k/top-p filtering (vLLM's ``processed_logprobs``, veRL's default ``logprobs_mode``);
``temperature == 0`` means greedy with log-probs of the raw logits. Generation stops at the
tokenizer's / generation config's eos tokens (kept in the output, as vLLM does) unless
``rollout.ignore_eos``, and at ``min(rollout.response_length, max_tokens)`` tokens, where
``max_tokens`` (or ``max_new_tokens``) is taken from the request when given, else veRL's default
``prompt_length + response_length - len(prompt)``.

Options under ``actor_rollout_ref.rollout.engine_kwargs.hf`` (all optional; ``+`` prefix needed):
``dtype`` (default ``float32``: faster than bf16 on most CPUs and closer to the trainer's
log-probs), ``max_batch_size`` (default ``rollout.max_num_seqs``), ``batch_wait_ms`` (default 20:
how long the server waits for concurrent requests before it starts a batch), ``num_threads``
(default 1, or ``VERL_SELFLOCK_CPU_THREADS``: on a busy 2-core machine more threads are slower).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

ROLLOUT_NAME = "hf"
"""``actor_rollout_ref.rollout.name`` of this backend."""

SERVER_NAME_PREFIX = "hf_server_"


# ---------------------------------------------------------------------------------------------
# Generation core (pure: model + requests in, tokens + log-probs out)
# ---------------------------------------------------------------------------------------------
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
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    ignore_eos: bool = False


@dataclass
class GenerationResult:
    """Continuation of one :class:`GenerationRequest`.

    Attributes:
        token_ids: generated ids, (num_generated,), ending with the eos token when one was hit.
        log_probs: log-prob of each generated token, (num_generated,), see module docstring.
        stop_reason: ``"completed"`` (eos) or ``"length"`` (hit ``max_tokens``).
    """

    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    stop_reason: str = "length"


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
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
) -> list[GenerationResult]:
    """Decode several prompts together: left padding, one KV cache, per-row sampling settings.

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids, past_key_values)``).
        requests: prompts and their sampling settings.
        eos_token_ids: ids that end a sequence (kept in the output).
        pad_token_id: id used to pad prompts on the left and finished rows.
        generator: RNG for sampling (None: torch's default generator).

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
        filtered = _filter_top_k_top_p(scaled, top_k, top_p)
        sampled = torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=generator).squeeze(1)
        next_tokens = torch.where(greedy, scaled.argmax(dim=-1), sampled)
        next_log_probs = log_probs.gather(1, next_tokens[:, None]).squeeze(1)

        for row in torch.nonzero(~finished).flatten().tolist():
            results[row].token_ids.append(int(next_tokens[row]))
            results[row].log_probs.append(float(next_log_probs[row]))
        hit_eos = torch.isin(next_tokens, eos) & stops_at_eos
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


# ---------------------------------------------------------------------------------------------
# Server actor
# ---------------------------------------------------------------------------------------------
def _engine_kwargs(config: Any) -> dict[str, Any]:
    kwargs = getattr(config, "engine_kwargs", None) or {}
    return dict(kwargs.get(ROLLOUT_NAME, None) or {})


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


class HFGenerationServer:
    """Ray actor (async, created by :class:`HFReplica`) that generates with a transformers model.

    Requests arriving while a batch runs are queued and decoded together in the next batch; the
    model runs in a worker thread so the actor keeps accepting requests. One asyncio lock orders
    batches and weight updates.
    """

    def __init__(self, config: Any, model_config: Any, replica_rank: int = 0) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.model_config = model_config
        self.replica_rank = replica_rank
        options = _engine_kwargs(config)
        torch.set_num_threads(int(options.get("num_threads", os.environ.get("VERL_SELFLOCK_CPU_THREADS", 1))))
        self.dtype = getattr(torch, str(options.get("dtype", "float32")))
        self.max_batch_size = int(options.get("max_batch_size", getattr(config, "max_num_seqs", 64) or 64))
        self.batch_wait_s = float(options.get("batch_wait_ms", 20)) / 1000.0

        path = getattr(model_config, "local_path", None) or model_config.path
        trust = bool(getattr(model_config, "trust_remote_code", False))
        self.model = load_causal_lm(path, self.dtype, trust)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        self.eos_token_ids = eos_token_ids_of(tokenizer, getattr(self.model, "generation_config", None))
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        self.generator = torch.Generator().manual_seed(int(getattr(config, "seed", 0)) + replica_rank)

        self.global_steps: int | None = None
        self._pending_names: set[str] = set()
        self._pending_unexpected: list[str] = []
        self._queue: list[tuple[GenerationRequest, asyncio.Future]] = []
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None
        self.stats = {"requests": 0, "batches": 0, "tokens": 0, "generate_s": 0.0, "weight_updates": 0}

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
        return GenerationRequest(
            prompt_ids=[int(t) for t in prompt_ids],
            max_tokens=max(1, int(max_tokens)),
            temperature=float(params.get("temperature", cfg.temperature)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=int(top_k if top_k is not None else -1),
            repetition_penalty=float(params.get("repetition_penalty", getattr(cfg, "repetition_penalty", 1.0))),
            ignore_eos=bool(params.get("ignore_eos", getattr(cfg, "ignore_eos", False))),
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
        self._queue.append((request, future))
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
                requests = [request for request, _ in batch]
                try:
                    async with self._lock:
                        started = time.perf_counter()
                        results = await asyncio.to_thread(self._run_batch, requests)
                        self.stats["generate_s"] += time.perf_counter() - started
                except Exception as error:  # noqa: BLE001  (hand the failure to every waiting caller)
                    logger.exception("hf rollout batch failed")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                self.stats["batches"] += 1
                self.stats["requests"] += len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    self.stats["tokens"] += len(result.token_ids)
                    if not future.done():
                        future.set_result(result)

    def _run_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return generate_batch(self.model, requests, self.eos_token_ids, self.pad_token_id, self.generator)

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
        return dict(self.stats)

    # -- control methods (RolloutReplica, replica.py:265-309): nothing to free on a CPU -------------
    async def wake_up(self) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def abort_all_requests(self, reject_request: bool = False) -> dict:
        return {"aborted_count": 0, "request_ids": []}

    async def resume_generation(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


def server_actor_name(replica_rank: int, node_rank: int = 0, suffix: str = "") -> str:
    return f"{SERVER_NAME_PREFIX}{replica_rank}_{node_rank}{suffix}"


# ---------------------------------------------------------------------------------------------
# Replica (driver/TaskRunner side) and adapter (trainer worker side)
# ---------------------------------------------------------------------------------------------
class HFReplica(RolloutReplica):
    """One :class:`HFGenerationServer` per replica; tensor parallelism is not supported (TP 1)."""

    async def launch_servers(self) -> None:
        if self.world_size != 1:
            raise ValueError(
                "the hf rollout runs one process per replica: set "
                "actor_rollout_ref.rollout.tensor_model_parallel_size=1 (and data/pipeline parallel 1), "
                f"got a replica world size of {self.world_size}"
            )
        kind = "reward_" if self.is_reward_model else "teacher_" if self.is_teacher_model else ""
        name = f"{SERVER_NAME_PREFIX}{kind}{self.replica_rank}_0{self.name_suffix}"
        server = (
            ray.remote(HFGenerationServer)
            .options(name=name, num_cpus=0, max_concurrency=self.max_concurrency, get_if_exists=False)
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        await server.get_stats.remote()  # wait until the model is loaded
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"hf://{name}"

    def rollout_worker_use_gpu(self) -> bool:
        return False


class HFServerAdapter(BaseRollout):
    """Lives in each trainer worker; forwards the trainer's weights to this rank's server."""

    def __init__(
        self,
        config: Any,
        model_config: Any,
        device_mesh: Any,
        replica_rank: int = -1,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        world = self.config.tensor_model_parallel_size * self.config.data_parallel_size
        world *= self.config.pipeline_model_parallel_size
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % world
        self.is_leader_rank = self.rollout_rank == 0
        self._server: ray.actor.ActorHandle | None = None
        bucket_mb = getattr(getattr(self.config, "checkpoint_engine", None), "update_weights_bucket_megabytes", 128)
        self.bucket_bytes = min(int(bucket_mb or 128), 128) << 20

    def _server_handle(self) -> ray.actor.ActorHandle:
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        return None

    async def release(self) -> None:
        return None

    async def update_weights(self, weights: Any, wire_format: str = "named_tensors", **kwargs: Any) -> None:
        """Stream the trainer's weights to the server in buckets of ``bucket_bytes`` (bounded RAM).

        Args:
            weights: generator of ``(hf_name, full tensor)``, from ``engine.get_per_tensor_param()``.
            wire_format: only ``"named_tensors"``.
            kwargs: ``global_steps`` (tags later outputs), ``peft_config`` (must be None: merged weights).
        """
        if wire_format != "named_tensors":
            raise NotImplementedError(f"the hf rollout only takes full named tensors, got {wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError("the hf rollout needs merged weights (actor_rollout_ref.model.lora.merge=True)")
        server = self._server_handle() if self.is_leader_rank else None
        bucket: dict[str, torch.Tensor] = {}
        size = 0
        loaded = 0
        for name, tensor in weights:
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()  # every rank takes part in the gather
            if server is None:
                continue
            bucket[name] = tensor.detach().to("cpu")
            size += tensor.numel() * tensor.element_size()
            if size >= self.bucket_bytes:
                loaded += (await server.load_weights.remote(bucket))["loaded"]
                bucket, size = {}, 0
        if server is None:
            return
        report = await server.load_weights.remote(bucket, finished=True, global_steps=kwargs.get("global_steps"))
        logger.info("hf rollout weights updated: %d tensors, %s", loaded + report["loaded"], report)
