"""The agent loop's knobs travel inside the config every agent-loop worker receives (``selflock_agent_loop``),
pinned on the driver; nothing a worker reads lives on one node's disk (issue 14)."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf

from verl_selflock.verl_adapter import agent_loop_config, config_validation
from verl_selflock.verl_adapter.agent_loop_config import loop_config_for, pop_entry_knobs, run_knobs
from verl_selflock.verl_adapter.config_validation import SelflockConfigError, pin_agent_loop_knobs

SIM = {"base_url": "${oc.env:SIM_URL_T,'http://localhost:8000/v1'}", "model": "patient", "api_key_env": "SIM_KEY_T"}


def test_one_config_key_everywhere():
    assert config_validation.CONFIG_KEY == agent_loop_config.CONFIG_KEY == "selflock_agent_loop"


def test_run_knobs_win_over_the_yaml_entry_and_mappings_merge():
    trainer_config = OmegaConf.create(
        {"selflock_agent_loop": {"max_turn_tokens": 40, "simulator": {"timeout_s": 5}, "t3": {"enabled": True}}}
    )
    entry = {"max_turn_tokens": 48, "max_obs_tokens": 64, "simulator": OmegaConf.create({"base_url": "http://h:1/v1", "model": "m"})}
    cfg = loop_config_for(trainer_config, entry)
    assert (cfg.max_turn_tokens, cfg.max_obs_tokens) == (40, 64)
    assert cfg.simulator["base_url"] == "http://h:1/v1" and cfg.simulator["timeout_s"] == 5
    assert cfg.t3.enabled
    assert loop_config_for(OmegaConf.create({}), None).max_turn_tokens == 512  # defaults without either
    with pytest.raises(ValueError, match=r"unknown active_reasoning agent-loop knob\(s\) \['max_turn_tokenz'\]"):
        loop_config_for(OmegaConf.create({"selflock_agent_loop": {"max_turn_tokenz": 1}}))
    with pytest.raises(TypeError, match="must be a mapping"):
        run_knobs(OmegaConf.create({"selflock_agent_loop": 3}))


def test_pop_entry_knobs_leaves_verls_arguments():
    kwargs = {"name": "active_reasoning", "trainer_config": object(), "max_turns": 6, "t3": {"enabled": True}}
    assert pop_entry_knobs(kwargs) == {"max_turns": 6, "t3": {"enabled": True}}
    assert set(kwargs) == {"name", "trainer_config"}


def test_the_driver_pins_the_node_in_its_own_environment(verl_config, monkeypatch):
    monkeypatch.setenv("SIM_URL_T", "http://sim-node:9000/v1")
    config = verl_config([f"+selflock_agent_loop={{max_turns: 6, simulator: {_flow(SIM)}}}"])
    knobs = pin_agent_loop_knobs(config)
    assert knobs["simulator"]["base_url"] == "http://sim-node:9000/v1"
    monkeypatch.setenv("SIM_URL_T", "http://other:1/v1")  # the TaskRunner's node would see this
    assert config.selflock_agent_loop.simulator.base_url == "http://sim-node:9000/v1"
    assert "${" not in OmegaConf.to_yaml(config.selflock_agent_loop, resolve=False)
    assert pin_agent_loop_knobs(verl_config([])) is None


@pytest.mark.parametrize(
    "node, fragment",
    [
        ("{max_turn_token: 40}", "did you mean 'max_turn_tokens'"),
        ("{simulator: {base_url: localhost, model: m}}", "simulator.base_url"),
        ("{t3: {enabled: true, k: 0}}", "t3.k must be an integer >= 1"),
        ("{simulator: {base_url: '${oc.env:SIM_NOT_SET_T}', model: m}}", "could not be resolved"),
    ],
)
def test_bad_knobs_fail_on_the_driver_naming_the_node(verl_config, node, fragment):
    with pytest.raises(SelflockConfigError, match="selflock_agent_loop") as caught:
        pin_agent_loop_knobs(verl_config([f"+selflock_agent_loop={node}"]))
    assert fragment in str(caught.value)


def test_stop_strings_on_sglang_are_refused_from_the_node_too(verl_config):
    config = verl_config(["+selflock_agent_loop={stop_on_closing_tag: true}", "actor_rollout_ref.rollout.name=sglang"])
    with pytest.raises(SelflockConfigError, match="stop_on_closing_tag=true needs a rollout"):
        pin_agent_loop_knobs(config)


def test_multi_node_warnings_name_loopback_and_the_key_variable(verl_config, monkeypatch, caplog):
    monkeypatch.setenv("SIM_KEY_T", "sk-secret-value")
    caplog.set_level(logging.WARNING, logger=config_validation.__name__)
    config = verl_config([f"+selflock_agent_loop={{simulator: {_flow(SIM)}}}", "trainer.nnodes=2"])
    pin_agent_loop_knobs(config)
    assert "http://localhost:8000/v1 is each node's own loopback and trainer.nnodes=2" in caplog.text
    assert "export SIM_KEY_T on every node" in caplog.text and "sk-secret-value" not in caplog.text
    caplog.clear()
    pin_agent_loop_knobs(verl_config([f"+selflock_agent_loop={{simulator: {_flow(SIM)}}}"]))  # one node: quiet
    assert caplog.text == ""


def _flow(mapping: dict) -> str:
    """A mapping as a Hydra command-line value (quoted strings keep their interpolations unresolved)."""
    return "{" + ", ".join(f"{key}: {value!r}" if "$" in value else f"{key}: {value}" for key, value in mapping.items()) + "}"
