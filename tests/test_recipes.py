"""Every recipe composes against veRL's real config and passes veRL's and our validation."""

from __future__ import annotations

from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
GPU_RECIPES = sorted(
    (path.parent.name, path.stem)
    for task in ("pe_g", "pe_f", "mediq", "flodial")
    for path in RECIPES.glob(f"{task}/*.yaml")
    if path.stem not in ("base", "sft_warmstart") and not path.stem.startswith("cpu_")
)
LAM = {"pe_g": 0.2, "pe_f": 1.0, "mediq": 1.0, "flodial": 0.5}


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory) -> list[str]:
    """Real data files for the recipes' validation, which opens their parquet footers: a small PE-G set
    from our builder (the checks read the columns every task's builder writes, not the task)."""
    from verl_selflock.data.pe import build_pe_dataset

    paths = build_pe_dataset("gated", 3, 4, 2, 0, tmp_path_factory.mktemp("pe"), max_turns=4, progress=False)
    return [f"data.train_files={paths['train']}", f"data.val_files={paths['test']}"]


def compose_recipe(
    task: str, name: str, model_dir: str, overrides: list[str] | None = None, data: list[str] | None = None
):
    """A recipe with the paper's 7B model swapped for a local one (veRL's validation reads its config) and
    ``data`` (``recipe_data``) for its files; placeholders when the test never validates."""
    from hydra import compose, initialize_config_dir

    files = data or ["data.train_files=t.parquet", "data.val_files=v.parquet"]
    local = files + [f"actor_rollout_ref.model.path={model_dir}"]
    with initialize_config_dir(config_dir=str(RECIPES / task), version_base=None):
        return compose(config_name=name, overrides=local + (overrides or []))


def test_every_task_has_the_issue_recipes():
    names = {name for task, name in GPU_RECIPES if task == "pe_g"}
    assert {"vanilla_ppo", "arew_as", "arew_as_bt", "grpo", "gspo", "arew_grpo", "arew_gspo"} <= names
    assert {"t3", "t3_arew", "igpo"} <= names
    assert {name for task, name in GPU_RECIPES if task == "pe_f"} == names
    assert {name for task, name in GPU_RECIPES if task == "flodial"} == {"vanilla_ppo", "arew_as", "arew_as_bt"}
    assert {name for task, name in GPU_RECIPES if task == "mediq"} >= {"vanilla_ppo", "arew_as", "arew_as_bt"}


@pytest.mark.parametrize("task, name", GPU_RECIPES)
def test_recipe_composes_and_validates(task, name, smollm2_dir, recipe_data):
    import verl  # noqa: F401  (installs our driver-side validation)
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    config = compose_recipe(task, name, smollm2_dir, data=recipe_data)
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
    assert config.trainer.v1.trainer_mode == "selflock"  # every recipe logs the self-locking diagnostics
    if config.algorithm.adv_estimator == "igpo":
        from verl_selflock.verl_adapter.config_validation import igpo_config_of

        assert igpo_config_of(config).norm_mode == "joint" and config.actor_rollout_ref.rollout.n > 1
        assert config.trainer.v1.trainer_mode == "selflock" and not need_critic(config)
    t3 = _agent_loop_t3(config)
    assert t3.get("enabled", False) == name.startswith("t3"), t3
    assert config.reward.reward_manager.name == "active_reasoning"
    assert config.actor_rollout_ref.rollout.agent.default_agent_loop == "active_reasoning"
    assert config.trainer.total_training_steps == 200


def _agent_loop_knobs(config) -> dict:
    """The recipe's agent-loop knobs (the ``selflock_agent_loop`` node every agent-loop worker reads),
    resolved; {} if none. No recipe needs an agent-loop YAML (the plugin registers the loop by name)."""
    from omegaconf import OmegaConf

    import verl_selflock.verl_adapter.plugin  # noqa: F401  (registers the resolvers)

    assert OmegaConf.select(config, "actor_rollout_ref.rollout.agent.agent_loop_config_path") is None
    node = OmegaConf.select(config, "selflock_agent_loop")
    return {} if node is None else OmegaConf.to_container(node, resolve=True)


def _agent_loop_t3(config) -> dict:
    return _agent_loop_knobs(config).get("t3") or {}


def test_no_recipe_uses_the_old_agent_loop_yaml_knobs():
    """``${selflock.agent_loop_yaml:...}`` with knobs wrote a file on one node only (issue 14)."""
    import re

    old_form = re.compile(r"\$\{selflock\.agent_loop_yaml:[^}]")  # ${selflock.agent_loop_yaml:} alone is fine
    assert [str(path) for path in RECIPES.glob("*/*.yaml") if old_form.search(path.read_text())] == []


def test_recipe_with_a_bad_override_fails_validation(smollm2_dir):
    import verl  # noqa: F401
    from verl.utils.config import validate_config

    from verl_selflock.verl_adapter.config_validation import SelflockConfigError

    config = compose_recipe("pe_g", "arew_as_bt", smollm2_dir, ["algorithm.arew.lam=-0.5"])
    with pytest.raises(SelflockConfigError, match=r"algorithm\.arew\.lam"):
        validate_config(config, use_reference_policy=False, use_critic=True)


def test_flodial_recipe_selects_the_split_and_wires_the_simulator(smollm2_dir, monkeypatch):
    """``flodial.difficulty`` picks the data folder; the recipe's ``selflock_agent_loop`` node carries the
    simulator endpoint (environment variables win over the defaults) and max_turns 10."""
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("SELFLOCK_SIMULATOR_BASE_URL", "http://sim.example:9000/v1")
    monkeypatch.delenv("SELFLOCK_SIMULATOR_MODEL", raising=False)
    with initialize_config_dir(config_dir=str(RECIPES / "flodial"), version_base=None):
        config = compose(
            config_name="arew_as_bt",
            overrides=[f"actor_rollout_ref.model.path={smollm2_dir}", "flodial.difficulty=hard", "flodial.data_root=/d"],
        )
    assert config.data.train_files == "/d/flodial_hard/train.parquet"
    assert config.data.val_files == "/d/flodial_hard/test.parquet"
    assert config.trainer.experiment_name == "flodial_hard_arew_as_bt"
    knobs = _agent_loop_knobs(config)
    assert knobs["max_turns"] == 10
    assert knobs["simulator"] == {
        "base_url": "http://sim.example:9000/v1",
        "model": "Qwen/Qwen2.5-14B-Instruct",
        "api_key_env": "SELFLOCK_SIMULATOR_API_KEY",
        "temperature": 0.0,
        "max_tokens": 16,
        "timeout_s": 30,
        "max_concurrency": 64,
    }
    assert knobs["max_turn_tokens"] == 512 and knobs["max_obs_tokens"] == 512


def test_the_driver_pins_the_simulator_endpoint_into_the_config(smollm2_dir, recipe_data, monkeypatch):
    """veRL's driver-side validation (ours runs inside it) resolves ``selflock_agent_loop`` in the driver's
    environment and writes the plain values back: the TaskRunner, wherever Ray puts it, and every
    agent-loop worker then see the URL of the shell that launched the run, not their own environment's."""
    import verl  # noqa: F401
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    monkeypatch.setenv("SELFLOCK_SIMULATOR_BASE_URL", "http://sim.example:9000/v1")
    monkeypatch.setenv("SELFLOCK_SIMULATOR_MODEL", "patient-model")
    config = compose_recipe("mediq", "arew_as", smollm2_dir, data=recipe_data)
    assert "oc.env" in OmegaConf.to_yaml(config.selflock_agent_loop, resolve=False)
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    monkeypatch.setenv("SELFLOCK_SIMULATOR_BASE_URL", "http://elsewhere:1/v1")  # e.g. the TaskRunner's node
    pinned = OmegaConf.to_yaml(config.selflock_agent_loop, resolve=False)
    assert "oc.env" not in pinned and "${" not in pinned
    assert config.selflock_agent_loop.simulator.base_url == "http://sim.example:9000/v1"
    assert config.selflock_agent_loop.simulator.model == "patient-model"
    assert config.selflock_agent_loop.simulator.api_key_env == "SELFLOCK_SIMULATOR_API_KEY"  # a name, never a key


def test_mediq_recipe_reaches_the_agent_loop(smollm2_dir, monkeypatch):
    """The MediQ recipes hand the simulator endpoint (environment variables or overrides) and the
    counterfactual switch to the agent loop through the ``selflock_agent_loop`` node of the config."""
    from verl_selflock.simulators import SimulatorConfig
    from verl_selflock.verl_adapter.agent_loop_config import loop_config_for

    monkeypatch.setenv("SELFLOCK_SIMULATOR_BASE_URL", "http://sim.example:9000/v1")
    monkeypatch.delenv("SELFLOCK_SIMULATOR_MODEL", raising=False)
    config = compose_recipe("mediq", "arew_as_bt", smollm2_dir)
    loop_config = loop_config_for(config)  # what the loop builds from the config it receives
    assert loop_config.counterfactual_bt is True and loop_config.max_turn_tokens == 512
    simulator = SimulatorConfig.from_mapping(loop_config.simulator)
    assert simulator.base_url == "http://sim.example:9000/v1"
    assert simulator.model == "Qwen/Qwen2.5-14B-Instruct" and simulator.temperature == 0.0
    assert config.algorithm.arew.channels == "both"

    config = compose_recipe(
        "mediq", "vanilla_ppo", smollm2_dir,
        ["selflock_agent_loop.simulator.model=/models/patient", "selflock_agent_loop.counterfactual_bt=false"],
    )
    knobs = _agent_loop_knobs(config)
    assert knobs["simulator"]["model"] == "/models/patient" and knobs["counterfactual_bt"] is False


TAU2_RECIPES = ["vanilla_ppo", "arew"]


@pytest.mark.parametrize("name", TAU2_RECIPES)
def test_tau2_recipe_composes_and_validates(name, smollm2_dir, recipe_data):
    """The tau2 telecom recipes: veRL's validation, the paper's settings, and an agent-loop config that
    carries the user endpoint (set on the command line) and the environment's stop tags."""
    import verl  # noqa: F401
    import yaml
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    user = ["selflock_agent_loop.simulator.base_url=http://user-sim:9000/v1", "selflock_agent_loop.simulator.model=my-user-model"]
    config = compose_recipe("tau2_telecom", name, smollm2_dir, user, data=recipe_data)
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    assert need_critic(config)
    if name == "arew":
        arew = config.algorithm.arew
        assert (arew.lam, arew.mode, arew.fallbacks, arew.channels) == (50.0, "step_abs_sum", True, "as")
        assert config.trainer.v1.trainer_mode == "selflock"
    else:
        assert config.algorithm.adv_estimator == "gae"
    assert config.trainer.total_training_steps == 200

    knobs = _agent_loop_knobs(config)
    assert knobs["stop_on_closing_tag"] is True
    simulator = knobs["simulator"]
    assert simulator["base_url"] == "http://user-sim:9000/v1" and simulator["model"] == "my-user-model"
    assert simulator["temperature"] == 0.0 and simulator["max_tokens"] == 256
    # compose_recipe swapped the paper's policy out for a local model; the recipe itself names it.
    base = yaml.safe_load((RECIPES / "tau2_telecom" / "base.yaml").read_text())
    assert base["actor_rollout_ref"]["model"]["path"] == "Qwen/Qwen2.5-14B-Instruct"


def test_igpo_recipe_with_a_bad_override_fails_validation(smollm2_dir):
    import verl  # noqa: F401
    from verl.utils.config import validate_config

    from verl_selflock.verl_adapter.config_validation import SelflockConfigError

    config = compose_recipe("pe_g", "igpo", smollm2_dir, ["algorithm.igpo.norm_mode=global"])
    with pytest.raises(SelflockConfigError, match=r"algorithm\.igpo\.norm_mode"):
        validate_config(config, use_reference_policy=False, use_critic=False)


def test_t3_recipe_with_a_bad_knob_fails_on_the_driver(smollm2_dir, recipe_data):
    import verl  # noqa: F401
    from verl.utils.config import validate_config

    from verl_selflock.verl_adapter.config_validation import SelflockConfigError

    config = compose_recipe("pe_g", "t3", smollm2_dir, ["selflock_agent_loop.t3.k=0"], data=recipe_data)
    with pytest.raises(SelflockConfigError, match=r"selflock_agent_loop: .*t3\.k must be an integer >= 1"):
        validate_config(config, use_reference_policy=False, use_critic=True)


def test_the_old_resolver_form_with_knobs_says_what_to_write(smollm2_dir):
    from omegaconf import OmegaConf

    import verl_selflock.verl_adapter.plugin  # noqa: F401

    override = "actor_rollout_ref.rollout.agent.agent_loop_config_path=${selflock.agent_loop_yaml:'t3.enabled=true','t3.k=2'}"
    config = compose_recipe("pe_g", "grpo", smollm2_dir, [override])
    with pytest.raises(Exception, match=r"selflock_agent_loop: \{t3: \{enabled: true, k: 2\}\}") as caught:
        OmegaConf.select(config, "actor_rollout_ref.rollout.agent.agent_loop_config_path")
    assert "++selflock_agent_loop.t3.enabled=true ++selflock_agent_loop.t3.k=2" in str(caught.value)


@pytest.mark.parametrize("name, counterfactual", [("vanilla_ppo", False), ("arew_as", False), ("arew_as_bt", True)])
def test_mediq_counterfactual_branches_only_where_bt_critiques_train(name, counterfactual, smollm2_dir):
    """Counterfactual BT branches cost a generation per informative reply: only the recipe that trains on
    BT critiques (AREW AS+BT) turns them on; the agent loop's own default would be on."""
    from verl_selflock.verl_adapter.agent_loop_config import ActiveReasoningLoopConfig

    assert ActiveReasoningLoopConfig().counterfactual_bt is True  # so base.yaml must say false
    config = compose_recipe("mediq", name, smollm2_dir)
    trains_bt = config.algorithm.adv_estimator == "arew" and config.algorithm.arew.channels == "both"
    assert _agent_loop_knobs(config)["counterfactual_bt"] is trains_bt is counterfactual


SIMULATOR_GPU = "CUDA_VISIBLE_DEVICES=7 vllm serve"
TRAINER_GPUS = "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6 python -m verl.trainer.main_ppo"


def _same_node_command(task: str) -> tuple[str, list[str]]:
    """(recipe name, overrides) of the README's training command for a node whose GPU 7 runs the simulator.
    Overrides naming local paths ($HOME) are left out: compose_recipe supplies its own."""
    import shlex

    text = (RECIPES / task / "README.md").read_text()
    assert SIMULATOR_GPU in text, f"{task}: README has no simulator pinned to GPU 7"
    start = text.index(TRAINER_GPUS)
    command = text[start : text.index("```", start)].replace("\\\n", " ")
    tokens = shlex.split(command.splitlines()[0])
    name = tokens[tokens.index("--config-name") + 1]
    overrides = [t for t in tokens if "=" in t and "$" not in t and not t.startswith(("CUDA_", "--"))]
    return name, overrides


@pytest.mark.parametrize("task", ["mediq", "flodial", "tau2_telecom"])
def test_readme_same_node_command_keeps_training_off_the_simulator_gpu(task, smollm2_dir, recipe_data):
    """The README's command for a simulator on GPU 7 gives training GPUs 0-6 only, and its overrides pass
    veRL's validation with 7 GPUs."""
    import verl  # noqa: F401
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    name, overrides = _same_node_command(task)
    assert "trainer.n_gpus_per_node=7" in overrides
    config = compose_recipe(task, name, smollm2_dir, overrides, data=recipe_data)
    assert config.trainer.n_gpus_per_node == 7
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
