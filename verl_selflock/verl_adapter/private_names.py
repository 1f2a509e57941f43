"""Every veRL 0.9.1 name we rely on that is not a documented extension point, in one table.

A veRL upgrade has one file to check: :data:`PRIVATE_NAMES` lists each name with the veRL file:line
(paths relative to the installed ``verl/`` package) and what we assume about it, and
``tests/verl_adapter/test_private_names.py`` asserts, on the installed veRL, that each still exists and
behaves as assumed. The adapter modules reach these names only through the accessors below (the
agent loop, :mod:`verl_selflock.verl_adapter.agent_loop`, still imports its few names itself; they are
listed here all the same). The CPU backend's monkeypatches live in
:mod:`verl_selflock.verl_adapter.cpu.patches` and apply only on the CPU platform; their targets are
rows of this table (``patch`` set) and :data:`~verl_selflock.verl_adapter.cpu.patches.PATCH_TARGETS` is
built from them.

Documented extension points (``register_adv_est``, ``register_trainer``, the agent-loop and reward
``register``, ``PlatformRegistry``, ``RolloutReplicaRegistry``, ``EngineRegistry.register``,
``AgentLoopBase``, ``RolloutReplica``, ``BaseRollout``, ``TokenOutput``) are imported where used.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PRIVATE_NAMES",
    "PrivateName",
    "actor_dp_size",
    "adv_estimator_registry",
    "agent_loop_init_kwargs",
    "agent_loop_registry",
    "balanced_partitions",
    "config_validation_installed",
    "engine_devices",
    "forward_only_options",
    "generation_seconds",
    "install_config_validation",
    "list_of_dict_to_tensordict",
    "metrics_file_path",
    "missing_names",
    "padding_flags",
    "registered_agent_loops",
    "registered_estimators",
    "registered_reward_managers",
    "registered_trainer_modes",
    "resolve",
    "response_from_nested",
    "response_to_nested",
    "rollout_class_registry",
    "upsample_to_multiple",
]


@dataclass(frozen=True)
class PrivateName:
    """One veRL name we rely on."""

    target: str
    """``module:attr[.attr]``; with ``instance`` the last part is set on instances (``self.attr``)."""
    source: str
    """veRL 0.9.1 file:line (relative to ``verl/``)."""
    assumption: str
    """What our code assumes about it (checked by the test)."""
    used_by: str
    """Our module (under ``verl_adapter/``) that relies on it."""
    instance: bool = False
    """The attribute is assigned in the class's code (``self.attr = ...``) rather than defined on it."""
    patch: str = ""
    """Name of the CPU patch (:mod:`~verl_selflock.verl_adapter.cpu.patches`) that touches it, if any."""


_AGENT_LOOP = "verl.experimental.agent_loop.agent_loop"
_TRAINER = "verl.trainer.ppo.v1.trainer_base"
_REPLICA = "verl.workers.rollout.replica:RolloutReplica"
_FSDP = "verl.workers.engine.fsdp.transformer_impl"

PRIVATE_NAMES: tuple[PrivateName, ...] = (
    # -- driver-side config validation (plugin.py) ------------------------------------------------------
    PrivateName("verl.utils.config:validate_config", "utils/config.py:88; trainer/main_ppo.py:24 import, :177 call",
                "module-level function called as validate_config(config, ...) on the driver before ray.init; "
                "main_ppo imports it by name after plugins are loaded, so wrapping the module attribute works",
                "private_names.install_config_validation"),
    # -- registry introspection (doctor, standalone) ----------------------------------------------------
    PrivateName(f"{_AGENT_LOOP}:_agent_loop_registry", "experimental/agent_loop/agent_loop.py:467",
                "dict name -> Hydra node ({'_target_': ...}); no public getter", "standalone, doctor"),
    PrivateName(f"{_TRAINER}:TRAINER_REGISTRY", "trainer/ppo/v1/trainer_base.py:1996",
                "dict trainer_mode -> class", "doctor"),
    PrivateName("verl.trainer.ppo.core_algos:ADV_ESTIMATOR_REGISTRY", "trainer/ppo/core_algos.py:113",
                "dict estimator name -> function (keys str or str-Enum)", "config_validation, doctor"),
    PrivateName("verl.experimental.reward_loop.reward_manager.registry:REWARD_MANAGER",
                "experimental/reward_loop/reward_manager/registry.py:21", "dict name -> class", "doctor"),
    PrivateName("verl.plugin.platform.platform_manager:_current_platform", "plugin/platform/platform_manager.py:26, "
                ":143-149", "the platform singleton, None until get_platform() first resolves it (the plugin must "
                "leave it None during import verl)", "doctor"),
    # -- building an agent loop as AgentLoopWorker does (standalone) -----------------------------------
    PrivateName(f"{_AGENT_LOOP}:DictConfigWrap", "experimental/agent_loop/agent_loop.py:195, :685-691",
                "DictConfigWrap(config) wraps trainer_config and data_config for hydra.utils.instantiate",
                "standalone"),
    PrivateName(f"{_AGENT_LOOP}:ToolListWrap", "experimental/agent_loop/agent_loop.py:202, :692",
                "ToolListWrap(tools) wraps the tool list", "standalone"),
    # -- our v1 trainer mode (trainer_mode, igpo_step) --------------------------------------------------
    PrivateName("verl.trainer.ppo.v1.trainer_sync:PPOTrainerSync._compute_advantage",
                "trainer/ppo/v1/trainer_base.py:1743", "(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta",
                "trainer_mode (override)"),
    PrivateName("verl.trainer.ppo.v1.trainer_sync:PPOTrainerSync._compute_metrics",
                "trainer/ppo/v1/trainer_base.py:1868", "(self, batch, metrics, timing_raw, global_steps, epoch)",
                "trainer_mode (override)"),
    PrivateName(f"{_TRAINER}:PPOTrainer.timing_raw", "trainer/ppo/v1/trainer_base.py:470, :565", "dict of step "
                "timings, 'gen' = generation seconds", "igpo_step", instance=True),
    PrivateName(f"{_TRAINER}:PPOTrainer.logger", "trainer/ppo/v1/trainer_base.py:423; utils/tracking.py:186, :534",
                "Tracking whose .logger dict holds the 'file' FileLogger with .filepath", "trainer_mode",
                instance=True),
    PrivateName("verl.trainer.ppo.padding_utils:upsample_batch_to_divisible_size",
                "trainer/ppo/padding_utils.py:144", "(batch, batch_multiple, eos_token_id) -> KVBatchMeta; "
                "padding rows carry tag is_padding=True (read as tag.get('is_padding') at trainer_base.py:1870)",
                "trainer_mode, igpo_step, igpo_scoring"),
    PrivateName("verl.workers.utils.padding:response_to_nested", "workers/utils/padding.py:213",
                "(dense (bs, L) tensor, jagged response_mask) -> jagged tensor", "trainer_mode, igpo_step"),
    PrivateName("verl.workers.utils.padding:response_from_nested", "workers/utils/padding.py:194",
                "(jagged per-position tensor, jagged response_mask) -> jagged response part", "igpo_scoring"),
    PrivateName("verl.utils.tensordict_utils:list_of_dict_to_tensordict", "utils/tensordict_utils.py:918",
                "list of per-sample dicts -> TensorDict", "igpo_scoring"),
    PrivateName("verl.utils.seqlen_balancing:calculate_workload", "utils/seqlen_balancing.py:27",
                "(seqlens tensor) -> workload tensor", "igpo_scoring"),
    PrivateName("verl.utils.seqlen_balancing:get_seqlen_balanced_partitions", "utils/seqlen_balancing.py:213",
                "(seqlen_list, k_partitions, equal_size) -> list of index lists covering every row",
                "igpo_scoring"),
    PrivateName("verl.single_controller.base.worker_group:WorkerGroup._dispatch_info",
                "single_controller/base/worker_group.py:145; base/decorator.py:272-276",
                "dict mesh name -> per-rank dp rank, filled lazily by _query_dispatch_info", "igpo_scoring",
                instance=True),
    PrivateName("verl.single_controller.base.worker:Worker._query_dispatch_info",
                "single_controller/base/worker.py:103", "(mesh_name) -> dp rank of each worker", "igpo_scoring"),
    PrivateName("verl.workers.engine_workers:TrainingWorker.infer_batch", "workers/engine_workers.py:401; "
                "engine/fsdp/transformer_impl.py:1159, :1336", "compute_log_prob reads 'compute_loss', "
                "'calculate_entropy' and 'temperature' from the batch's non-tensor data", "igpo_scoring"),
    # -- the CPU rollout replica (cpu/hf_rollout) -------------------------------------------------------
    PrivateName(f"{_REPLICA}.servers", "workers/rollout/replica.py:127", "list of server handles", "cpu/hf_rollout",
                instance=True),
    PrivateName(f"{_REPLICA}._server_handle", "workers/rollout/replica.py:129", "set by launch_servers",
                "cpu/hf_rollout", instance=True),
    PrivateName(f"{_REPLICA}._server_address", "workers/rollout/replica.py:128", "set by launch_servers",
                "cpu/hf_rollout", instance=True),
    # -- the agent loop (agent_loop.py imports these itself) -------------------------------------------
    PrivateName(f"{_AGENT_LOOP}:AgentLoopBase.rollout_config", "experimental/agent_loop/agent_loop.py:236",
                "config.actor_rollout_ref.rollout", "agent_loop", instance=True),
    PrivateName(f"{_AGENT_LOOP}:AgentLoopBase.apply_chat_template_kwargs",
                "experimental/agent_loop/agent_loop.py:242", "data.apply_chat_template_kwargs dict", "agent_loop",
                instance=True),
    PrivateName("verl.utils.rollout_trace:rollout_trace_op", "utils/rollout_trace.py:364",
                "decorator for AgentLoopBase.run", "agent_loop"),
    PrivateName(f"{_AGENT_LOOP}:AgentLoopWorker._postprocess", "experimental/agent_loop/agent_loop.py:1057, :1125",
                "extra_fields keys min_global_steps / max_global_steps (copied from TokenOutput.extra_fields)",
                "agent_loop"),
    # -- CPU patches (cpu/patches.py), applied only with VERL_PLATFORM=cpu -----------------------------
    PrivateName("verl.workers.rollout.base:_ROLLOUT_REGISTRY", "workers/rollout/base.py:89",
                "dict (name, 'async') -> class path, no register function", "cpu/patches", patch="rollout_registry"),
    PrivateName("verl.workers.rollout.base:get_rollout_class", "workers/rollout/base.py:96",
                "imports the class path stored in _ROLLOUT_REGISTRY", "cpu/patches", patch="rollout_registry"),
    PrivateName("verl.utils.distributed:initialize_global_process_group_ray", "utils/distributed.py:89",
                "(timeout_second, backend) builds f'cpu:gloo,{device}:{backend}'", "cpu/patches",
                patch="gloo_backend"),
    PrivateName("verl.utils.distributed:initialize_global_process_group", "utils/distributed.py:62-75",
                "(timeout_second) -> (local_rank, rank, world_size)", "cpu/patches", patch="gloo_backend"),
    PrivateName(f"{_FSDP}:CPUOffloadPolicy", "workers/engine/fsdp/transformer_impl.py:462",
                "module attribute called with pin_memory=True", "cpu/patches", patch="fsdp2_offload_no_pin"),
    PrivateName("verl.workers.engine.base:EngineRegistry._engines", "workers/engine/base.py:348, :370-392",
                "dict model_type -> backend -> device -> class", "cpu/patches", patch="fsdp_engine_cpu"),
    PrivateName(f"{_FSDP}:FSDPEngineWithLMHead", "workers/engine/fsdp/transformer_impl.py:1143",
                "the language-model FSDP engine", "cpu/patches", patch="fsdp_engine_cpu"),
    PrivateName(f"{_FSDP}:FSDPEngineWithValueHead", "workers/engine/fsdp/transformer_impl.py:1594",
                "the value-model FSDP engine", "cpu/patches", patch="fsdp_engine_cpu"),
    PrivateName("verl.utils.model:load_valuehead_model", "utils/model.py:641-650",
                "(local_path, torch_dtype, model_config, trust_remote_code)", "cpu/patches", patch="valuehead_attn"),
    PrivateName("verl.workers.config.model:HFModelConfig.__post_init__", "workers/config/model.py:185",
                "reads override_config.attn_implementation", "cpu/patches", patch="default_attn_sdpa"),
    PrivateName("verl.utils.device:auto_set_device", "utils/device.py:160; trainer/main_ppo.py:174",
                "(config) sets config.trainer.device", "cpu/patches", patch="auto_set_device"),
)
"""The table. Order: by the adapter module that relies on the name."""


def resolve(target: str) -> Any:
    """The object named ``module:attr[.attr]`` (raises ImportError / AttributeError when it is gone)."""
    module_name, path = target.split(":")
    obj: Any = importlib.import_module(module_name)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _assigned_on_instances(target: str) -> bool:
    owner_target, attr = target.rsplit(".", 1)
    owner = resolve(owner_target)
    return any(f"self.{attr}{sep}" in inspect.getsource(cls) for cls in owner.__mro__[:-1] for sep in (" =", ":"))


def missing_names(names: Sequence[PrivateName] = PRIVATE_NAMES) -> list[str]:
    """The targets of ``names`` that the installed veRL no longer has."""
    return [name.target for name in names if not _exists(name)]


def _exists(name: PrivateName) -> bool:
    try:
        if name.instance:
            return _assigned_on_instances(name.target)
        resolve(name.target)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# Accessors (veRL imported on first use: this module is imported while ``import verl`` loads plugins)
# ---------------------------------------------------------------------------------------------------
_WRAPPED_MARK = "__verl_selflock_wrapped__"


def install_config_validation(validate: Callable[[Any], None]) -> None:
    """Make veRL's driver-side ``validate_config`` call ``validate(config)`` first (our
    ``validate_selflock_config``). Idempotent."""
    import verl.utils.config as verl_config

    original = verl_config.validate_config
    if getattr(original, _WRAPPED_MARK, False):
        return

    @functools.wraps(original)
    def validate_config(config: Any, *args: Any, **kwargs: Any) -> Any:
        validate(config)
        return original(config, *args, **kwargs)

    setattr(validate_config, _WRAPPED_MARK, True)
    verl_config.validate_config = validate_config


def config_validation_installed() -> bool:
    return bool(getattr(resolve("verl.utils.config:validate_config"), _WRAPPED_MARK, False))


def agent_loop_registry() -> dict[str, Any]:
    return resolve(f"{_AGENT_LOOP}:_agent_loop_registry")


def adv_estimator_registry() -> dict[Any, Any]:
    return resolve("verl.trainer.ppo.core_algos:ADV_ESTIMATOR_REGISTRY")


def registered_agent_loops() -> list[str]:
    return sorted(agent_loop_registry())


def registered_trainer_modes() -> list[str]:
    return sorted(resolve(f"{_TRAINER}:TRAINER_REGISTRY"))


def registered_estimators() -> list[str]:
    return sorted(str(name) for name in adv_estimator_registry())


def registered_reward_managers() -> list[str]:
    return sorted(resolve("verl.experimental.reward_loop.reward_manager.registry:REWARD_MANAGER"))


def agent_loop_init_kwargs(config: Any, tools: Sequence[Any] = ()) -> dict[str, Any]:
    """The keyword arguments ``AgentLoopWorker._run_agent_loop`` passes to an agent loop, besides the
    server manager, tokenizer and ``hf_model_type`` (agent_loop.py:683-693); no processor, no tools."""
    from verl.utils.dataset.rl_dataset import RLHFDataset

    wrap_config = resolve(f"{_AGENT_LOOP}:DictConfigWrap")
    return {
        "trainer_config": wrap_config(config=config),
        "processor": None,
        "dataset_cls": RLHFDataset,
        "data_config": wrap_config(config.data),
        "tools": resolve(f"{_AGENT_LOOP}:ToolListWrap")(list(tools)),
    }


def padding_flags(batch: Any) -> list[bool]:
    """Per row of a ``KVBatchMeta``, True for veRL's synthetic padding rows (tag ``is_padding``)."""
    return [bool(tag.get("is_padding", False)) for tag in batch.tags]


def generation_seconds(trainer: Any) -> float:
    """The running step's generation time (``timing_raw["gen"]``), 0 when unknown."""
    return float((getattr(trainer, "timing_raw", None) or {}).get("gen", 0.0))


def metrics_file_path(trainer: Any) -> str | None:
    """Where the trainer's ``file`` logger writes the metrics JSONL (None when that logger is off)."""
    backends = getattr(getattr(trainer, "logger", None), "logger", {}) or {}
    file_logger = backends.get("file")
    return getattr(file_logger, "filepath", None) if file_logger is not None else None


def response_to_nested(tensor: Any, response_mask: Any) -> Any:
    return resolve("verl.workers.utils.padding:response_to_nested")(tensor, response_mask)


def response_from_nested(tensor: Any, response_mask: Any) -> Any:
    return resolve("verl.workers.utils.padding:response_from_nested")(tensor, response_mask)


def list_of_dict_to_tensordict(samples: list[dict[str, Any]]) -> Any:
    return resolve("verl.utils.tensordict_utils:list_of_dict_to_tensordict")(samples)


def upsample_to_multiple(meta: Any, multiple: int, eos_token_id: int) -> Any:
    """Pad a ``KVBatchMeta`` with veRL's synthetic no-op rows to a multiple of ``multiple`` rows."""
    return resolve("verl.trainer.ppo.padding_utils:upsample_batch_to_divisible_size")(meta, multiple, eos_token_id)


def balanced_partitions(seqlens: Any, k_partitions: int) -> list[list[int]]:
    """veRL's token-balanced equal-size partition of rows (as ``_balance_batch`` makes it)."""
    workload = resolve("verl.utils.seqlen_balancing:calculate_workload")(seqlens)
    return resolve("verl.utils.seqlen_balancing:get_seqlen_balanced_partitions")(
        workload, k_partitions=k_partitions, equal_size=True
    )


def actor_dp_size(worker_group: Any) -> int:
    """Data-parallel size of the actor mesh: the lookup veRL's own dispatch makes (decorator.py:272-276)."""
    info = worker_group._dispatch_info.get("actor")
    if info is None:
        info = worker_group._dispatch_info["actor"] = worker_group._query_dispatch_info("actor")
    return max(info) + 1


def forward_only_options(temperature: float) -> dict[str, Any]:
    """``extra_info`` of a batch for the actor's ``compute_log_prob``: log-probs at ``temperature``, no
    entropy, no loss."""
    return {"calculate_entropy": False, "compute_loss": False, "temperature": temperature}


def rollout_class_registry() -> dict[tuple[str, str], str]:
    return resolve("verl.workers.rollout.base:_ROLLOUT_REGISTRY")


def engine_devices(model_type: str, backend: str) -> dict[Any, Any]:
    """Devices (keys) an engine is registered for in ``EngineRegistry`` (read-only use)."""
    return resolve("verl.workers.engine.base:EngineRegistry._engines").get(model_type, {}).get(backend, {})
