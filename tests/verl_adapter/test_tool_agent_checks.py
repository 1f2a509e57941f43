"""Driver-side pieces of the tool-agent example: its resolvers, the package-shipped files every node's workers
open, and the checks of a tool-agent run, through the one validation entry point (``validate_selflock_config``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

import verl_selflock
from verl_selflock.tools.loop_config import TOOL_AGENT_NAME, TOOL_AGENT_TARGET, TOOL_CONFIG_KEY
from verl_selflock.verl_adapter.config_validation import SelflockConfigError, validate_selflock_config
from verl_selflock.verl_adapter.tool_agent_checks import uses_tool_agent
from verl_selflock.verl_adapter.tool_agent_resolvers import (
    TOOL_AGENT_LOOP_YAML,
    calculator_data_dir,
    calculator_tools_path,
    register_tool_resolvers,
    tool_agent_yaml,
)

PACKAGE = Path(verl_selflock.__file__).parent
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VERL_SELFLOCK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_calculator_data_is_built_once(cache):
    folder = calculator_data_dir(4, 2, 0)
    assert calculator_data_dir(4, 2, 0) == folder  # built once
    train = pd.read_parquet(f"{folder}/train.parquet")
    assert len(train) == 4 and set(train["agent_name"]) == {TOOL_AGENT_NAME}
    assert train["prompt"][0][-1]["content"].startswith("Use the calculator")


def test_the_tool_config_ships_inside_the_package(cache):
    """veRL's workers open ``rollout.multi_turn.tool_config_path`` on every node: the recipe's path is the
    installed package's file, not one node's cache."""
    from omegaconf import OmegaConf

    register_tool_resolvers()
    path = OmegaConf.create({"p": "${selflock.calculator_tools:}"}).p
    assert path == calculator_tools_path() and Path(path).parent == PACKAGE / "tools"
    tools = yaml.safe_load(Path(path).read_text())
    assert tools["tools"][0]["tool_schema"]["function"]["name"] == "calculator"
    assert not cache.exists()


def test_tool_agent_yaml_names_the_packaged_file_and_refuses_knobs(cache):
    assert tool_agent_yaml() == TOOL_AGENT_LOOP_YAML and Path(TOOL_AGENT_LOOP_YAML).parent == PACKAGE / "verl_adapter"
    (entry,) = yaml.safe_load(Path(TOOL_AGENT_LOOP_YAML).read_text())
    assert entry == {"name": TOOL_AGENT_NAME, "_target_": TOOL_AGENT_TARGET}  # knobs live in the config
    with pytest.raises(ValueError, match="no longer takes knobs") as caught:
        tool_agent_yaml("max_turn_tokens=48", "critique.repeat=0", "stop_after_tool_call=true")
    message = str(caught.value)
    assert f"{TOOL_CONFIG_KEY}: {{max_turn_tokens: 48, critique: {{repeat: 0}}, stop_after_tool_call: true}}" in message
    assert (
        f"++{TOOL_CONFIG_KEY}.max_turn_tokens=48 ++{TOOL_CONFIG_KEY}.critique.repeat=0 "
        f"++{TOOL_CONFIG_KEY}.stop_after_tool_call=true"
    ) in message
    with pytest.raises(ValueError, match=r"\['max_turn_token'\] of tool_agent_arew \(did you mean 'max_turn_tokens'\?\)"):
        tool_agent_yaml("max_turn_token=48")  # a typo is named before the replacement is printed
    assert not cache.exists()  # nothing written


def test_the_target_names_the_loop_class():
    from verl_selflock.verl_adapter.tool_agent_loop import ArewToolAgentLoop

    assert TOOL_AGENT_TARGET == f"{ArewToolAgentLoop.__module__}.{ArewToolAgentLoop.__qualname__}"


def _run_config(verl_config, folder: str, extra: list[str] = (), tools: bool = True):
    overrides = [
        "algorithm.adv_estimator=arew",
        "+algorithm.arew.base=grpo",
        "trainer.v1.trainer_mode=selflock",
        f"data.train_files={folder}/train.parquet",
        f"data.val_files={folder}/test.parquet",
        f"actor_rollout_ref.rollout.agent.default_agent_loop={TOOL_AGENT_NAME}",
        f"+{TOOL_CONFIG_KEY}={{max_turn_tokens: 48, critique: {{unaided_answer: -1}}}}",
    ]
    if tools:
        overrides.append(f"actor_rollout_ref.rollout.multi_turn.tool_config_path={calculator_tools_path()}")
    return verl_config([*overrides, *extra])


def test_a_tool_agent_run_is_checked_on_its_own_terms(cache, verl_config):
    folder = calculator_data_dir(4, 2, 0)
    config = _run_config(verl_config, folder)
    assert uses_tool_agent(config)
    validate_selflock_config(config)  # tool rows have no extra_info.env, and need none
    assert config[TOOL_CONFIG_KEY] == {"max_turn_tokens": 48, "critique": {"unaided_answer": -1}}

    with pytest.raises(SelflockConfigError, match="no tool is configured"):
        validate_selflock_config(_run_config(verl_config, folder, tools=False))
    with pytest.raises(SelflockConfigError, match="tool_config_path: /no/tools.yaml does not exist"):
        validate_selflock_config(
            _run_config(verl_config, folder, ["actor_rollout_ref.rollout.multi_turn.tool_config_path=/no/tools.yaml"])
        )
    with pytest.raises(SelflockConfigError, match="trainer_mode"):  # the shared settings checks still apply
        validate_selflock_config(_run_config(verl_config, folder, ["trainer.v1.trainer_mode=sync"]))
    with pytest.raises(SelflockConfigError, match=r"data.train_files: /no/train.parquet does not exist"):
        validate_selflock_config(_run_config(verl_config, folder, ["data.train_files=/no/train.parquet"]))


@pytest.mark.parametrize(
    "node, fragment",
    [
        ("{max_turn_token: 48}", "['max_turn_token'] of tool_agent_arew (did you mean 'max_turn_tokens'?)"),
        ("{max_turn_tokens: 0}", "max_turn_tokens must be a positive int"),
        ("{critique: {repeats: 0}}", "unknown key(s) ['repeats']"),
        ("{critique: '${oc.env:TOOL_NOT_SET_T}'}", "could not be resolved"),
        ("3", "must be a mapping"),
    ],
)
def test_bad_knobs_fail_on_the_driver_naming_the_node(cache, verl_config, node, fragment):
    config = verl_config([f"+{TOOL_CONFIG_KEY}={node}", "actor_rollout_ref.rollout.name=vllm"])
    with pytest.raises(SelflockConfigError, match=TOOL_CONFIG_KEY) as caught:
        validate_selflock_config(config)
    assert fragment in str(caught.value)


def test_the_node_is_pinned_in_the_drivers_environment(cache, verl_config, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setenv("TOOL_SOURCE_T", "auto")
    folder = calculator_data_dir(4, 2, 0)
    config = _run_config(verl_config, folder, [f"++{TOOL_CONFIG_KEY}.critique.source=${{oc.env:TOOL_SOURCE_T}}"])
    validate_selflock_config(config)
    monkeypatch.setenv("TOOL_SOURCE_T", "tool_reward")  # what the TaskRunner's node would see
    assert config[TOOL_CONFIG_KEY]["critique"]["source"] == "auto"
    assert "${" not in OmegaConf.to_yaml(config[TOOL_CONFIG_KEY], resolve=False)


def test_knobs_of_a_yaml_entry_are_checked_too(cache, verl_config, tmp_path):
    folder = calculator_data_dir(4, 2, 0)
    bad = tmp_path / "loop.yaml"
    bad.write_text(yaml.safe_dump([{"name": TOOL_AGENT_NAME, "_target_": TOOL_AGENT_TARGET, "max_turn_token": 4}]))
    loop_key = "actor_rollout_ref.rollout.agent.agent_loop_config_path"
    typo = rf"{loop_key}={bad}: unknown agent-loop knob\(s\) \['max_turn_token'\] of {TOOL_AGENT_NAME}"
    with pytest.raises(SelflockConfigError, match=typo):
        validate_selflock_config(_run_config(verl_config, folder, [f"{loop_key}={bad}"]))
    validate_selflock_config(_run_config(verl_config, folder, [f"{loop_key}={TOOL_AGENT_LOOP_YAML}"]))


def test_stop_strings_are_refused_on_sglang(cache, verl_config):
    folder = calculator_data_dir(4, 2, 0)
    stop = [f"++{TOOL_CONFIG_KEY}.stop_after_tool_call=true"]
    with pytest.raises(SelflockConfigError, match="stop_after_tool_call=false"):
        validate_selflock_config(_run_config(verl_config, folder, [*stop, "actor_rollout_ref.rollout.name=sglang"]))
    validate_selflock_config(_run_config(verl_config, folder, [*stop, "actor_rollout_ref.rollout.name=vllm"]))


def test_the_recipe_needs_no_file_from_one_nodes_cache(cache, smollm2_dir):
    """The CPU recipe composes and passes veRL's and our validation; the only paths a worker opens (tool
    config, no agent-loop YAML) are the installed package's, and the loop's knobs travel in the config."""
    import verl  # noqa: F401  (installs our driver-side validation)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from verl.utils.config import validate_config

    with initialize_config_dir(config_dir=str(RECIPES / "tool_agent"), version_base=None):
        config = compose(config_name="cpu_smoke", overrides=[f"actor_rollout_ref.model.path={smollm2_dir}"])
    validate_config(config, use_reference_policy=False, use_critic=False)
    rollout = config.actor_rollout_ref.rollout
    assert OmegaConf.select(config, "actor_rollout_ref.rollout.agent.agent_loop_config_path") is None
    assert rollout.multi_turn.tool_config_path == calculator_tools_path()
    assert OmegaConf.to_container(config[TOOL_CONFIG_KEY]) == {
        "max_turn_tokens": 48, "stop_after_tool_call": True, "critique": {"unaided_answer": -1}
    }
    assert "tool_agent_yaml" not in (RECIPES / "tool_agent" / "cpu_smoke.yaml").read_text()
