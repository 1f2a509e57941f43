"""CPU backend: run veRL 0.9.1's own ``python -m verl.trainer.main_ppo`` on a machine without GPUs.

What it adds to veRL, all through :func:`register` (called by our ``verl.plugins`` entry point in
every process that imports veRL: driver, TaskRunner, FSDP workers, agent-loop and reward workers):

* a platform ``cpu`` (:mod:`.platform`): device ``cpu``, gloo collectives, Ray resource ``GPU``;
* a rollout ``hf`` (:mod:`.hf_rollout`: replica and weight adapter; :mod:`.generation_server`: the
  batching server actor; :mod:`.sampling`: transformers decoding with token log-probs, sped up by
  :mod:`.prefix_cache` (each conversation's K/V kept between turns), :mod:`.speculation` (n-gram
  speculative decoding) and :mod:`.packed_linear` (oneDNN-packed weights); its options in
  :mod:`.engine_options`), fed with the trainer's weights after every update;
* the few fixes veRL's FSDP path needs on CPU (:mod:`.patches`), applied only on the CPU platform.

How to switch it on: set the environment variable ``VERL_PLATFORM=cpu`` (veRL's own platform
switch, read first by ``verl/plugin/platform/platform_manager.py``; a local Ray cluster started by
the driver passes it to every worker). Without it nothing changes for GPU users: the ``cpu``
platform is registered but never auto-detected, no patch is applied, and the ``hf`` rollout is
only used when a config names it. ``trainer.device=cpu`` alone cannot select the platform (veRL
resolves its platform while importing, before Hydra reads the config), and with the CPU platform
active ``trainer.device`` is set to ``cpu`` for you.

The Hydra overrides a CPU run still needs are returned by :func:`cpu_overrides` (they are config
values our code cannot set safely from inside a plugin). A complete single-step GRPO command::

    VERL_PLATFORM=cpu python -m verl.trainer.main_ppo \\
        $(python -c "from verl_selflock.verl_adapter.cpu import cpu_overrides; print(' '.join(cpu_overrides()))") \\
        data.train_files=train.parquet data.val_files=val.parquet actor_rollout_ref.model.path=MODEL ...

Measured on a shared 2-core / 24 GiB machine with SmolLM2-135M-Instruct, ``train_batch_size=4``,
``response_length=128`` (see ``examples/cpu_grpo_smoke.sh``): GRPO (n=2) 2 steps in 3.5 min wall
(step 1 68 s with warm-up, step 2 33 s); PPO with a GAE critic, validation before training and
after each step and a checkpoint every step: 2 steps in 4.6 min, peak PSS of the whole process tree
9.3 GiB (RSS sum 11.5 GiB). Rollout vs trainer token-probability Pearson 0.985-0.9997.
What is not supported on CPU: FSDP1 (``strategy=fsdp``: ``sync_module_states=True`` refuses CPU
parameters), ``use_remove_padding=true`` (needs flash-attn varlen kernels), rollout tensor
parallelism, LoRA adapters without merging, multimodal prompts, the separate-async trainer (needs a
non-naive checkpoint engine).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

# Nothing from veRL at module level: a Ray worker may import this package first (to unpickle
# HFGenerationServer), which imports veRL, which loads our plugin, which needs register() defined.
from verl_selflock.verl_adapter.cpu.selection import (
    PLATFORM_NAME,
    ROLLOUT_NAME,
    THREADS_ENV,
    cpu_platform_active,
    cpu_platform_requested,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PLATFORM_NAME",
    "ROLLOUT_NAME",
    "THREADS_ENV",
    "cpu_overrides",
    "cpu_platform_active",
    "cpu_platform_requested",
    "register",
]

_REGISTERED: list[str] = []


def _load_hf_replica() -> type:
    from verl_selflock.verl_adapter.cpu.hf_rollout import HFReplica

    return HFReplica


def register(on_error: Callable[[str, BaseException], Any] | None = None) -> list[str]:
    """Register the ``cpu`` platform and the ``hf`` rollout; on the CPU platform, apply the patches.

    Safe to call many times and in any process. Returns the registered names, e.g.
    ``["platform:cpu", "rollout:hf", "patch:gloo_backend", ...]`` (patches only on the CPU platform).

    Light: the platform goes into ``PlatformRegistry`` (loaded by ``import verl`` already) and the
    platform singleton is never resolved here, so a vendor platform plugin loaded after ours is
    still detected. The ``hf`` rollout names go into veRL's rollout registries right after veRL
    imports them (:func:`~verl_selflock.verl_adapter.lazy.when_imported`), not by importing them
    (~350 modules). ``on_error(module, exception)`` receives a deferred registration's failure.
    """
    from verl.plugin.platform import PlatformRegistry

    from verl_selflock.verl_adapter.cpu.platform import PlatformCPU
    from verl_selflock.verl_adapter.lazy import when_imported

    if PlatformRegistry.get(PLATFORM_NAME) is not PlatformCPU:
        PlatformRegistry.register(PLATFORM_NAME)(PlatformCPU)
    report = on_error or _log_deferred_error
    if not _REGISTERED:  # hooks once per process; later calls only re-check the patches
        when_imported(ROLLOUT_REPLICA_MODULE, _register_replica, report)
        when_imported(ROLLOUT_CLASS_MODULE, _register_rollout_class, report)
    names = [f"platform:{PLATFORM_NAME}", f"rollout:{ROLLOUT_NAME}"]

    if cpu_platform_active():
        from verl_selflock.verl_adapter.cpu import patches

        names += [f"patch:{name}" for name in patches.apply_cpu_patches()]
        _set_cpu_threads()

    _REGISTERED[:] = names
    return list(names)


ROLLOUT_REPLICA_MODULE = "verl.workers.rollout.replica"
"""Holds ``RolloutReplicaRegistry`` (``hf`` -> :class:`~.hf_rollout.HFReplica`)."""
ROLLOUT_CLASS_MODULE = "verl.workers.rollout.base"
"""Holds ``_ROLLOUT_REGISTRY`` (``("hf", "async")`` -> the HF server adapter)."""


def _register_replica(module: Any) -> None:
    module.RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_hf_replica)


def _register_rollout_class(module: Any) -> None:
    from verl_selflock.verl_adapter.cpu import patches

    patches.register_rollout_class()


def _log_deferred_error(module: str, err: BaseException) -> None:
    logger.warning("verl-selflock: registering the hf rollout after importing %s failed: %r", module, err)


def _set_cpu_threads() -> None:
    import torch

    threads = int(os.environ.get(THREADS_ENV, "0") or 0)
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def cpu_overrides(n_ranks: int = 1, with_critic: bool = False) -> list[str]:
    """Hydra overrides for ``verl.trainer.main_ppo`` on the CPU platform (with ``VERL_PLATFORM=cpu``).

    Only what our code cannot set itself; model paths, data, batch sizes and the algorithm stay
    with the user. Append your own overrides after these (Hydra: the last value wins).

    Args:
        n_ranks: trainer processes (gloo ranks) on this machine; each also gets one ``hf`` server.
        with_critic: add the critic's settings (PPO with ``algorithm.adv_estimator=gae``); the
            critic's ``model.path`` must still be given.

    Returns:
        A list of ``key=value`` strings, one per override.
    """
    overrides = [
        # rollout: our HF server, one process per replica
        f"actor_rollout_ref.rollout.name={ROLLOUT_NAME}",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        # training engine: FSDP2 (FSDP1 refuses CPU params, transformer_impl.py:444); the ref follows
        # ${actor.strategy}. No rmpad (flash-attn varlen) and no torch.compile (inductor on 2 cores).
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.model.use_remove_padding=false",
        "actor_rollout_ref.actor.use_torch_compile=false",
        # Ray: the trainer ranks are placed on logical GPUs (ResourcePoolManager counts only GPU/NPU,
        # single_controller/ray/base.py:226-242); logical CPUs for the many small actors.
        f"trainer.n_gpus_per_node={n_ranks}",
        "trainer.nnodes=1",
        f"+ray_kwargs.ray_init.num_gpus={n_ranks}",
        "ray_kwargs.ray_init.num_cpus=16",
        "+ray_kwargs.ray_init.include_dashboard=false",  # ~1 GB RSS of dashboard processes
        # TransferQueue: 8 storage actors by default, one is plenty on one machine
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        # fewer processes (each veRL process costs ~0.5 GB of RAM)
        "data.dataloader_num_workers=0",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "reward.num_workers=1",
    ]
    if with_critic:
        overrides += [
            "critic.strategy=fsdp2",
            "critic.model.use_remove_padding=false",
            "critic.fsdp.use_torch_compile=false",
        ]
    return overrides
