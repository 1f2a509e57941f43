"""Fixtures for the agent-loop tests: real tokenizers and veRL's real config."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parents[1])
if _TESTS_DIR not in sys.path:  # makes ``fixtures`` (tests/fixtures) importable
    sys.path.insert(0, _TESTS_DIR)

from fixtures.harness import LLAMA3_SPECIAL, LLAMA3_TEMPLATE, compose_verl_config  # noqa: E402
from fixtures.scripted_env import ScriptedEnv  # noqa: E402


@pytest.fixture(scope="session")
def chatml_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def llama3_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL})
    tokenizer.chat_template = LLAMA3_TEMPLATE
    tokenizer.eos_token = "<|eot_id|>"  # as in Llama-3-Instruct's tokenizer_config
    return tokenizer


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
