"""Each private veRL name of :data:`~verl_selflock.verl_adapter.private_names.PRIVATE_NAMES` still exists in the
installed veRL and behaves as we assume (signature, type, attribute), checked on real veRL objects."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from verl_selflock.contracts.names import AGENT_NAME
from verl_selflock.verl_adapter import private_names as pn
from verl_selflock.verl_adapter.jagged import padded


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_every_listed_name_still_exists():
    assert pn.missing_names() == []


def test_table_rows_are_complete_and_unique():
    targets = [name.target for name in pn.PRIVATE_NAMES]
    assert len(targets) == len(set(targets))
    for name in pn.PRIVATE_NAMES:
        assert ":" in name.target and name.source and name.assumption and name.used_by, name


def test_a_removed_name_is_reported_missing():
    gone = pn.PrivateName("verl.utils.config:no_such_name", "-", "-", "-")
    gone_attr = pn.PrivateName("verl.utils.config:validate_config.nope", "-", "-", "-", instance=True)
    assert pn.missing_names([gone, gone_attr]) == [gone.target, gone_attr.target]


def test_validate_config_takes_the_config_first_and_the_wrap_is_installed():
    import verl  # noqa: F401  (loads the plugin, which installs the wrap)

    assert _params(pn.resolve("verl.utils.config:validate_config"))[0] == "config"
    assert pn.config_validation_installed()


def test_registries_are_dicts_of_what_we_assume():
    import verl  # noqa: F401

    assert {"gae", "grpo", "arew", "igpo"} <= set(pn.registered_estimators())
    assert all(callable(fn) for fn in pn.adv_estimator_registry().values())
    entry = pn.agent_loop_registry()[AGENT_NAME]
    assert entry["_target_"].startswith("verl_selflock.verl_adapter.agent_loop.")
    assert all(isinstance(cls, type) for cls in pn.resolve(f"{pn._TRAINER}:TRAINER_REGISTRY").values())
    assert "selflock" in pn.registered_trainer_modes() and AGENT_NAME in pn.registered_reward_managers()


def test_agent_loop_init_kwargs_fit_agent_loop_base():
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import AgentLoopBase

    config = OmegaConf.create({"data": {"apply_chat_template_kwargs": {}}})
    kwargs = pn.agent_loop_init_kwargs(config)
    assert kwargs["trainer_config"].config is config and kwargs["data_config"].config is config.data
    params = inspect.signature(AgentLoopBase.__init__).parameters
    assert set(kwargs) - {"tools"} | {"server_manager", "tokenizer"} <= set(params)
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # takes tools=, hf_model_type=


def test_trainer_methods_we_override_keep_their_signatures():
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    assert _params(PPOTrainerSync._compute_advantage) == ["self", "batch", "metrics"]
    assert _params(PPOTrainerSync._compute_metrics) == ["self", "batch", "metrics", "timing_raw", "global_steps", "epoch"]


def test_metrics_file_path_reads_veRLs_file_logger(tmp_path, monkeypatch):
    from verl.utils.tracking import FileLogger

    path = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    file_logger = FileLogger("p", "e")
    try:
        trainer = SimpleNamespace(logger=SimpleNamespace(logger={"file": file_logger}))
        assert pn.metrics_file_path(trainer) == str(path)
        assert pn.metrics_file_path(SimpleNamespace(logger=SimpleNamespace(logger={}))) is None
    finally:
        file_logger.fp.close()
    assert pn.generation_seconds(SimpleNamespace(timing_raw={"gen": 2.5})) == 2.5
    assert pn.generation_seconds(SimpleNamespace()) == 0.0


def test_padding_rows_are_tagged_is_padding():
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo import padding_utils

    assert _params(padding_utils.upsample_batch_to_divisible_size) == ["batch", "batch_multiple", "eos_token_id"]
    assert "is_padding=True" in inspect.getsource(padding_utils)
    meta = KVBatchMeta(keys=["a", "b"], tags=[{}, {"is_padding": True}], partition_id="p")
    assert pn.padding_flags(meta) == [False, True]


def test_nested_helpers_round_trip():
    mask = torch.nested.as_nested_tensor([torch.ones(n, dtype=torch.int64) for n in (2, 3)], layout=torch.jagged)
    dense = torch.arange(6, dtype=torch.float32).view(2, 3)
    nested = pn.response_to_nested(dense, mask)
    assert nested.is_nested
    torch.testing.assert_close(padded(nested, -1.0), torch.tensor([[0.0, 1.0, -1.0], [3.0, 4.0, 5.0]]))
    # per-position output of the whole sequence (prompt 2 + response): log-prob of token p+1 sits at p
    full = torch.nested.as_nested_tensor([torch.arange(4.0), torch.arange(5.0)], layout=torch.jagged)
    answer = pn.response_from_nested(full, mask)
    assert answer.offsets().diff().tolist() == [2, 3]
    torch.testing.assert_close(answer.values(), torch.tensor([1.0, 2.0, 1.0, 2.0, 3.0]))


def test_list_of_dict_to_tensordict_keeps_ragged_rows():
    td = pn.list_of_dict_to_tensordict([{"ids": torch.arange(2)}, {"ids": torch.arange(3)}])
    assert td.batch_size[0] == 2 and td["ids"].is_nested
    assert td["ids"].offsets().diff().tolist() == [2, 3]


def test_balanced_partitions_cover_every_row_in_equal_sizes():
    parts = pn.balanced_partitions(torch.tensor([100, 10, 60, 50, 40, 2]), 2)
    assert sorted(i for part in parts for i in part) == list(range(6))
    assert [len(part) for part in parts] == [3, 3]


def test_actor_dp_size_uses_the_worker_groups_dispatch_cache():
    from verl.single_controller.base.worker import Worker
    from verl.single_controller.base.worker_group import WorkerGroup

    assert _params(Worker._query_dispatch_info)[:2] == ["self", "mesh_name"]
    group = WorkerGroup(resource_pool=None)
    assert group._dispatch_info == {}
    group._query_dispatch_info = lambda mesh: [0, 0, 1, 1]  # what the ONE_TO_ALL call returns per worker
    assert pn.actor_dp_size(group) == 2 and group._dispatch_info == {"actor": [0, 0, 1, 1]}


def test_forward_only_options_are_read_by_the_actor():
    from verl.workers import engine_workers
    from verl.workers.engine.fsdp import transformer_impl

    options = pn.forward_only_options(0.7)
    assert options == {"calculate_entropy": False, "compute_loss": False, "temperature": 0.7}
    assert 'key="compute_loss"' in inspect.getsource(engine_workers.TrainingWorker.infer_batch)
    source = inspect.getsource(transformer_impl)
    assert 'key="calculate_entropy"' in source and 'micro_batch["temperature"]' in source


def test_rollout_and_engine_registries():
    from verl.workers.rollout.base import get_rollout_class

    from verl_selflock.verl_adapter.cpu.hf_rollout import HFServerAdapter
    from verl_selflock.verl_adapter.cpu.patches import register_rollout_class

    assert ("vllm", "async") in pn.rollout_class_registry()
    assert get_rollout_class(register_rollout_class(), "async") is HFServerAdapter
    assert "cuda" in pn.engine_devices("language_model", "fsdp2")
    assert pn.engine_devices("no_such_model", "fsdp") == {}


@pytest.mark.parametrize("attr", ["servers", "_server_handle", "_server_address"])
def test_replica_attributes_we_set_are_initialised_by_veRL(attr):
    from verl.workers.rollout.replica import RolloutReplica

    assert f"self.{attr}" in inspect.getsource(RolloutReplica.__init__)
