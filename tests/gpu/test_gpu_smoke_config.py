"""The GPU smoke jobs' configs pass our driver-side validation and veRL's own, here on CPU (no CUDA
needed to compose and validate them), so a GPU run never stops on a config mistake."""

from __future__ import annotations

import pytest
from gpu_smoke_config import RECIPE, RECIPE_DIR, smoke_command, smoke_overrides


def _compose(overrides: list[str], model_dir: str, data: list[str]):
    import verl  # noqa: F401  (loads our plugin: resolvers and driver-side validation)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(RECIPE_DIR), version_base=None):
        return compose(config_name=RECIPE, overrides=[*data, f"actor_rollout_ref.model.path={model_dir}", *overrides])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    from verl_selflock.data.pe import build_pe_dataset

    paths = build_pe_dataset("gated", 3, 4, 2, 0, tmp_path_factory.mktemp("pe"), max_turns=4, progress=False)
    return [f"data.train_files={paths['train']}", f"data.val_files={paths['test']}"]


@pytest.mark.parametrize("estimator", ["arew", "igpo"])
@pytest.mark.parametrize("rollout", ["vllm", "hf"])
@pytest.mark.parametrize("remove_padding", [False, True])
def test_smoke_configs_validate(estimator, rollout, remove_padding, smollm2_dir, data):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from verl_selflock.verl_adapter.config_validation import validate_selflock_config
    from verl_selflock.verl_adapter.igpo_scoring import scoring_token_limit

    config = _compose(smoke_overrides(estimator, rollout, remove_padding=remove_padding), smollm2_dir, data)
    validate_selflock_config(config)
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    roles = config.actor_rollout_ref
    assert config.trainer.device == "cuda" and roles.rollout.name == rollout and roles.rollout.n == 2
    assert roles.actor.use_dynamic_bsz and roles.rollout.log_prob_use_dynamic_bsz and roles.ref.log_prob_use_dynamic_bsz
    assert roles.model.override_config.attn_implementation == "sdpa"
    assert config.transfer_queue.backend.SimpleStorage.num_data_storage_units == 2
    assert need_critic(config) == (estimator == "arew")
    # IGPO's scoring sequences (<= prompt + response + bridge + answer) fit the dynamic-batch limit.
    limit = scoring_token_limit(config)
    assert limit is not None and limit >= config.data.max_prompt_length + config.data.max_response_length + 64


def test_smoke_command_is_main_ppo_on_the_recipe(tmp_path):
    cmd = smoke_command("igpo", "gpu_igpo", tmp_path)
    assert cmd[1:3] == ["-m", "verl.trainer.main_ppo"] and f"--config-name={RECIPE}" in cmd
    assert "algorithm.adv_estimator=igpo" in cmd and "critic.enable=false" in cmd
    with pytest.raises(ValueError, match="estimator"):
        smoke_overrides("gae")
