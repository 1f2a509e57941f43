"""A veRL platform for plain CPUs: device ``cpu``, collectives over gloo.

veRL 0.9.1 resolves its platform once per process (``verl/plugin/platform/platform_manager.py``
``get_platform``): ``VERL_PLATFORM`` first, then a probe of every registered platform, then a
fallback to ``nvidia``. :class:`PlatformCPU` is registered as ``cpu`` but its probe always answers
"no", so it is only ever chosen by ``VERL_PLATFORM=cpu``; GPU hosts keep their platform.

Two choices differ from what the abstract base suggests, both needed by veRL's FSDP path:

* :meth:`PlatformCPU.current_device` returns ``torch.device("cpu")``, not an index. veRL hands
  ``get_device_id()`` straight to ``.to()``, ``torch.device()`` and ``fully_shard``/``FSDP``
  (``utils/fsdp_utils.py:507``, ``workers/engine/fsdp/transformer_impl.py:441``); an integer 0 there
  means "accelerator 0" and fails with ``Cannot access accelerator device``.
* :meth:`PlatformCPU.ray_resource_name` is ``"GPU"``: ``ResourcePoolManager`` only counts Ray
  ``GPU``/``NPU`` resources (``single_controller/ray/base.py:226-242``), so trainer ranks are placed
  on logical Ray GPUs declared with ``+ray_kwargs.ray_init.num_gpus=N`` (Ray accepts them on a
  GPU-less host; CPU torch ignores ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any

import torch
from verl.plugin.platform import PlatformBase

from verl_selflock.verl_adapter.cpu.selection import PLATFORM_NAME, cpu_platform_active, cpu_platform_requested

__all__ = ["PLATFORM_NAME", "PlatformCPU", "cpu_platform_active", "cpu_platform_requested"]


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def _mem_get_info(*args: Any, **kwargs: Any) -> tuple[int, int]:
    """(free, total) bytes of host memory, the CPU analogue of ``torch.cuda.mem_get_info``."""
    import psutil

    memory = psutil.virtual_memory()
    return memory.available, memory.total


def _make_device_module() -> types.ModuleType:
    """``torch.cpu`` plus the ``torch.cuda``-style functions veRL calls on ``get_torch_device()``.

    veRL 0.9.1 calls ``empty_cache`` (27 sites), ``mem_get_info``, ``memory_allocated``,
    ``max_memory_*``, ``get_rng_state``/``set_rng_state``, ``ipc_collect``,
    ``set_per_process_memory_fraction``, ``get_device_name`` ... which ``torch.cpu`` lacks.
    Memory counters report 0 (host RSS is not a device pool); the RNG functions are the CPU
    generator's, so checkpoints save and restore a real state.
    """
    module = types.ModuleType("verl_selflock_cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("_"):
            setattr(module, name, getattr(torch.cpu, name))
    module.is_available = lambda: True
    module.device_count = lambda: 1
    module.current_device = lambda: torch.device("cpu")
    module.set_device = _no_op
    module.synchronize = _no_op
    module.empty_cache = _no_op
    module.ipc_collect = _no_op
    module.set_per_process_memory_fraction = _no_op
    module.reset_peak_memory_stats = _no_op
    module.memory_allocated = _zero
    module.memory_reserved = _zero
    module.max_memory_allocated = _zero
    module.max_memory_reserved = _zero
    module.mem_get_info = _mem_get_info
    module.get_device_name = lambda *args, **kwargs: "cpu"
    module.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    module.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    module.manual_seed = torch.manual_seed
    module.manual_seed_all = torch.manual_seed
    module.is_initialized = lambda: True
    return module


class PlatformCPU(PlatformBase):
    """veRL platform that runs training (FSDP2 over gloo) and rollout (HF generate) on the CPU."""

    def __init__(self) -> None:
        self._device_module = _make_device_module()

    # -- core device management -------------------------------------------------------------
    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return self._device_module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: a GPU host without VERL_PLATFORM=cpu must keep its accelerator
        # (veRL probes every registered platform when VERL_PLATFORM is unset).
        return False

    def current_device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    # -- RNG ------------------------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    # -- memory ---------------------------------------------------------------------------------
    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    # -- properties -----------------------------------------------------------------------------
    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return (None, None)

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Only read and recorded by veRL (single_controller/base/worker.py:178,214); Ray sets it
        # for the logical GPUs and CPU torch ignores it.
        return "CUDA_VISIBLE_DEVICES"

    # -- profiling (no-ops) ---------------------------------------------------------------------
    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    # -- Ray --------------------------------------------------------------------------------------
    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def rollout_env_vars(self) -> dict[str, str]:
        return {}

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None
