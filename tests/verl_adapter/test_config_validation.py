"""Bad AREW settings fail on the driver, before Ray starts, with a message that names the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from verl_selflock.verl_adapter.config_validation import (
    SelflockConfigError,
    igpo_scoring_mode_of,
    validate_selflock_config,
)

GOOD = [
    "algorithm.adv_estimator=arew",
    "trainer.v1.trainer_mode=selflock",
    "critic.enable=True",
    "+algorithm.arew.lam=0.2",
]


@pytest.fixture(scope="module")
def real_data(tmp_path_factory) -> list[str]:
    """Overrides pointing data.train_files / data.val_files at a real PE-G set built by our builder (a run
    of ours has its files checked on the driver too)."""
    from verl_selflock.data.pe import build_pe_dataset

    paths = build_pe_dataset("gated", 3, 4, 2, 0, tmp_path_factory.mktemp("pe"), max_turns=4, progress=False)
    return [f"data.train_files={paths['train']}", f"data.val_files={paths['test']}"]


def test_good_config_passes(verl_config, real_data):
    validate_selflock_config(verl_config(GOOD + real_data))


def test_defaults_without_arew_node(verl_config, real_data):
    validate_selflock_config(verl_config(GOOD[:3] + real_data))


def test_other_estimators_untouched(verl_config):
    validate_selflock_config(verl_config(["algorithm.adv_estimator=grpo"]))


def test_diagnostics_settings_are_checked_for_any_estimator(verl_config):
    validate_selflock_config(verl_config(["algorithm.adv_estimator=grpo", "+selflock_diagnostics.window=20"]))
    with pytest.raises(SelflockConfigError, match=r"selflock_diagnostics\.min_reward_rise"):
        validate_selflock_config(verl_config(["algorithm.adv_estimator=gae", "+selflock_diagnostics.min_reward_rise=0"]))


def test_hf_rollout_options_are_checked_for_any_estimator(verl_config):
    speculative = "{method: ngram, num_speculative_tokens: 3}"
    hf = ["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.name=hf"]
    validate_selflock_config(verl_config([*hf, f"+actor_rollout_ref.rollout.engine_kwargs.hf.speculative_config={speculative}"]))
    with pytest.raises(SelflockConfigError, match=r"engine_kwargs.hf: unknown keys \['prefix_cach_mb'\]"):
        validate_selflock_config(verl_config([*hf, "+actor_rollout_ref.rollout.engine_kwargs.hf.prefix_cach_mb=64"]))
    with pytest.raises(SelflockConfigError, match="'ngram' only"):
        validate_selflock_config(verl_config([*hf, "+actor_rollout_ref.rollout.engine_kwargs.hf.speculative_config={method: eagle, num_speculative_tokens: 3}"]))
    # another rollout's engine_kwargs are its own business
    validate_selflock_config(verl_config(["algorithm.adv_estimator=grpo", "+actor_rollout_ref.rollout.engine_kwargs.hf.bogus=1"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+algorithm.arew.lam=-1"], "algorithm.arew.lam"),
        (["+algorithm.arew.mode=bogus"], "algorithm.arew.mode"),
        (["+algorithm.arew.base=nonexistent_estimator"], "algorithm.arew.base"),
        (["+algorithm.arew.base=arew"], "algorithm.arew.base"),
        # registered in veRL too, but only as algorithm.adv_estimator: as a base it failed in the first step
        (["+algorithm.arew.base=igpo"], "algorithm.arew.base must name a base advantage estimator"),
        (["+algorithm.arew.channels=xx"], "algorithm.arew.channels"),
        (["+algorithm.arew.noise_alpha=1.5"], "algorithm.arew.noise_alpha"),
        (["+algorithm.arew.lamda=0.3"], "lamda"),
        (["trainer.v1.trainer_mode=sync"], "trainer.v1.trainer_mode=selflock"),
        (["trainer.use_v1=false"], "trainer.use_v1=true"),
        (["critic.enable=False"], "critic.enable=True"),
        (["+selflock_diagnostics.window=2"], "selflock_diagnostics.window"),
        (["+selflock_diagnostics.windw=20"], "selflock_diagnostics: unknown key"),
    ],
)
def test_bad_config_names_the_fix(verl_config, overrides, message):
    config = verl_config(GOOD[:3] + overrides)
    with pytest.raises(SelflockConfigError, match=message.replace(".", r"\.")):
        validate_selflock_config(config)


def test_grpo_base_needs_no_critic(verl_config, real_data):
    config = verl_config(
        ["algorithm.adv_estimator=arew", "trainer.v1.trainer_mode=selflock", "+algorithm.arew.base=grpo"] + real_data
    )
    validate_selflock_config(config)


@pytest.mark.parametrize("base", ["rloo", "reinforce_plus_plus"])
def test_any_verl_base_estimator_is_a_base(verl_config, real_data, base):
    validate_selflock_config(verl_config(GOOD[:2] + [f"+algorithm.arew.base={base}"] + real_data))


def test_the_base_message_lists_veRLs_bases_without_ours(verl_config):
    with pytest.raises(SelflockConfigError) as caught:
        validate_selflock_config(verl_config(GOOD[:2] + ["+algorithm.arew.base=grpoo"]))
    message = str(caught.value)
    assert "'rloo'" in message and "'gae'" in message
    assert "'arew'" not in message.split("got")[0] and "'igpo'" not in message


def test_main_ppo_sees_the_wrapped_validation():
    import verl  # noqa: F401
    from verl.trainer import main_ppo

    from verl_selflock.verl_adapter.private_names import config_validation_installed

    assert config_validation_installed()
    assert getattr(main_ppo.validate_config, "__verl_selflock_wrapped__", False)


def test_one_entry_point_checks_tool_agent_runs_too(verl_config):
    """veRL's ``validate_config`` runs ``validate_selflock_config`` alone; it reaches the ``tool_agent_arew`` checks
    itself (no second dispatcher in front of it)."""
    import verl  # noqa: F401
    from verl.utils.config import validate_config

    from verl_selflock.verl_adapter import tool_agent_checks

    assert not hasattr(tool_agent_checks, "validate_run_config")
    config = verl_config(["+selflock_tool_agent={max_turn_token: 4}"])
    with pytest.raises(SelflockConfigError, match=r"selflock_tool_agent: .*did you mean 'max_turn_tokens'"):
        validate_config(config, use_reference_policy=False, use_critic=False)


@pytest.mark.slow  # fresh interpreters import veRL (~10 s)
def test_real_main_ppo_fails_before_ray_starts(tmp_path):
    """The stock entry point with a missing trainer mode stops on the driver with our message."""
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "algorithm.adv_estimator=arew", "critic.enable=True"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert out.returncode != 0
    assert "trainer.v1.trainer_mode=selflock" in out.stdout + out.stderr
    assert "ray init kwargs" not in out.stdout  # main_ppo prints this right before ray.init


IGPO = ["algorithm.adv_estimator=igpo", "trainer.v1.trainer_mode=selflock"]


@pytest.mark.parametrize("n", [2, 5])
def test_igpo_with_a_group_of_rollouts_passes(verl_config, real_data, n):
    validate_selflock_config(verl_config(IGPO + [f"actor_rollout_ref.rollout.n={n}"] + real_data))


@pytest.mark.parametrize("overrides", [[], ["actor_rollout_ref.rollout.n=1"]])
def test_igpo_with_one_rollout_per_prompt_names_the_key(verl_config, overrides):
    # veRL's default n is 1: every prompt group would hold one trajectory and the outcome term would vanish.
    message = r"actor_rollout_ref\.rollout\.n to 2 or more \(got actor_rollout_ref\.rollout\.n=1\)"
    with pytest.raises(SelflockConfigError, match=message):
        validate_selflock_config(verl_config(IGPO + overrides))


@pytest.mark.parametrize("correction", ["rollout_is=token", "rollout_rs=token"])
def test_igpo_refuses_a_rollout_correction_it_would_skip(verl_config, real_data, correction):
    """veRL applies IS weights / rejection sampling inside the advantage step IGPO replaces."""
    overrides = IGPO + ["actor_rollout_ref.rollout.n=2", f"algorithm.rollout_correction.{correction}"] + real_data
    with pytest.raises(SelflockConfigError, match="rollout_correction.bypass_mode=true"):
        validate_selflock_config(verl_config(overrides))
    # In bypass mode the actor's loss applies the correction: nothing is skipped.
    validate_selflock_config(verl_config(overrides + ["algorithm.rollout_correction.bypass_mode=true"]))
    # AREW keeps veRL's own advantage step, correction included.
    validate_selflock_config(verl_config(GOOD + [f"algorithm.rollout_correction.{correction}"] + real_data))


def test_igpo_refuses_routing_replay(verl_config, real_data):
    overrides = IGPO + ["actor_rollout_ref.rollout.n=2", "actor_rollout_ref.rollout.enable_rollout_routing_replay=true"]
    with pytest.raises(SelflockConfigError, match="enable_rollout_routing_replay=false"):
        validate_selflock_config(verl_config(overrides + real_data))


def test_rollout_n_is_not_checked_for_arew(verl_config, real_data):
    validate_selflock_config(verl_config(GOOD + ["actor_rollout_ref.rollout.n=1"] + real_data))


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["actor_rollout_ref.actor.strategy=megatron"], "actor_rollout_ref.actor.strategy=megatron"),
        (["actor_rollout_ref.model.use_fused_kernels=true"], "use_fused_kernels=true"),
    ],
)
def test_igpo_packed_scoring_is_refused_where_it_cannot_run_and_auto_falls_back(verl_config, real_data, overrides, reason):
    base = IGPO + ["actor_rollout_ref.rollout.n=2"] + real_data + overrides
    with pytest.raises(SelflockConfigError, match=f"{reason}.*algorithm.igpo.scoring=prefix"):
        validate_selflock_config(verl_config(base + ["+algorithm.igpo.scoring=packed"]))
    for mode in ("auto", "prefix"):
        config = verl_config(base + [f"+algorithm.igpo.scoring={mode}"])
        validate_selflock_config(config)
        assert igpo_scoring_mode_of(config) == "prefix"


def test_igpo_scores_packed_by_default_on_fsdp(verl_config, real_data):
    config = verl_config(IGPO + ["actor_rollout_ref.rollout.n=2"] + real_data)
    assert igpo_scoring_mode_of(config) == "packed"
    with pytest.raises(SelflockConfigError, match=r"algorithm\.igpo\.scoring must be one of"):
        validate_selflock_config(verl_config(IGPO + ["actor_rollout_ref.rollout.n=2", "+algorithm.igpo.scoring=fast"]))
