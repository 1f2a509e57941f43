"""The plugin reaches every process that imports veRL, through the entry point alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPECTED = {
    "estimators": ["arew", "igpo"],
    "trainer_modes": ["selflock"],
    "agent_loops": ["active_reasoning", "tool_agent_arew"],
    "reward_managers": ["active_reasoning"],
}

# Runs in a fresh interpreter: nothing but `import verl` before the registries are read.
PROBE = """
import json, sys
import verl
loaded = "verl_selflock.verl_adapter.plugin" in sys.modules
from verl_selflock.verl_adapter import private_names
print(json.dumps({
    "loaded": loaded,
    "estimators": private_names.registered_estimators(),
    "trainer_modes": private_names.registered_trainer_modes(),
    "agent_loops": private_names.registered_agent_loops(),
    "reward_managers": private_names.registered_reward_managers(),
    "validation": private_names.config_validation_installed(),
}))
"""


def _probe(env_overrides: dict[str, str] | None = None) -> dict:
    env = {**os.environ, **(env_overrides or {})}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # fresh interpreters import veRL (~10 s)
def test_import_verl_alone_registers_everything():
    seen = _probe()
    assert seen["loaded"]
    assert seen["validation"]
    for kind, names in EXPECTED.items():
        for name in names:
            assert name in seen[kind], (kind, name, seen[kind])


@pytest.mark.slow  # a fresh interpreter imports veRL (~10 s)
def test_plugins_disabled_by_veRL_policy_means_nothing_registered():
    seen = _probe({"VERL_USE_EXTERNAL_PLUGINS": "none"})
    assert not seen["loaded"]
    assert "arew" not in seen["estimators"]


def test_register_is_idempotent():
    import verl  # noqa: F401  (the entry point has registered once already)

    from verl_selflock.verl_adapter import plugin, private_names

    estimators, modes = private_names.registered_estimators(), private_names.registered_trainer_modes()
    for _ in range(2):
        status = plugin.register()
        assert all(component.ok for component in status.values()), plugin.STATUS
    assert private_names.registered_estimators() == estimators
    assert private_names.registered_trainer_modes() == modes


def _console_script() -> str:
    """The installed `verl-selflock` script of this interpreter's environment."""
    return str(Path(sys.executable).parent / "verl-selflock")


@pytest.mark.slow  # fresh interpreters import veRL (~10 s)
def test_doctor_reports_success_and_failure():
    ok = subprocess.run([_console_script(), "doctor"], capture_output=True, text=True, timeout=300, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "advantage estimators: arew" in ok.stdout and "FAIL" not in ok.stdout
    assert "tasks: flodial, mediq, pe, tau2_telecom (tau2 installed)" in ok.stdout

    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none"}
    bad = subprocess.run([_console_script(), "doctor"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert bad.returncode == 1
    assert "[FAIL] plugin loaded by `import verl`" in bad.stdout


@pytest.mark.slow
def test_ray_worker_process_sees_registrations():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:

        @ray.remote
        def worker_registries() -> dict:
            import os
            import sys

            import verl  # noqa: F401

            from verl_selflock.verl_adapter import private_names

            return {
                "pid": os.getpid(),
                "loaded": "verl_selflock.verl_adapter.plugin" in sys.modules,
                "estimators": private_names.registered_estimators(),
                "trainer_modes": private_names.registered_trainer_modes(),
            }

        seen = ray.get(worker_registries.remote(), timeout=240)
    finally:
        ray.shutdown()
    assert seen["pid"] != os.getpid()
    assert seen["loaded"]
    assert "arew" in seen["estimators"] and "selflock" in seen["trainer_modes"]


# -- lazy registration (issue 14): names appear when veRL imports their registry, not before ----------

# veRL's own flow, no training: the driver imports main_ppo, the TaskRunner asks for the trainer class
# and the estimator, workers build agent loops, reward managers and rollout replicas by name.
FLOW_PROBE = """
import json, sys
import verl
from verl.plugin.platform import platform_manager
HEAVY = ("verl.trainer.ppo.core_algos", "verl.trainer.ppo.v1", "verl.experimental.agent_loop",
         "verl.experimental.reward_loop.reward_manager", "verl.workers.rollout.replica")
after_import = {"heavy": [m for m in HEAVY if m in sys.modules],
                "platform_resolved": platform_manager._current_platform is not None}
from verl.trainer import main_ppo
from verl.utils.config import validate_config
from verl.trainer.ppo.v1 import get_trainer_cls
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
from verl.workers.rollout.replica import RolloutReplicaRegistry
from verl.workers.rollout.base import _ROLLOUT_REGISTRY
from verl_selflock.verl_adapter import plugin
print(json.dumps({
    **after_import,
    "trainer": get_trainer_cls("selflock").__name__,
    "estimators": [get_adv_estimator_fn(n).__name__ for n in ("arew", "igpo")],
    "agent_loop": _agent_loop_registry["active_reasoning"]["_target_"],
    "reward_manager": get_reward_manager_cls("active_reasoning").__name__,
    "replica": RolloutReplicaRegistry.get("hf").__name__,
    "rollout_class": _ROLLOUT_REGISTRY[("hf", "async")],
    "validation_wrapped": bool(getattr(validate_config, "__verl_selflock_wrapped__", False)),
    "main_ppo_validation_wrapped": bool(getattr(main_ppo.validate_config, "__verl_selflock_wrapped__", False)),
    "status": {k: [v.ok, v.waits_for] for k, v in plugin.STATUS.items()},
}))
"""


def _run(code: str, env_overrides: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_MODULES", "VERL_PLATFORM")}
    env.update(env_overrides)
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_everything_registered(seen: dict) -> None:
    assert seen["trainer"] == "SelflockTrainer"
    assert seen["estimators"] == ["compute_arew_outcome_advantage", "compute_igpo_outcome_advantage"]
    assert seen["agent_loop"].endswith("ActiveReasoningAgentLoop")
    assert seen["reward_manager"] == "ActiveReasoningRewardManager"
    assert seen["replica"] == "HFReplica"
    assert seen["rollout_class"].endswith("HFServerAdapter")
    assert seen["validation_wrapped"] and seen["main_ppo_validation_wrapped"]
    assert all(ok and not waits for ok, waits in seen["status"].values()), seen["status"]


@pytest.mark.slow  # a fresh interpreter imports veRL (~10 s)
def test_lazy_registration_in_veRL_flow():
    seen = _run(FLOW_PROBE, {"VERL_USE_EXTERNAL_PLUGINS": "auto"})
    assert seen["heavy"] == [] and seen["platform_resolved"] is False
    _assert_everything_registered(seen)


@pytest.mark.parametrize(
    "module", ["verl_selflock.verl_adapter.plugin", "verl_selflock.verl_adapter.cpu._autoregister"]
)
@pytest.mark.slow  # a fresh interpreter imports veRL (~10 s)
def test_fallback_without_entry_points_registers_everything(module):
    """The documented fallback (README) for nodes without our entry point, and its old CPU-only name."""
    seen = _run(FLOW_PROBE, {"VERL_USE_EXTERNAL_PLUGINS": "none", "VERL_USE_EXTERNAL_MODULES": module})
    assert seen["heavy"] == [] and seen["platform_resolved"] is False
    _assert_everything_registered(seen)


@pytest.mark.slow  # a fresh interpreter imports veRL (~10 s)
def test_plugin_imported_after_veRL_trainer_registers_at_once():
    """Importing the fallback by hand after veRL's trainer is loaded: each name registers immediately."""
    code = FLOW_PROBE.replace(
        "from verl.trainer import main_ppo\n",
        "import verl.trainer.ppo.v1, verl.experimental.agent_loop, verl.experimental.reward_loop.reward_manager\n"
        "import verl_selflock.verl_adapter.cpu._autoregister\n"
        "from verl.trainer import main_ppo\n",
    )
    seen = _run(code, {"VERL_USE_EXTERNAL_PLUGINS": "none"})
    _assert_everything_registered(seen)


def test_when_imported_hook(tmp_path, monkeypatch):
    from verl_selflock.verl_adapter import lazy

    package = tmp_path / "selflock_lazy_probe"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    (package / "broken_hook.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen, errors = [], []
    assert not lazy.when_imported("selflock_lazy_probe.broken_hook", lambda m: 1 / 0, lambda n, e: errors.append(n))
    assert "selflock_lazy_probe.broken_hook" in lazy.pending()
    import selflock_lazy_probe.broken_hook as module  # the hook fails, the import does not

    assert module.VALUE == 2 and errors == ["selflock_lazy_probe.broken_hook"]
    assert type(module.__loader__).__name__ == "SourceFileLoader" and module.__spec__.loader is module.__loader__
    assert "selflock_lazy_probe.broken_hook" not in lazy.pending()
    assert lazy.when_imported("selflock_lazy_probe", lambda m: seen.append(m.VALUE))  # already imported: now
    assert seen == [1]
    for name in ("selflock_lazy_probe.broken_hook", "selflock_lazy_probe"):
        sys.modules.pop(name)
