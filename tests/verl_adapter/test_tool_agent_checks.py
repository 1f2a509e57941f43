"""Driver-side pieces of the tool-agent example: its resolvers and the checks of a tool-agent run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from verl_selflock.tools.loop_config import TOOL_AGENT_NAME, TOOL_AGENT_TARGET
from verl_selflock.verl_adapter.config_validation import SelflockConfigError
from verl_selflock.verl_adapter.tool_agent_checks import is_tool_agent_run, validate_run_config
from verl_selflock.verl_adapter.tool_agent_resolvers import calculator_data_dir, tool_agent_yaml


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VERL_SELFLOCK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_calculator_data_and_loop_yaml(cache):
    folder = calculator_data_dir(4, 2, 0)
    assert calculator_data_dir(4, 2, 0) == folder  # built once
    train = pd.read_parquet(f"{folder}/train.parquet")
    assert len(train) == 4 and set(train["agent_name"]) == {TOOL_AGENT_NAME}
    assert train["prompt"][0][-1]["content"].startswith("Use the calculator")
    tools = yaml.safe_load(Path(f"{folder}/tools.yaml").read_text())["tools"]
    assert tools[0]["tool_schema"]["function"]["name"] == "calculator"

    path = tool_agent_yaml("max_turn_tokens=48", "critique.repeat=0")
    (entry,) = yaml.safe_load(Path(path).read_text())
    assert entry == {"name": TOOL_AGENT_NAME, "_target_": TOOL_AGENT_TARGET, "max_turn_tokens": 48, "critique": {"repeat": 0}}
    with pytest.raises(ValueError, match="unknown key"):
        tool_agent_yaml("critique.repeats=0")


def _run_config(verl_config, folder: str, loop_yaml: str, tools: bool = True):
    overrides = [
        "algorithm.adv_estimator=arew",
        "+algorithm.arew.base=grpo",
        "trainer.v1.trainer_mode=selflock",
        f"data.train_files={folder}/train.parquet",
        f"data.val_files={folder}/test.parquet",
        f"actor_rollout_ref.rollout.agent.default_agent_loop={TOOL_AGENT_NAME}",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={loop_yaml}",
    ]
    if tools:
        overrides.append(f"actor_rollout_ref.rollout.multi_turn.tool_config_path={folder}/tools.yaml")
    return verl_config(overrides)


def test_tool_agent_runs_are_checked_on_their_own_terms(cache, verl_config, tmp_path):
    folder = calculator_data_dir(4, 2, 0)
    config = _run_config(verl_config, folder, tool_agent_yaml("max_turn_tokens=48"))
    assert is_tool_agent_run(config)
    validate_run_config(config)  # tool rows have no extra_info.env, and need none

    with pytest.raises(SelflockConfigError, match="no tool is configured"):
        validate_run_config(_run_config(verl_config, folder, tool_agent_yaml(), tools=False))
    bad = tmp_path / "loop.yaml"
    bad.write_text(yaml.safe_dump([{"name": TOOL_AGENT_NAME, "_target_": TOOL_AGENT_TARGET, "max_turn_token": 4}]))
    with pytest.raises(SelflockConfigError, match="unknown agent-loop knob"):
        validate_run_config(_run_config(verl_config, folder, str(bad)))
    with pytest.raises(SelflockConfigError, match="trainer_mode"):  # the shared settings checks still apply
        validate_run_config(verl_config([*_overrides_of(config), "trainer.v1.trainer_mode=sync"]))


def _overrides_of(config) -> list[str]:
    agent = config.actor_rollout_ref.rollout
    return [
        "algorithm.adv_estimator=arew",
        "+algorithm.arew.base=grpo",
        f"data.train_files={config.data.train_files}",
        f"actor_rollout_ref.rollout.agent.default_agent_loop={agent.agent.default_agent_loop}",
        f"actor_rollout_ref.rollout.multi_turn.tool_config_path={agent.multi_turn.tool_config_path}",
    ]
