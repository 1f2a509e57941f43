"""Fixtures for the agent-loop tests: real tokenizers and veRL's real config."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parents[2])
if _TESTS_DIR not in sys.path:  # makes ``fixtures`` (tests/fixtures) importable
    sys.path.insert(0, _TESTS_DIR)

from fixtures.harness import compose_verl_config  # noqa: E402
from fixtures.scripted_env import ScriptedEnv  # noqa: E402


@pytest.fixture(scope="session")
def base_config(smollm2_dir):
    """veRL's composed ppo_trainer config (as main_ppo sees it), pointing at SmolLM2."""
    return compose_verl_config(
        [
            f"actor_rollout_ref.model.path={smollm2_dir}",
            "actor_rollout_ref.rollout.name=vllm",
            "actor_rollout_ref.rollout.prompt_length=512",
            "actor_rollout_ref.rollout.response_length=1024",
            "reward.reward_manager.name=active_reasoning",
        ]
    )


@pytest.fixture
def make_config(base_config):
    """A copy of the config with ``{dotted.key: value}`` updates."""
    from omegaconf import OmegaConf

    def make(**updates: Any):
        config = copy.deepcopy(base_config)
        for key, value in updates.items():
            OmegaConf.update(config, key.replace("__", "."), value)
        return config

    return make


@pytest.fixture(autouse=True)
def _clear_env_instances():
    ScriptedEnv.instances.clear()
    yield
    ScriptedEnv.instances.clear()
