"""The ``hf`` rollout's veRL side: the replica that starts a server and the adapter that feeds it weights.

veRL 0.9.1 ships no CPU rollout on the agent-loop path (vLLM, SGLang, TRT-LLM only;
``workers/rollout/hf_rollout.py`` is the old synchronous one and is not reachable from the v1
trainer). A rollout backend is three pieces, registered under the name ``hf``
(``actor_rollout_ref.rollout.name=hf``):

* :class:`~verl_selflock.verl_adapter.cpu.generation_server.HFGenerationServer`: the server actor the
  agent loops talk to (batched transformers generation with token log-probs,
  :mod:`~verl_selflock.verl_adapter.cpu.sampling`).
* :class:`HFReplica`: the ``RolloutReplica`` that starts one server per replica
  (``RolloutReplicaRegistry`` name ``hf``).
* :class:`HFServerAdapter`: the ``BaseRollout`` living in each trainer (FSDP) worker
  (``_ROLLOUT_REGISTRY[("hf", "async")]`` points at this module path). ``update_weights`` receives the
  FSDP weights from ``ActorRolloutRefWorker.update_weights`` (``workers/engine_workers.py:728-827``, the
  "naive" checkpoint engine the v1 trainer uses) and loads them into its server.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica

from verl_selflock.verl_adapter.cpu.generation_server import HFGenerationServer, server_actor_name

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))


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
        name = server_actor_name(self.replica_rank, suffix=self.name_suffix, kind=kind)
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
