"""Data and agent-loop mistakes of a run of ours fail on the driver, before Ray, naming the key, file and fix.

Every case composes veRL's real config and points it at real parquet files built by our PE builder (or
damaged copies of them) under tmp_path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from verl_selflock.verl_adapter.config_validation import SelflockConfigError, validate_selflock_config
from verl_selflock.verl_adapter.data_checks import AGENT_LOOP_TARGET

LOOP_KEY = "actor_rollout_ref.rollout.agent.agent_loop_config_path"
AREW = ["algorithm.adv_estimator=arew", "trainer.v1.trainer_mode=selflock", "critic.enable=True"]
DEFAULT_KEY = "actor_rollout_ref.rollout.agent.default_agent_loop"
OUR_LOOP = [f"{DEFAULT_KEY}=active_reasoning"]


@pytest.fixture(scope="module")
def composed():
    """veRL's real ppo_trainer config, composed once: Hydra takes ~0.5 s a composition on 2 cores."""
    from fixtures.harness import compose_verl_config

    return compose_verl_config([])


@pytest.fixture
def verl_config(composed):
    """Like conftest's ``verl_config`` (``key=value`` overrides, ``+`` allowed), on a copy of one composition."""
    import copy

    import yaml
    from omegaconf import OmegaConf, open_dict

    def make(overrides: list[str]):
        config = copy.deepcopy(composed)
        with open_dict(config):
            for override in overrides:
                key, _, value = override.lstrip("+").partition("=")
                # Hydra's override grammar reads plain values as YAML; an interpolation stays one.
                OmegaConf.update(config, key, value if "${" in value else yaml.safe_load(value), force_add=True)
        return config

    return make


@pytest.fixture(scope="module")
def pe_files(tmp_path_factory) -> dict[str, str]:
    """A real PE-G set (4 train / 2 test rows) written by our builder."""
    from verl_selflock.data.pe import build_pe_dataset

    return build_pe_dataset("gated", 3, 4, 2, 0, tmp_path_factory.mktemp("pe"), max_turns=4, progress=False)


def data(train: str | Path, val: str | Path) -> list[str]:
    return [f"data.train_files={train}", f"data.val_files={val}"]


def write_variant(source: str, path: Path, change) -> Path:
    """``source``'s rows after ``change(dataframe)``, written as a parquet file at ``path``."""
    import pandas as pd

    frame = change(pd.read_parquet(source))
    frame.to_parquet(path, index=False)
    return path


def refuse(config, *fragments: str) -> str:
    with pytest.raises(SelflockConfigError) as caught:
        validate_selflock_config(config)
    message = str(caught.value)
    assert "\n" not in message, message  # one line
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_real_files_pass(verl_config, pe_files):
    validate_selflock_config(verl_config(AREW + OUR_LOOP + data(pe_files["train"], pe_files["test"])))
    # rows carry agent_name, so the default loop may stay veRL's
    validate_selflock_config(verl_config(AREW + data(pe_files["train"], pe_files["test"])))


def test_a_plain_verl_run_is_not_checked(verl_config):
    # veRL's defaults point at ~/data/rlhf/gsm8k/*.parquet, which do not exist here: not our business.
    config = verl_config(["algorithm.adv_estimator=grpo", "data.train_files=/no/such/train.parquet"])
    validate_selflock_config(config)


@pytest.mark.parametrize(
    "overrides",
    [AREW, ["reward.reward_manager.name=active_reasoning"], OUR_LOOP],
    ids=["estimator", "reward_manager", "agent_loop"],
)
def test_a_missing_file_names_the_key_and_what_made_the_run_ours(verl_config, pe_files, tmp_path, overrides):
    missing = tmp_path / "nope" / "train.parquet"
    config = verl_config(overrides + data(missing, pe_files["test"]))
    reason = overrides[-1] if overrides is not AREW else "algorithm.adv_estimator=arew"
    refuse(config, "data.train_files", str(missing), "does not exist", "verl-selflock data", reason)


def test_a_missing_validation_file_is_named_too(verl_config, pe_files):
    refuse(
        verl_config(AREW + data(pe_files["train"], "rel/test.parquet")),
        "data.val_files: rel/test.parquet",
        "relative to",
    )


def test_a_folder_points_at_the_file_inside(verl_config, pe_files):
    folder = str(Path(pe_files["test"]).parent)
    refuse(
        verl_config(AREW + data(pe_files["train"], folder)), "data.val_files", f"{folder}/test.parquet", "is a folder"
    )


def test_an_empty_parquet_says_it_has_no_rows(verl_config, pe_files, tmp_path):
    empty = write_variant(pe_files["train"], tmp_path / "train.parquet", lambda frame: frame.iloc[:0])
    refuse(verl_config(AREW + data(empty, pe_files["test"])), f"data.train_files: {empty}", "has no rows")


@pytest.mark.parametrize("content", [b"", b"not a parquet file at all", "truncated"])
def test_a_file_that_is_not_parquet_is_named(verl_config, pe_files, tmp_path, content):
    bad = tmp_path / "train.parquet"
    bad.write_bytes(Path(pe_files["train"]).read_bytes()[:200] if content == "truncated" else content)
    refuse(verl_config(AREW + data(bad, pe_files["test"])), f"data.train_files: {bad}", "not a readable parquet file")


@pytest.mark.parametrize("column", ["prompt", "extra_info", "reward_model", "data_source", "agent_name"])
def test_a_missing_column_is_named(verl_config, pe_files, tmp_path, column):
    bad = write_variant(pe_files["train"], tmp_path / "train.parquet", lambda frame: frame.drop(columns=[column]))
    message = refuse(verl_config(AREW + data(bad, pe_files["test"])), f"lacks column(s) ['{column}']", str(bad))
    assert ("default_agent_loop=active_reasoning" in message) == (column == "agent_name")


def test_agent_name_may_come_from_the_default_loop(verl_config, pe_files, tmp_path):
    rows = write_variant(
        pe_files["train"], tmp_path / "train.parquet", lambda frame: frame.drop(columns=["agent_name"])
    )
    validate_selflock_config(verl_config(AREW + OUR_LOOP + data(rows, pe_files["test"])))


def test_a_custom_prompt_key_is_the_column_checked(verl_config, pe_files, tmp_path):
    renamed = write_variant(
        pe_files["train"], tmp_path / "train.parquet", lambda frame: frame.rename(columns={"prompt": "messages"})
    )
    config = AREW + data(renamed, renamed)
    refuse(verl_config(config), "lacks column(s) ['prompt']")
    validate_selflock_config(verl_config(config + ["data.prompt_key=messages"]))


def test_extra_info_without_the_env_spec_is_refused(verl_config, pe_files, tmp_path):
    def drop_env(frame):
        frame["extra_info"] = [{"index": info["index"], "split": info["split"]} for info in frame["extra_info"]]
        return frame

    bad = write_variant(pe_files["train"], tmp_path / "train.parquet", drop_env)
    refuse(verl_config(AREW + data(bad, pe_files["test"])), "'extra_info' has no 'env' field", str(bad))


def test_the_env_spec_is_required_only_on_rows_active_reasoning_plays(verl_config, pe_files, tmp_path):
    """Rows of another loop (``tool_agent_arew``: tool calls, no environment) need no ``extra_info.env``, in an
    AREW run too; a row without ``agent_name`` is played by the default loop."""
    from verl_selflock.tools.calculator import TOOL_CONFIG_PATH

    def without_env(names: list[str | None]):
        def change(frame):
            frame["agent_name"] = names + [names[-1]] * (len(frame) - len(names))
            frame["extra_info"] = [{"index": info["index"], "split": info["split"]} for info in frame["extra_info"]]
            return frame

        return change

    tools = write_variant(pe_files["train"], tmp_path / "tools.parquet", without_env(["tool_agent_arew"]))
    validate_selflock_config(verl_config(AREW + data(tools, tools)))
    mixed = write_variant(pe_files["train"], tmp_path / "mixed.parquet", without_env(["tool_agent_arew", None]))
    tool_run = [f"{DEFAULT_KEY}=tool_agent_arew", f"actor_rollout_ref.rollout.multi_turn.tool_config_path={TOOL_CONFIG_PATH}"]
    validate_selflock_config(verl_config(AREW + tool_run + data(mixed, mixed)))  # the null row: tool_agent_arew
    refuse(verl_config(AREW + OUR_LOOP + data(mixed, mixed)), "'extra_info' has no 'env' field", str(mixed))


def test_a_prompt_that_is_not_chat_messages_is_refused(verl_config, pe_files, tmp_path):
    def flatten(frame):
        frame["prompt"] = [message[0]["content"] for message in frame["prompt"]]
        return frame

    bad = write_variant(pe_files["train"], tmp_path / "train.parquet", flatten)
    refuse(verl_config(AREW + data(bad, pe_files["test"])), "column 'prompt' must hold chat messages", str(bad))


def test_json_files_are_checked_for_presence_and_size_only(verl_config, pe_files, tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("")
    refuse(verl_config(AREW + data(jsonl, pe_files["test"])), f"data.train_files: {jsonl}", "is empty")
    jsonl.write_text('{"prompt": []}\n')
    validate_selflock_config(verl_config(AREW + data(jsonl, pe_files["test"])))
    csv = tmp_path / "train.csv"
    csv.write_text("a,b\n")
    refuse(verl_config(AREW + data(csv, pe_files["test"])), "veRL reads", "'.csv'")


# ---------------------------------------------------------------------------------------------------
# The agent-loop YAML
# ---------------------------------------------------------------------------------------------------


def loop_yaml(tmp_path: Path, **knobs) -> Path:
    import yaml

    path = tmp_path / "loops.yaml"
    path.write_text(yaml.safe_dump([{"name": "active_reasoning", "_target_": AGENT_LOOP_TARGET, **knobs}]))
    return path


def test_the_target_names_our_loop_class():
    from verl_selflock.verl_adapter.agent_loop import ActiveReasoningAgentLoop

    assert AGENT_LOOP_TARGET == f"{ActiveReasoningAgentLoop.__module__}.{ActiveReasoningAgentLoop.__qualname__}"


def test_a_knob_typo_names_the_key_the_file_and_the_known_knobs(verl_config, pe_files, tmp_path):
    path = loop_yaml(tmp_path, max_turn_token=40)
    config = verl_config(AREW + data(pe_files["train"], pe_files["test"]) + [f"{LOOP_KEY}={path}"])
    refuse(config, LOOP_KEY, str(path), "['max_turn_token']", "did you mean 'max_turn_tokens'", "known knobs", "t3")


@pytest.mark.parametrize(
    "knobs, fragment",
    [({"max_turns": 3}, "max_turns must be even"), ({"t3": {"enabeld": True}}, "t3.enabeld")],
)
def test_a_bad_knob_value_is_named(verl_config, pe_files, tmp_path, knobs, fragment):
    path = loop_yaml(tmp_path, **knobs)
    refuse(verl_config(AREW + data(pe_files["train"], pe_files["test"]) + [f"{LOOP_KEY}={path}"]), str(path), fragment)


def test_stop_strings_are_refused_on_sglang(verl_config, pe_files, tmp_path):
    """SGLang (run by veRL with skip_tokenizer_init) never matches stop strings and rejects vLLM's keys."""
    path = loop_yaml(tmp_path, stop_on_closing_tag=True)
    base = AREW + data(pe_files["train"], pe_files["test"]) + [f"{LOOP_KEY}={path}"]
    refuse(verl_config(base + ["actor_rollout_ref.rollout.name=sglang"]), "stop_on_closing_tag=false", "sglang")
    validate_selflock_config(verl_config(base + ["actor_rollout_ref.rollout.name=vllm"]))
    (tmp_path / "off").mkdir()
    off = loop_yaml(tmp_path / "off", stop_on_closing_tag=False)
    validate_selflock_config(verl_config(AREW + data(pe_files["train"], pe_files["test"]) + [
        f"{LOOP_KEY}={off}", "actor_rollout_ref.rollout.name=sglang"]))


def test_a_yaml_that_declares_our_loop_makes_the_run_ours(verl_config, tmp_path):
    path = loop_yaml(tmp_path, max_turn_tokens=40)
    config = verl_config(["algorithm.adv_estimator=grpo", f"{LOOP_KEY}={path}", "data.train_files=/no/train.parquet"])
    refuse(config, "data.train_files", "declares the active_reasoning agent loop")


def test_a_yaml_of_other_loops_in_a_plain_run_is_left_to_verl(verl_config, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("- name: mine\n  _target_: my.Loop\n  whatever: 1\n")
    validate_selflock_config(verl_config(["algorithm.adv_estimator=grpo", f"{LOOP_KEY}={other}"]))
    validate_selflock_config(verl_config(["algorithm.adv_estimator=grpo", f"{LOOP_KEY}={tmp_path}/absent.yaml"]))


@pytest.mark.parametrize(
    "text, fragment", [(None, "no such file"), ("name: x\n", "a list of entries"), ("- [", "not a readable")]
)
def test_an_unusable_yaml_of_a_run_of_ours_is_named(verl_config, pe_files, tmp_path, text, fragment):
    path = tmp_path / "loops.yaml"
    if text is not None:
        path.write_text(text)
    config = verl_config(AREW + data(pe_files["train"], pe_files["test"]) + [f"{LOOP_KEY}={path}"])
    refuse(config, LOOP_KEY, str(path), fragment)


def test_a_knob_typo_through_our_resolver_lists_the_known_knobs(verl_config, pe_files, monkeypatch, tmp_path):
    monkeypatch.setenv("VERL_SELFLOCK_CACHE", str(tmp_path))
    override = f"{LOOP_KEY}=" + "${selflock.agent_loop_yaml:'max_turn_token=40'}"
    config = verl_config(AREW + data(pe_files["train"], pe_files["test"]) + [override])
    refuse(config, LOOP_KEY, "max_turn_token", "did you mean 'max_turn_tokens'", "known knobs")


def test_resolved_data_is_built_once_for_the_driver_and_the_task_runner(verl_config, monkeypatch, tmp_path):
    """``${selflock.pe_data:...}`` builds on first use: the driver's check builds it (train and val share the
    folder), and the TaskRunner's ``OmegaConf.resolve`` later finds the build done."""
    from omegaconf import OmegaConf

    from verl_selflock.data import pe

    monkeypatch.setenv("VERL_SELFLOCK_CACHE", str(tmp_path))
    builds = []
    real_build = pe.build_pe_dataset
    monkeypatch.setattr(pe, "build_pe_dataset", lambda *a, **k: builds.append(a) or real_build(*a, **k))
    folder = "${selflock.pe_data:gated,3,4,2,0,4}"
    config = verl_config(AREW + [f"data.train_files={folder}/train.parquet", f"data.val_files={folder}/test.parquet"])
    validate_selflock_config(config)
    assert len(builds) == 1
    assert OmegaConf.is_interpolation(config.data, "train_files")  # the driver's config is left unresolved
    OmegaConf.resolve(config)  # what veRL's TaskRunner does
    assert len(builds) == 1 and Path(config.data.train_files).is_file()


@pytest.mark.slow  # a fresh interpreter imports veRL (~10 s)
def test_real_main_ppo_stops_on_a_data_mistake_before_ray_starts(pe_files, tmp_path):
    """The stock entry point with an empty training parquet stops on the driver with our one-line message."""
    empty = write_variant(pe_files["train"], tmp_path / "train.parquet", lambda frame: frame.iloc[:0])
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", *AREW, *data(empty, pe_files["test"])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert out.returncode != 0
    assert f"data.train_files: {empty} has no rows" in out.stdout + out.stderr
    assert "ray init kwargs" not in out.stdout  # main_ppo prints this right before ray.init
