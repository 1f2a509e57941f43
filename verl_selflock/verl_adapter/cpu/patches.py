"""Every place where the CPU backend relies on a private or hard-coded veRL 0.9.1 name.

veRL 0.9.1 has extension points for a platform, an engine and a rollout replica, but a few spots
on its FSDP path assume an accelerator. Each is handled here, and nowhere else, by the smallest
change we found; each names the veRL file:line it depends on. :func:`apply_cpu_patches` applies
them only when the CPU platform is active (``VERL_PLATFORM=cpu``) and is idempotent;
:func:`register_rollout_class` (the only entry that is not CPU-specific: it only adds the name
``hf``) runs always. :data:`PATCH_TARGETS` lists the veRL names we touch (rows of
:data:`verl_selflock.verl_adapter.private_names.PRIVATE_NAMES`), and the tests assert that each
still exists, so a veRL bump fails loudly instead of silently unpatched.

Patches (name: why):

``gloo_backend``
    ``verl/utils/distributed.py:89`` (``initialize_global_process_group_ray``) and ``:63``
    (``initialize_global_process_group``) build ``f"cpu:gloo,{device}:{backend}"``, which on a CPU
    platform is ``"cpu:gloo,cpu:gloo"`` and torch raises ``ValueError: Duplicate device type cpu``.
    We default ``backend`` to ``"gloo"``. Callers import the function by name
    (``workers/engine_workers.py:38``, ``checkpoint_engine/base.py:25``), so already-imported
    modules are rebound too.
``fsdp2_offload_no_pin``
    ``workers/engine/fsdp/transformer_impl.py:462``: forward-only FSDP2 engines (reference model,
    critic inference) get ``CPUOffloadPolicy(pin_memory=True)``; pinning needs an accelerator.
    We make the module's ``CPUOffloadPolicy`` default to ``pin_memory=False``.
``fsdp_engine_cpu``
    ``workers/engine/fsdp/transformer_impl.py:1143,1594`` register the FSDP engines for devices
    ``cuda``/``npu`` only, and ``EngineRegistry.get_engine_cls`` (``workers/engine/base.py:396``)
    looks them up by the platform's device name. We register the same classes for ``cpu`` through
    the public ``EngineRegistry.register``; the private ``_engines`` dict is only read, to stay
    idempotent.
``valuehead_attn``
    ``utils/model.py:641-650`` (``load_valuehead_model``, the critic) hard-codes
    ``attn_implementation="flash_attention_2"``; flash-attn does not exist on CPU. The CPU version
    uses the attention implementation already chosen in the model's config.
``default_attn_sdpa``
    ``workers/config/model.py:185``: the model's attention defaults to ``flash_attention_2`` when
    ``override_config.attn_implementation`` is unset. On CPU the default becomes ``sdpa`` (an
    explicit override still wins), so neither the actor nor the critic needs a ``+...`` override.
``auto_set_device``
    ``utils/device.py:160`` (``auto_set_device``, called at ``trainer/main_ppo.py:174``) copies the
    detected device into ``trainer.device`` except when it is ``cpu``; on the CPU platform we set
    ``trainer.device=cpu`` too, so the worker groups are built for ``cpu`` without an override.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from verl_selflock.verl_adapter.cpu.selection import ROLLOUT_NAME, cpu_platform_active
from verl_selflock.verl_adapter.private_names import (
    PRIVATE_NAMES,
    engine_devices,
    missing_names,
    rollout_class_registry,
)

logger = logging.getLogger(__name__)

_MARK = "__verl_selflock_cpu_patch__"

HF_ROLLOUT_ADAPTER = "verl_selflock.verl_adapter.cpu.hf_rollout.HFServerAdapter"

PATCH_TARGETS: dict[str, list[str]] = {}
"""Patch name -> the ``module:attribute`` names it relies on (the ``patch`` rows of ``PRIVATE_NAMES``)."""
for _name in PRIVATE_NAMES:
    if _name.patch:
        PATCH_TARGETS.setdefault(_name.patch, []).append(_name.target)

APPLIED: list[str] = []
"""Names of the CPU patches applied in this process, in order."""


def missing_patch_targets() -> list[str]:
    """The ``module:attribute`` names of :data:`PATCH_TARGETS` that this veRL no longer has."""
    return missing_names([name for name in PRIVATE_NAMES if name.patch])


def _is_patched(obj: Any) -> bool:
    return bool(getattr(obj, _MARK, False))


def _mark(obj: Any) -> Any:
    setattr(obj, _MARK, True)
    return obj


def _rebind(attr: str, new: Any, importers: tuple[str, ...]) -> None:
    """Replace ``attr`` in modules that did ``from ... import attr`` before we patched it."""
    for name in importers:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, attr) and not _is_patched(getattr(module, attr)):
            setattr(module, attr, new)


# ---------------------------------------------------------------------------------------------
def register_rollout_class() -> str:
    """``_ROLLOUT_REGISTRY[("hf", "async")]`` (``verl/workers/rollout/base.py:89``): a plain dict with
    no register function, read by ``get_rollout_class`` in the trainer worker
    (``workers/engine_workers.py:667``) and ``CheckpointEngineWorker`` (``checkpoint_engine/base.py:343``)."""
    registry = rollout_class_registry()
    key = (ROLLOUT_NAME, "async")
    current = registry.get(key)
    if current not in (None, HF_ROLLOUT_ADAPTER):
        raise ValueError(f"rollout name {ROLLOUT_NAME!r} is already registered to {current}")
    registry[key] = HF_ROLLOUT_ADAPTER
    return ROLLOUT_NAME


# ---------------------------------------------------------------------------------------------
def _patch_gloo_backend() -> None:
    from verl.utils import distributed

    importers = ("verl.workers.engine_workers", "verl.checkpoint_engine.base", "verl.trainer.sft_trainer")

    original_ray = distributed.initialize_global_process_group_ray
    if not _is_patched(original_ray):

        @functools.wraps(original_ray)
        def initialize_global_process_group_ray(timeout_second: Any = None, backend: str | None = None) -> Any:
            return original_ray(timeout_second=timeout_second, backend=backend or "gloo")

        distributed.initialize_global_process_group_ray = _mark(initialize_global_process_group_ray)
    _rebind("initialize_global_process_group_ray", distributed.initialize_global_process_group_ray, importers)

    # initialize_global_process_group (torchrun entry points) takes no backend argument: rebuild it
    # with the same body (distributed.py:62-75) and a plain gloo backend.
    original = distributed.initialize_global_process_group
    if not _is_patched(original):

        @functools.wraps(original)
        def initialize_global_process_group(timeout_second: int = 36000) -> tuple[int, int, int]:
            import os
            from datetime import timedelta

            import torch.distributed

            torch.distributed.init_process_group(
                backend="gloo",
                timeout=timedelta(seconds=timeout_second),
                init_method=os.environ.get("DIST_INIT_METHOD", None),
            )
            return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

        distributed.initialize_global_process_group = _mark(initialize_global_process_group)
    _rebind("initialize_global_process_group", distributed.initialize_global_process_group, importers)


def _patch_fsdp2_offload_no_pin() -> None:
    from verl.workers.engine.fsdp import transformer_impl

    original = transformer_impl.CPUOffloadPolicy
    if original is None or _is_patched(original):
        return

    def cpu_offload_policy(*args: Any, pin_memory: bool = False, **kwargs: Any) -> Any:
        return original(*args, pin_memory=False, **kwargs)

    transformer_impl.CPUOffloadPolicy = _mark(cpu_offload_policy)


def _patch_fsdp_engine_cpu() -> None:
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp import transformer_impl

    engines = {
        "language_model": transformer_impl.FSDPEngineWithLMHead,
        "value_model": transformer_impl.FSDPEngineWithValueHead,
    }
    for model_type, engine_cls in engines.items():
        for backend in ("fsdp", "fsdp2"):
            if "cpu" not in engine_devices(model_type, backend):
                EngineRegistry.register(model_type=model_type, backend=backend, device="cpu")(engine_cls)


def _patch_valuehead_attn() -> None:
    from verl.utils import model as model_utils

    if _is_patched(model_utils.load_valuehead_model):
        return

    def load_valuehead_model(local_path: str, torch_dtype: Any, model_config: Any, trust_remote_code: bool) -> Any:
        from transformers import AutoModelForTokenClassification

        attn = getattr(model_config, "_attn_implementation", None) or "sdpa"
        return AutoModelForTokenClassification.from_pretrained(
            pretrained_model_name_or_path=local_path,
            torch_dtype=torch_dtype,
            config=model_config,
            attn_implementation=attn,
            trust_remote_code=trust_remote_code,
        )

    model_utils.load_valuehead_model = _mark(load_valuehead_model)


def _patch_default_attn_sdpa() -> None:
    from verl.workers.config.model import HFModelConfig

    original = HFModelConfig.__post_init__
    if _is_patched(original):
        return

    @functools.wraps(original)
    def __post_init__(self: Any) -> None:
        override = self.override_config
        if override is None:
            object.__setattr__(self, "override_config", {"attn_implementation": "sdpa"})
        elif "attn_implementation" not in override:
            try:
                override["attn_implementation"] = "sdpa"
            except Exception:  # noqa: BLE001  (a struct DictConfig: copy it into a plain dict)
                from omegaconf import OmegaConf

                plain = OmegaConf.to_container(override, resolve=True)
                plain["attn_implementation"] = "sdpa"
                object.__setattr__(self, "override_config", plain)
        original(self)

    HFModelConfig.__post_init__ = _mark(__post_init__)


def _patch_auto_set_device() -> None:
    from verl.utils import device

    original = device.auto_set_device
    if not _is_patched(original):

        @functools.wraps(original)
        def auto_set_device(config: Any) -> None:
            if config is not None and hasattr(config, "trainer") and hasattr(config.trainer, "device"):
                if config.trainer.device != "cpu":
                    logger.info("CPU platform: setting trainer.device=cpu (was %s)", config.trainer.device)
                config.trainer.device = "cpu"
                return
            original(config)

        device.auto_set_device = _mark(auto_set_device)
    _rebind(
        "auto_set_device",
        device.auto_set_device,
        ("verl.trainer.main_ppo", "verl.trainer.sft_trainer", "verl.trainer.sft_trainer_ray"),
    )


_CPU_PATCHES: dict[str, Callable[[], None]] = {
    "gloo_backend": _patch_gloo_backend,
    "fsdp2_offload_no_pin": _patch_fsdp2_offload_no_pin,
    "fsdp_engine_cpu": _patch_fsdp_engine_cpu,
    "valuehead_attn": _patch_valuehead_attn,
    "default_attn_sdpa": _patch_default_attn_sdpa,
    "auto_set_device": _patch_auto_set_device,
}


def apply_cpu_patches(force: bool = False) -> list[str]:
    """Apply the CPU patches when the CPU platform is active (or ``force``). Idempotent.

    Returns:
        The names of the patches applied in this process (empty when the platform is not CPU).
    """
    if not (force or cpu_platform_active()):
        return []
    for name, patch in _CPU_PATCHES.items():
        patch()
        if name not in APPLIED:
            APPLIED.append(name)
    return list(APPLIED)
