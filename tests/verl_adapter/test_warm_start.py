"""The warm start runs veRL's own SFT trainer: its command line must compose against veRL's SFT config,
the recipe must compose, and a short real run on CPU must change the model and leave an HF folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir, initialize_config_module
from omegaconf import OmegaConf

from verl_selflock.verl_adapter.warm_start import SFTSettings, hf_folder_of, sft_command, warm_start

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _overrides(command: list[str]) -> list[str]:
    return command[command.index("verl.trainer.sft_trainer") + 1 :]


def test_the_command_runs_verls_sft_trainer_under_torchrun_with_one_process(tmp_path):
    command = sft_command("/models/m", "/data/demos.parquet", tmp_path, SFTSettings())
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert command[command.index("--nproc_per_node") + 1] == "1"
    assert "checkpoint.save_contents=[hf_model]" in command


def test_every_override_is_a_key_of_verls_sft_config(tmp_path):
    # A key veRL renamed would fail here, not an hour into a user's first run.
    command = sft_command("/models/m", "/data/demos.parquet", tmp_path, SFTSettings(epochs=3, lr=2e-5))
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="sft_trainer_engine", overrides=_overrides(command))
    assert config.trainer.total_epochs == 3
    assert config.optim.lr == pytest.approx(2e-5)
    assert config.data.truncation == "error"
    assert list(config.checkpoint.save_contents) == ["hf_model"]
    assert config.model.path == "/models/m"


def test_the_recipe_composes_with_verls_sft_config(tmp_path):
    from verl_selflock.verl_adapter import resolvers

    demos = tmp_path / "demos"
    resolvers.register_resolvers()
    # The demonstrations themselves are the builder's (tests/data/test_demos.py): here only the wiring.
    OmegaConf.register_new_resolver("selflock.pe_demos", lambda *args: str(demos), replace=True)
    try:
        with initialize_config_dir(config_dir=str(RECIPES / "pe_g"), version_base=None):
            config = compose(config_name="sft_warmstart", overrides=["model.path=/models/m"])
        OmegaConf.resolve(config)
    finally:
        OmegaConf.register_new_resolver("selflock.pe_demos", resolvers.pe_demos_dir, replace=True)
    assert config.data.train_files == f"{demos}/demos.parquet"
    assert list(config.checkpoint.save_contents) == ["hf_model"]
    assert config.engine.strategy == "fsdp2"


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        hf_folder_of(tmp_path)


@pytest.mark.slow
def test_a_short_warm_start_on_cpu_trains_the_model(smollm2_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from verl_selflock.data.pe import build_pe_demos, pe_data_config

    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    demos = build_pe_demos(pe_data_config("gated", 2, max_turns=4, gated_dim=4, n_movies=6, prompt="compact"), 4, 0,
                           tmp_path / "demos")
    folder = warm_start(smollm2_dir, demos, tmp_path / "sft", SFTSettings(epochs=1, batch_size=4, micro_batch_size=2))
    log = (tmp_path / "sft" / "sft.log").read_text()
    assert "train/loss" in log
    trained = AutoModelForCausalLM.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    changed = [
        name for (name, p), (_, q) in zip(trained.named_parameters(), base.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert changed, "one SFT step left every weight as it was"
