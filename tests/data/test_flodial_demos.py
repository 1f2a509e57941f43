"""FloDial expert demonstrations as veRL multi-turn SFT rows: replay, split hygiene, determinism, CLI; on a
hand-built chart and, when they are there, the real FloDial charts (``../shared/data/flodial``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pandas as pd
import pytest
from fixtures.flodial_charts import laptop_chart, write_charts
from fixtures.parquet_values import plain

from verl_selflock.cli import main
from verl_selflock.data.demos import DEMOS_FILE
from verl_selflock.data.flodial import (
    FloDialDataConfig,
    build_flodial_dataset,
    build_flodial_demos,
    build_flodial_rows,
)
from verl_selflock.data.flodial_charts import load_flowcharts
from verl_selflock.data.flodial_demos import episode_key, select_demo_rows
from verl_selflock.envs import EnvContext, make_env
from verl_selflock.envs.flodial.prompts import flodial_messages
from verl_selflock.envs.flodial.scripted_user import ScriptedFloDialUser
from verl_selflock.errors import InvalidInput

REAL_FLODIAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "flodial"
needs_real_data = pytest.mark.skipif(
    not (REAL_FLODIAL / "knowledge-sources").is_dir(),
    reason=f"FloDial knowledge sources not found at {REAL_FLODIAL} (no licence: the project does not ship them)",
)
EASY3 = FloDialDataConfig(difficulty="easy", n_candidates=3)


@pytest.fixture
def charts_dir(tmp_path) -> Path:
    return write_charts(tmp_path / "flodial", [laptop_chart(), laptop_chart("laptop_screen_b")])


def _replay(row) -> None:
    """Play a row's assistant messages through a fresh environment with the scripted user: every user message
    is the environment's reply, every turn valid, the critiques and the outcome those of the row."""
    spec = plain(row["extra_info"]["env"])
    messages = plain(row["messages"])
    assert messages[:2] == flodial_messages(spec)
    rest = messages[2:]
    assert [m["role"] for m in rest] == ["assistant", "user"] * (len(rest) // 2) + ["assistant"]
    env = make_env(spec, context=EnvContext(simulator=ScriptedFloDialUser(spec["table"]), training=False))
    critiques = []
    for position, message in enumerate(rest[::2]):
        step = asyncio.run(env.step(message["content"]))
        assert step.valid and not step.repeated, step.info
        critiques.append(int(step.label.critique))
        if 2 * position + 1 < len(rest):
            assert rest[2 * position + 1]["content"] == step.observation
        else:
            assert step.done
    assert critiques == list(row["critiques"]) and len(critiques) == row["n_turns"]
    assert -1 not in critiques  # the scripted user answers every question the expert asks
    assert env.result().success == row["success"] and env.result().reward == row["reward"]


def test_demo_rows_replay_and_avoid_the_test_split(charts_dir):
    out = charts_dir.parent / "out"
    path = build_flodial_demos(EASY3, 6, seed=5, out_dir=out, input_dir=charts_dir, n_train=2, n_test=5)
    assert path == out / DEMOS_FILE and sorted(p.name for p in out.iterdir()) == [DEMOS_FILE]
    demos = pd.read_parquet(path)
    assert len(demos) == 6
    assert set(demos.columns) >= {"messages", "data_source", "success", "n_turns", "seed", "critiques", "extra_info"}
    assert (demos["data_source"] == "flodial_easy").all() and (demos["seed"] == 5).all() and demos["success"].all()
    for _, row in demos.iterrows():
        _replay(row)
    rows = build_flodial_rows(load_flowcharts(charts_dir), EASY3, 2, 5, 5, progress=False)
    specs = [plain(extra["env"]) for extra in demos["extra_info"]]
    assert [plain(r["extra_info"]["env"]) for r in rows["train"]] == specs[:2]  # the dataset's own train rows
    test_keys = {episode_key(r["extra_info"]["env"]) for r in rows["test"]}
    assert not test_keys & {episode_key(spec) for spec in specs}
    assert len({episode_key(spec) for spec in specs}) == 6


def test_select_demo_rows_skips_test_episodes_and_draws_more():
    def row(chart, true, *others):
        nodes = [true, *others]
        return {"extra_info": {"env": {"chart": chart, "candidate_nodes": nodes, "answer_index": 0}}}

    train = [row("a", "3", "5"), row("a", "5", "3"), row("b", "3", "5"), row("a", "6", "8")]
    test = [{"extra_info": {"env": {"chart": "a", "candidate_nodes": ["5", "3"], "answer_index": 1}}}]  # = train[0]
    asked = []

    def draw(count):
        asked.append(count)
        return train[:count]

    assert select_demo_rows(draw, 2, test) == [train[1], train[2]] and asked == [2, 3]


def test_demos_are_deterministic(charts_dir):
    kwargs = {"input_dir": charts_dir, "n_train": 4, "n_test": 3, "expert_seed": 4}
    first = build_flodial_demos(EASY3, 3, seed=1, out_dir=charts_dir.parent / "a", **kwargs)
    again = build_flodial_demos(EASY3, 3, seed=1, out_dir=charts_dir.parent / "b", **kwargs)
    assert first.read_bytes() == again.read_bytes()


def test_bad_inputs(charts_dir):
    root = charts_dir.parent
    (root / "a_file").write_text("x")
    kwargs = {"input_dir": charts_dir}
    with pytest.raises(InvalidInput, match="--demos"):
        build_flodial_demos(EASY3, 0, seed=0, out_dir=root / "o", **kwargs)
    with pytest.raises(InvalidInput, match="--seed"):
        build_flodial_demos(EASY3, 2, seed=-1, out_dir=root / "o", **kwargs)
    with pytest.raises(InvalidInput, match="expert_seed"):
        build_flodial_demos(EASY3, 2, seed=0, out_dir=root / "o", expert_seed=-3, **kwargs)
    with pytest.raises(InvalidInput, match="is a file"):
        build_flodial_demos(EASY3, 2, seed=0, out_dir=root / "a_file", **kwargs)
    (root / "blocked" / DEMOS_FILE).mkdir(parents=True)
    with pytest.raises(InvalidInput, match="demos.parquet is a folder"):
        build_flodial_demos(EASY3, 2, seed=0, out_dir=root / "blocked", **kwargs)
    with pytest.raises(InvalidInput, match="--demos"):
        build_flodial_dataset(charts_dir, root / "o", EASY3, 2, 2, 0, progress=False, demos=-1)
    with pytest.raises(InvalidInput, match="ask for fewer"):  # the hand-built charts hold few distinct episodes
        build_flodial_demos(EASY3, 500, seed=0, out_dir=root / "o", n_train=2, n_test=2, **kwargs)
    assert not (root / "o").exists()


def _cli(charts_dir: Path, out: Path, *extra: str) -> int:
    argv = ["data", "flodial", "--input", str(charts_dir), "--out", str(out), "--no-progress", "--n-candidates", "3"]
    return main([*argv, "--train", "3", "--test", "2", *extra])


def test_cli_writes_demos_next_to_the_splits(charts_dir, capsys):
    out = charts_dir.parent / "out"
    assert _cli(charts_dir, out, "--demos", "4") == 0
    assert sorted(p.name for p in out.iterdir()) == ["demos.parquet", "test.parquet", "train.parquet"]
    assert "demos: " in capsys.readouterr().out
    train, demos = pd.read_parquet(out / "train.parquet"), pd.read_parquet(out / "demos.parquet")
    assert [plain(p) for p in train["prompt"][:3]] == [plain(m)[:2] for m in demos["messages"][:3]]
    for _, row in demos.iterrows():
        _replay(row)
    without = charts_dir.parent / "plain"
    assert _cli(charts_dir, without) == 0  # no --demos: no demos file
    assert sorted(p.name for p in without.iterdir()) == ["test.parquet", "train.parquet"]


@pytest.mark.parametrize(
    "extra,texts",
    [
        (["--demos", "-1"], ["--demos", "-1"]),
        (["--demos", "x"], ["argument --demos: invalid int value"]),
        (["--demos", "1.5"], ["argument --demos: invalid int value"]),
    ],
)
def test_cli_bad_demos_is_one_line_exit_2(charts_dir, capsys, extra, texts):
    out = charts_dir.parent / "o"
    code = _cli(charts_dir, out, *extra)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(text in lines[0] for text in texts), lines[0]
    assert not out.exists()


# --------------------------------------------------------------------------- the real FloDial charts


@needs_real_data
@pytest.mark.parametrize("difficulty,scheme", [("easy", "s-flo"), ("hard", "u-flo"), ("hard", "s-flo")])
def test_real_charts_demos(tmp_path, difficulty, scheme):
    out = tmp_path / "out"
    args = ["--difficulty", difficulty, "--split-scheme", scheme, "--train", "20", "--test", "30", "--demos", "40"]
    assert main(["data", "flodial", "--input", str(REAL_FLODIAL), "--out", str(out), "--no-progress", *args]) == 0
    demos, test = pd.read_parquet(out / DEMOS_FILE), pd.read_parquet(out / "test.parquet")
    assert len(demos) == 40 and demos["success"].all()  # 100% at the default 10 turns
    test_keys = {episode_key(plain(extra["env"])) for extra in test["extra_info"]}
    specs = [plain(extra["env"]) for extra in demos["extra_info"]]
    assert not test_keys & {episode_key(spec) for spec in specs} and {s["split"] for s in specs} == {"train"}
    for _, row in demos.iterrows():
        _replay(row)


@pytest.mark.slow  # imports veRL and torch (> 5 s)
def test_verl_multiturn_sft_dataset_reads_the_demos(charts_dir, chatml_tokenizer):
    """veRL 0.9.1's own SFT dataset reads FloDial demonstrations (written with the tokenizer's observation cap,
    which FloDial's short observations never reach): the loss covers exactly the assistant turns."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    kwargs = {"input_dir": charts_dir, "n_train": 2, "n_test": 2}
    path = build_flodial_demos(EASY3, 2, seed=0, out_dir=charts_dir.parent / "t", tokenizer=chatml_tokenizer, **kwargs)
    again = build_flodial_demos(EASY3, 2, seed=0, out_dir=charts_dir.parent / "p", **kwargs)
    assert path.read_bytes() == again.read_bytes()
    config = OmegaConf.create(
        {"messages_key": "messages", "pad_mode": "no_padding", "max_length": 8192, "truncation": "error"}
    )
    dataset = MultiTurnSFTDataset(str(path), chatml_tokenizer, config)
    frame = pd.read_parquet(path)
    for index in range(len(dataset)):
        item = dataset[index]  # runs veRL's sanity check (per-turn tokens == whole conversation's)
        ids, loss = item["input_ids"].tolist(), item["loss_mask"].tolist()
        trained = chatml_tokenizer.decode([t for t, m in zip(ids, loss, strict=True) if m])
        assistants = [m["content"] for m in plain(frame["messages"][index]) if m["role"] == "assistant"]
        assert trained == "".join(f"{text}<|im_end|>\n" for text in assistants)
