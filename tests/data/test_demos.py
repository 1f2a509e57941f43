"""Expert demonstrations as veRL multi-turn SFT rows: layout, replay, split hygiene, CLI, veRL's own dataset."""

from __future__ import annotations

import pandas as pd
import pytest
from fixtures.parquet_values import plain

from verl_selflock.cli import main
from verl_selflock.data.demos import (
    DEMOS_FILE,
    MAX_OBS_TOKENS,
    OBS_TRUNCATION_MARKER,
    demo_messages,
)
from verl_selflock.data.pe import PEDataConfig, build_pe_dataset, build_pe_demos, build_pe_rows
from verl_selflock.envs import make_env
from verl_selflock.envs.pe.expert import play_pe_expert
from verl_selflock.envs.pe.prompts import pe_messages
from verl_selflock.errors import InvalidInput

GATED = PEDataConfig("gated", 6, 2, 10)
FULL = PEDataConfig("full", 6, None, 12)


def _replay(row) -> None:
    """Play a row's assistant messages through a fresh environment: every user message is the env's reply."""
    spec = plain(row["extra_info"]["env"])
    messages = plain(row["messages"])
    assert messages[:2] == pe_messages(spec)
    rest = messages[2:]
    assert [m["role"] for m in rest] == ["assistant", "user"] * (len(rest) // 2) + ["assistant"]
    env = make_env(spec)
    critiques = []
    for position, message in enumerate(rest[::2]):
        step = env.step_sync(message["content"])
        assert step.valid, step.info
        critiques.append(int(step.label.critique))
        if 2 * position + 1 < len(rest):
            assert rest[2 * position + 1]["content"] == step.observation
        else:
            assert step.done
    assert critiques == list(row["critiques"]) and len(critiques) == row["n_turns"]
    assert env.result().success == row["success"]


@pytest.mark.parametrize("config", [GATED, FULL], ids=["gated", "full"])
def test_demo_rows_replay_and_avoid_the_test_split(tmp_path, config):
    path = build_pe_demos(config, 4, seed=5, out_dir=tmp_path, n_train=2, n_test=6)
    assert path == tmp_path / DEMOS_FILE and sorted(p.name for p in tmp_path.iterdir()) == [DEMOS_FILE]
    demos = pd.read_parquet(path)
    assert len(demos) == 4
    assert set(demos.columns) >= {"messages", "data_source", "success", "n_turns", "seed", "critiques", "extra_info"}
    assert (demos["data_source"] == config.data_source).all() and (demos["seed"] == 5).all()
    for _, row in demos.iterrows():
        _replay(row)
    # Train instances 0..3 of the dataset's seed (0 and 1 are the train split itself), none of its test split.
    rows = build_pe_rows(config, 2, 6, 5, progress=False)
    ids = list(demos["id"])
    assert ids == [f"{config.data_source}-train-{k:05d}" for k in range(4)]
    assert [plain(r["extra_info"]["env"]) for r in rows["train"]] == [plain(e["env"]) for e in demos["extra_info"][:2]]
    test_tables = {str(r["extra_info"]["env"]["movies"]) + str(r["extra_info"]["env"]["w_star"]) for r in rows["test"]}
    for extra in demos["extra_info"]:
        env = plain(extra["env"])
        assert str(env["movies"]) + str(env["w_star"]) not in test_tables


def test_demos_are_deterministic(tmp_path):
    first = build_pe_demos(FULL, 2, seed=1, out_dir=tmp_path / "a", expert_seed=4)
    again = build_pe_demos(FULL, 2, seed=1, out_dir=tmp_path / "b", expert_seed=4)
    assert first.read_bytes() == again.read_bytes()


def test_observation_cap_follows_the_agent_loop(chatml_tokenizer):
    from verl_selflock.verl_adapter.agent_loop_config import ActiveReasoningLoopConfig

    defaults = ActiveReasoningLoopConfig()
    assert (MAX_OBS_TOKENS, OBS_TRUNCATION_MARKER) == (defaults.max_obs_tokens, defaults.obs_truncation_marker)
    row = build_pe_rows(FULL, 1, 0, 0, progress=False)["train"][0]
    demo = play_pe_expert(row["extra_info"]["env"])
    whole = demo_messages(row["prompt"], demo)
    assert demo_messages(row["prompt"], demo, tokenizer=chatml_tokenizer) == whole  # PE never reaches the cap
    capped = demo_messages(row["prompt"], demo, tokenizer=chatml_tokenizer, max_obs_tokens=12)
    users = [m["content"] for m in capped[2:] if m["role"] == "user"]
    assert users and all(u.endswith(OBS_TRUNCATION_MARKER) for u in users)
    assert all(len(chatml_tokenizer.encode(u, add_special_tokens=False)) <= 12 for u in users)
    with pytest.raises(InvalidInput, match="tokenizer"):
        demo_messages(row["prompt"], demo, max_obs_tokens=12)


def test_bad_inputs(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InvalidInput, match="--demos"):
        build_pe_demos(GATED, 0, seed=0, out_dir=tmp_path / "o")
    with pytest.raises(InvalidInput, match="--seed"):
        build_pe_demos(GATED, 2, seed=-1, out_dir=tmp_path / "o")
    with pytest.raises(InvalidInput, match="expert_seed"):
        build_pe_demos(GATED, 2, seed=0, out_dir=tmp_path / "o", expert_seed=-3)
    with pytest.raises(InvalidInput, match="is a file"):
        build_pe_demos(GATED, 2, seed=0, out_dir=tmp_path / "a_file")
    (tmp_path / "blocked" / DEMOS_FILE).mkdir(parents=True)
    with pytest.raises(InvalidInput, match="demos.parquet is a folder"):
        build_pe_demos(GATED, 2, seed=0, out_dir=tmp_path / "blocked")
    with pytest.raises(InvalidInput, match="--demos"):
        build_pe_dataset("gated", 2, 2, 2, 0, tmp_path / "o", demos=-1, progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_writes_demos_next_to_the_splits(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["data", "pe", "--variant", "full", "--D", "6", "--train", "3", "--test", "2", "--no-progress"]
    assert main([*argv, "--demos", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["demos.parquet", "test.parquet", "train.parquet"]
    assert "demos: " in capsys.readouterr().out
    train, demos = pd.read_parquet(out / "train.parquet"), pd.read_parquet(out / "demos.parquet")
    assert [plain(p) for p in train["prompt"][:2]] == [plain(m)[:2] for m in demos["messages"]]
    without = tmp_path / "plain"
    assert main([*argv, "--out", str(without)]) == 0  # no --demos: no demos file
    assert sorted(p.name for p in without.iterdir()) == ["test.parquet", "train.parquet"]


@pytest.mark.parametrize(
    "extra,texts",
    [(["--demos", "-1"], ["--demos", "-1"]), (["--demos", "x"], ["argument --demos: invalid int value"])],
)
def test_cli_bad_demos_is_one_line_exit_2(tmp_path, capsys, extra, texts):
    code = main(["data", "pe", "--train", "2", "--test", "1", "--no-progress", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(text in lines[0] for text in texts), lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # imports veRL and torch (> 5 s)
def test_verl_multiturn_sft_dataset_reads_the_demos(tmp_path, chatml_tokenizer):
    """veRL 0.9.1's own SFT dataset, as ``verl.trainer.sft_trainer`` builds it (``data.messages_key``), with the
    real SmolLM2 tokenizer: every row tokenizes, turn by turn equal to the whole template, and the loss covers
    exactly the assistant turns."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    path = build_pe_demos(GATED, 2, seed=0, out_dir=tmp_path)
    config = OmegaConf.create({"messages_key": "messages", "pad_mode": "no_padding", "max_length": 8192,
                               "truncation": "error"})
    dataset = MultiTurnSFTDataset(str(path), chatml_tokenizer, config)
    assert len(dataset) == 2
    frame = pd.read_parquet(path)
    for index in range(2):
        item = dataset[index]  # runs veRL's sanity check (per-turn tokens == whole conversation's)
        ids, loss = item["input_ids"].tolist(), item["loss_mask"].tolist()
        trained = chatml_tokenizer.decode([t for t, m in zip(ids, loss, strict=True) if m])
        assistants = [m["content"] for m in plain(frame["messages"][index]) if m["role"] == "assistant"]
        assert trained == "".join(f"{text}<|im_end|>\n" for text in assistants)
