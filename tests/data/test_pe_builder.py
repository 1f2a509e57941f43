"""PE data builder: row layout, determinism, split hygiene, no answer leak, veRL's RLHFDataset round trip."""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from verl_selflock.data.pe import add_arguments, build_pe_dataset, count_informative_queries, run
from verl_selflock.data.pe_instances import COS_THRESHOLD, MIN_INFORMATIVE_FRACTION, MIN_INFORMATIVE_PAIRS
from verl_selflock.envs import make_env

CASES = [("gated", 2, "pe_g_s2", 6), ("gated", 3, "pe_g_s3", 6), ("full", 6, "pe_f_d6", 6), ("full", 8, "pe_f_d8", 8)]


def _build(tmp_path, variant="gated", size=3, n_train=12, n_test=6, seed=0, name="out", **kwargs):
    paths = build_pe_dataset(variant, size, n_train, n_test, seed, tmp_path / name, progress=False, **kwargs)
    return paths, pd.read_parquet(paths["train"]), pd.read_parquet(paths["test"])


def _spec(row) -> dict:
    """The env spec of a pandas row as plain Python lists."""
    spec = dict(row["extra_info"]["env"])
    spec["movies"] = [list(map(float, r)) for r in spec["movies"]]
    spec["w_star"] = list(map(float, spec["w_star"]))
    return spec


def _prompt_text(row) -> str:
    return "\n".join(message["content"] for message in row["prompt"])


@pytest.mark.parametrize("variant,size,source,D", CASES)
def test_rows(tmp_path, variant, size, source, D):
    _, train, test = _build(tmp_path, variant, size)
    assert len(train) == 12 and len(test) == 6
    assert set(train.columns) >= {"prompt", "data_source", "agent_name", "reward_model", "extra_info"}
    for split, frame in (("train", train), ("test", test)):
        for index, row in frame.iterrows():
            assert row["data_source"] == source and row["agent_name"] == "active_reasoning"
            assert [m["role"] for m in row["prompt"]] == ["system", "user"]
            assert row["extra_info"]["index"] == index and row["extra_info"]["split"] == split
            spec = _spec(row)
            assert spec["task"] == "pe" and spec["variant"] == variant and spec["D"] == D
            assert spec["max_turns"] == (10 if variant == "gated" else 12)
            assert ("S" in spec) is (variant == "gated") and spec.get("S", size) == size
            assert len(spec["movies"]) == 10 and all(len(r) == D for r in spec["movies"])
            assert row["reward_model"]["style"] == "rule"
            assert json.loads(row["reward_model"]["ground_truth"]) == spec["w_star"]
            assert spec["id"] == f"{source}-{split}-{index:05d}"


@pytest.mark.parametrize("variant,size,source,D", CASES)
def test_instances_obey_the_generation_rules(tmp_path, variant, size, source, D):
    _, train, test = _build(tmp_path, variant, size, n_train=30, n_test=10)
    for _, row in pd.concat([train, test]).iterrows():
        spec = _spec(row)
        movies, w = np.array(spec["movies"]), np.array(spec["w_star"])
        # Distinct whole numbers in 0..19 per attribute: no zero component in any difference.
        assert all(len(set(col)) == 10 for col in movies.T)
        assert np.all(movies == np.round(movies)) and movies.min() >= 0 and movies.max() <= 19
        assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-3 and np.all(w == np.round(w, 4))
        # The equal-weights prior never earns the reward.
        assert w.sum() / (math.sqrt(D) * np.linalg.norm(w)) <= COS_THRESHOLD
        informative, total = count_informative_queries(movies, spec.get("S"))
        if variant == "full":
            assert informative >= MIN_INFORMATIVE_PAIRS and total == 45
        else:
            assert informative >= MIN_INFORMATIVE_FRACTION * total


def test_count_informative_queries_by_hand():
    movies = np.array([[3.0, 1.0], [1.0, 2.0], [0.0, 0.0]])
    # pairs: (1,2) -> (2,-1) informative; (1,3) -> (3,1) dominated; (2,3) -> (1,2) dominated
    assert count_informative_queries(movies, None) == (1, 3)
    # S = 1: a single attribute is always dominated (or zero)
    assert count_informative_queries(movies, 1) == (0, 6)


def test_deterministic_byte_identical(tmp_path):
    a, _, _ = _build(tmp_path, name="a", seed=7)
    b, _, _ = _build(tmp_path, name="b", seed=7)
    c, _, _ = _build(tmp_path, name="c", seed=8)
    for split in ("train", "test"):
        assert filecmp.cmp(a[split], b[split], shallow=False)
        assert not filecmp.cmp(a[split], c[split], shallow=False)


def test_train_and_test_are_disjoint(tmp_path):
    _, train, test = _build(tmp_path, "full", 6, n_train=60, n_test=30)

    def keys(frame):
        return {json.dumps([_spec(row)["movies"], _spec(row)["w_star"]]) for _, row in frame.iterrows()}

    train_keys, test_keys = keys(train), keys(test)
    assert len(train_keys) == 60 and len(test_keys) == 30 and not train_keys & test_keys


def test_test_split_does_not_depend_on_train_size(tmp_path):
    _, _, small = _build(tmp_path, name="small", n_train=3)
    _, _, large = _build(tmp_path, name="large", n_train=9)
    pd.testing.assert_frame_equal(small, large)


@pytest.mark.parametrize("variant,size,source,D", CASES)
def test_no_answer_leak_in_prompt(tmp_path, variant, size, source, D):
    _, train, test = _build(tmp_path, variant, size)
    for _, row in pd.concat([train, test]).iterrows():
        text = _prompt_text(row)
        w = _spec(row)["w_star"]
        for value in w:
            assert repr(value) not in text and f"{value:.4f}" not in text and f"{value:.3f}" not in text
        assert json.dumps(w) not in text
        # No decimal number at all, and no answer-tag pair that encloses a digit (a naive scorer's bait).
        assert not re.search(r"\d\.\d", text)
        for inside in re.findall(r"<answer>(.*?)</answer>", text, flags=re.S):
            assert not re.search(r"\d", inside)
        for inside in re.findall(r"<interact>(.*?)</interact>", text, flags=re.S):
            assert not re.search(r"\d", inside)


def test_prompt_content(tmp_path):
    _, train, _ = _build(tmp_path, "gated", 2)
    row = train.iloc[0]
    system, user = row["prompt"][0]["content"], row["prompt"][1]["content"]
    spec = _spec(row)
    for index, movie in enumerate(spec["movies"], start=1):
        assert f"Movie {index}: " + ", ".join(str(int(v)) for v in movie) in system
    for needle in ("<scratch>", "<interact>", "Focus: a,b\n", "Pair: i,j", "Guess:", "<answer> and </answer>",
                   "Do not repeat", "Rounds 1, 3, 5, 7, 9 are Action rounds", "Round 10 is the Answer round"):
        assert needle in system, needle
    assert user.startswith("Let's start") and "Round 1 of 10 is an Action round" in user


@pytest.mark.parametrize("variant,size,source,D", CASES)
def test_rows_drive_the_environment(tmp_path, variant, size, source, D):
    _, train, _ = _build(tmp_path, variant, size, n_train=5, n_test=1)
    for _, row in train.iterrows():
        spec = _spec(row)
        truth = make_env(row["extra_info"]["env"])  # straight from the pandas row (arrays of arrays)
        truth.step_sync("<answer>" + ", ".join(map(str, spec["w_star"])) + "</answer>")
        assert truth.result().reward == 1.0
        prior = make_env(spec)
        prior.step_sync("<answer>" + ", ".join(["1"] * D) + "</answer>")
        assert prior.result().reward == 0.0 and prior.result().answered


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(variant="partial", size_param=3),
        dict(variant="gated", size_param=6),  # S must be < D = 6
        dict(variant="gated", size_param=3, max_turns=9),
        dict(variant="full", size_param=1),
        dict(variant="full", size_param=6, seed=-1),
    ],
)
def test_invalid_arguments(tmp_path, kwargs):
    kwargs = {"n_train": 1, "n_test": 1, "seed": 0, "out_dir": tmp_path, "progress": False, **kwargs}
    with pytest.raises(ValueError):
        build_pe_dataset(**kwargs)


def test_cli_arguments_and_run(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["--variant", "full", "--D", "6", "--train", "4", "--test", "2", "--seed", "3", "--out", str(out),
         "--max-turns", "8", "--no-progress"]
    )
    assert run(args) == 0
    frame = pd.read_parquet(out / "train.parquet")
    assert len(frame) == 4 and frame.iloc[0]["data_source"] == "pe_f_d6"
    assert frame.iloc[0]["extra_info"]["env"]["max_turns"] == 8
    assert "train.parquet" in capsys.readouterr().out
    defaults = parser.parse_args(["--out", "x"])
    assert (defaults.variant, defaults.S, defaults.train, defaults.test) == ("gated", 3, 700, 300)


def test_through_the_cli_entry_point(tmp_path):
    cli = pytest.importorskip("verl_selflock.cli")
    out = tmp_path / "entry"
    code = cli.main(["data", "pe", "--variant", "gated", "--S", "2", "--train", "2", "--test", "1", "--out", str(out),
                     "--no-progress"])
    assert code == 0 and (out / "train.parquet").exists() and (out / "test.parquet").exists()


# --- veRL's own dataset class with the real SmolLM2 tokenizer --------------------------------------------------


@pytest.mark.parametrize("variant,size", [("gated", 3), ("full", 8)])
def test_rlhf_dataset_round_trip(tmp_path, monkeypatch, smollm2_dir, variant, size):
    datasets = pytest.importorskip("datasets")
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    paths, train, _ = _build(tmp_path, variant, size, n_train=4, n_test=1)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    max_prompt_length = 1024  # veRL's default data.max_prompt_length
    config = OmegaConf.create(
        {
            "max_prompt_length": max_prompt_length,
            "filter_overlong_prompts": True,
            "filter_overlong_prompts_workers": 1,
            "cache_dir": str(tmp_path / "verl_cache"),
        }
    )
    dataset = RLHFDataset(paths["train"], tokenizer, config)
    assert len(dataset) == 4  # nothing filtered out as overlong
    lengths = []
    for index in range(len(dataset)):
        item = dataset[index]
        expected = train.iloc[index]
        assert item["raw_prompt"] == [dict(m) for m in expected["prompt"]]
        assert item["agent_name"] == "active_reasoning" and item["data_source"] == expected["data_source"]
        assert item["index"] == index
        env_spec = item["extra_info"]["env"]
        assert env_spec["w_star"] == _spec(expected)["w_star"] and env_spec["movies"] == _spec(expected)["movies"]
        env = make_env(env_spec)  # the spec survives the round trip in a usable form
        assert env.n_movies == 10 and env.variant == variant
        text = tokenizer.apply_chat_template(item["raw_prompt"], add_generation_prompt=True, tokenize=False)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    print(f"\n{variant} size={size}: prompt tokens (SmolLM2) min {min(lengths)} max {max(lengths)}")
    assert max(lengths) <= max_prompt_length
