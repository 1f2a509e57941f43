"""Every recipe composes against veRL's real config and passes veRL's and our validation."""

from __future__ import annotations

from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
GPU_RECIPES = sorted(
    (path.parent.name, path.stem)
    for path in RECIPES.glob("pe_*/*.yaml")
    if path.stem not in ("base",) and not path.stem.startswith("cpu_")
)
LAM = {"pe_g": 0.2, "pe_f": 1.0}


def compose_recipe(task: str, name: str, model_dir: str, overrides: list[str] | None = None):
    """A recipe with the paper's 7B model swapped for a local one (veRL's validation reads its config)."""
    from hydra import compose, initialize_config_dir

    local = ["data.train_files=t.parquet", "data.val_files=v.parquet", f"actor_rollout_ref.model.path={model_dir}"]
    with initialize_config_dir(config_dir=str(RECIPES / task), version_base=None):
        return compose(config_name=name, overrides=local + (overrides or []))


def test_every_task_has_the_issue_recipes():
    names = {name for task, name in GPU_RECIPES if task == "pe_g"}
    assert {"vanilla_ppo", "arew_as", "arew_as_bt", "grpo", "gspo", "arew_grpo", "arew_gspo"} <= names
    assert {"t3", "t3_arew", "igpo"} <= names
    assert {name for task, name in GPU_RECIPES if task == "pe_f"} == names


@pytest.mark.parametrize("task, name", GPU_RECIPES)
def test_recipe_composes_and_validates(task, name, smollm2_dir):
    import verl  # noqa: F401  (installs our driver-side validation)
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    config = compose_recipe(task, name, smollm2_dir)
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))

    arew = config.algorithm.get("arew")
    if config.algorithm.adv_estimator == "arew":
        assert arew.lam == LAM[task] and arew.mode == "minority_fixed"
        assert config.trainer.v1.trainer_mode == "selflock"
        assert need_critic(config) == (arew.base == "gae")
    else:
        assert need_critic(config) == (config.algorithm.adv_estimator == "gae")
    if "gspo" in name:
        assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "gspo"
    if config.algorithm.adv_estimator == "igpo":
        from verl_selflock.config import igpo_config_of

        assert igpo_config_of(config).norm_mode == "joint" and config.actor_rollout_ref.rollout.n > 1
        assert config.trainer.v1.trainer_mode == "selflock" and not need_critic(config)
    t3 = _agent_loop_t3(config)
    assert t3.get("enabled", False) == name.startswith("t3"), t3
    assert config.reward.reward_manager.name == "active_reasoning"
    assert config.actor_rollout_ref.rollout.agent.default_agent_loop == "active_reasoning"
    assert config.trainer.total_training_steps == 200


def _agent_loop_t3(config) -> dict:
    """The ``t3`` settings of the recipe's agent-loop YAML (resolved by our resolver), {} if none."""
    import yaml
    from omegaconf import OmegaConf

    import verl_selflock.plugin  # noqa: F401  (registers the resolvers)

    path = OmegaConf.select(config, "actor_rollout_ref.rollout.agent.agent_loop_config_path")
    if not path:
        return {}
    (entry,) = yaml.safe_load(Path(path).read_text())
    return entry.get("t3") or {}


def test_recipe_with_a_bad_override_fails_validation(smollm2_dir):
    import verl  # noqa: F401
    from verl.utils.config import validate_config

    from verl_selflock.config import SelflockConfigError

    config = compose_recipe("pe_g", "arew_as_bt", smollm2_dir, ["algorithm.arew.lam=-0.5"])
    with pytest.raises(SelflockConfigError, match=r"algorithm\.arew\.lam"):
        validate_config(config, use_reference_policy=False, use_critic=True)


def test_igpo_recipe_with_a_bad_override_fails_validation(smollm2_dir):
    import verl  # noqa: F401
    from verl.utils.config import validate_config

    from verl_selflock.config import SelflockConfigError

    config = compose_recipe("pe_g", "igpo", smollm2_dir, ["algorithm.igpo.norm_mode=global"])
    with pytest.raises(SelflockConfigError, match=r"algorithm\.igpo\.norm_mode"):
        validate_config(config, use_reference_policy=False, use_critic=False)


def test_t3_recipe_with_a_bad_knob_fails_on_the_driver(smollm2_dir):
    from omegaconf import OmegaConf

    import verl_selflock.plugin  # noqa: F401

    override = "actor_rollout_ref.rollout.agent.agent_loop_config_path=${selflock.agent_loop_yaml:'t3.enabled=true','t3.k=0'}"
    config = compose_recipe("pe_g", "t3", smollm2_dir, [override])
    with pytest.raises(Exception, match=r"t3\.k must be an integer >= 1"):
        OmegaConf.select(config, "actor_rollout_ref.rollout.agent.agent_loop_config_path")
