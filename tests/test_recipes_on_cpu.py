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
    assert config.reward.reward_manager.name == "active_reasoning"
    assert config.actor_rollout_ref.rollout.agent.default_agent_loop == "active_reasoning"
    assert config.trainer.total_training_steps == 200


def test_recipe_with_a_bad_override_fails_validation(smollm2_dir):
    import verl  # noqa: F401
    from verl.utils.config import validate_config

    from verl_selflock.config import SelflockConfigError

    config = compose_recipe("pe_g", "arew_as_bt", smollm2_dir, ["algorithm.arew.lam=-0.5"])
    with pytest.raises(SelflockConfigError, match=r"algorithm\.arew\.lam"):
        validate_config(config, use_reference_policy=False, use_critic=True)


TAU2_RECIPES = ["vanilla_ppo", "arew"]


@pytest.mark.parametrize("name", TAU2_RECIPES)
def test_tau2_recipe_composes_and_validates(name, smollm2_dir):
    """The tau2 telecom recipes: veRL's validation, the paper's settings, and an agent-loop config that
    carries the user endpoint (set on the command line) and the environment's stop tags."""
    import yaml
    import verl  # noqa: F401
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    user = ["tau2_user.base_url=http://user-sim:9000/v1", "tau2_user.model=my-user-model"]
    config = compose_recipe("tau2_telecom", name, smollm2_dir, user)
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    assert need_critic(config)
    if name == "arew":
        arew = config.algorithm.arew
        assert (arew.lam, arew.mode, arew.fallbacks, arew.channels) == (50.0, "step_abs_sum", True, "as")
        assert config.trainer.v1.trainer_mode == "selflock"
    else:
        assert config.algorithm.adv_estimator == "gae"
    assert config.trainer.total_training_steps == 200

    [entry] = yaml.safe_load(open(config.actor_rollout_ref.rollout.agent.agent_loop_config_path))
    assert entry["name"] == "active_reasoning" and entry["stop_on_closing_tag"] is True
    simulator = entry["simulator"]
    assert simulator["base_url"] == "http://user-sim:9000/v1" and simulator["model"] == "my-user-model"
    assert simulator["temperature"] == 0.0 and simulator["max_tokens"] == 256
    # compose_recipe swapped the paper's policy out for a local model; the recipe itself names it.
    base = yaml.safe_load((RECIPES / "tau2_telecom" / "base.yaml").read_text())
    assert base["actor_rollout_ref"]["model"]["path"] == "Qwen/Qwen2.5-14B-Instruct"
