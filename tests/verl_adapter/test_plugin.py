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
    "agent_loops": ["active_reasoning"],
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
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_verl_alone_registers_everything():
    seen = _probe()
    assert seen["loaded"]
    assert seen["validation"]
    for kind, names in EXPECTED.items():
        for name in names:
            assert name in seen[kind], (kind, name, seen[kind])


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


def test_doctor_reports_success_and_failure():
    ok = subprocess.run([_console_script(), "doctor"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "advantage estimators: arew" in ok.stdout and "FAIL" not in ok.stdout
    assert "tasks: flodial, mediq, pe, tau2_telecom (tau2 installed)" in ok.stdout

    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none"}
    bad = subprocess.run([_console_script(), "doctor"], capture_output=True, text=True, env=env, timeout=300)
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
