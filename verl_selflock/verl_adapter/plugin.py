"""The ``verl.plugins`` entry point: veRL imports this module on ``import verl`` in every process.

That covers the driver, the TaskRunner and every Ray worker (FSDP, agent-loop, reward-loop), so our
names are registered wherever veRL looks them up, with no flag from the user. veRL swallows plugin
import errors at DEBUG level, so each component registers separately, failures are logged at
WARNING and recorded in :data:`STATUS`, and ``verl-selflock doctor`` reports them.
"""

from __future__ import annotations

import importlib
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("verl_selflock")


@dataclass
class ComponentStatus:
    ok: bool
    names: list[str] = field(default_factory=list)
    error: str = ""


STATUS: dict[str, ComponentStatus] = {}
"""Component -> what it registered (or the traceback of why it could not)."""


def _import(module: str) -> Callable[[], list[str]]:
    def load() -> list[str]:
        importlib.import_module(module)
        return []

    return load


def _cpu_backend() -> list[str]:
    from verl_selflock.verl_adapter import cpu

    return list(cpu.register())


def _config_resolvers() -> list[str]:
    from verl_selflock.verl_adapter.resolvers import register_resolvers

    return register_resolvers()


def _config_validation() -> list[str]:
    from verl_selflock.verl_adapter.config_validation import validate_selflock_config
    from verl_selflock.verl_adapter.private_names import install_config_validation

    install_config_validation(validate_selflock_config)
    return ["validate_config"]


# Order matters: the CPU platform must exist before anything asks veRL for the current platform
# (some veRL modules do at import time).
_COMPONENTS: dict[str, tuple[Callable[[], list[str]], list[str]]] = {
    "cpu_backend": (_cpu_backend, []),
    "estimators": (_import("verl_selflock.verl_adapter.estimators"), ["arew", "igpo"]),
    "trainer_mode": (_import("verl_selflock.verl_adapter.trainer_mode"), ["selflock"]),
    "config_validation": (_config_validation, []),
    "config_resolvers": (_config_resolvers, []),
    "agent_loops": (_import("verl_selflock.verl_adapter.agent_loop"), ["active_reasoning"]),
    "reward_managers": (_import("verl_selflock.verl_adapter.reward_manager"), ["active_reasoning"]),
}


def register() -> dict[str, ComponentStatus]:
    """Register every component with veRL. Idempotent: later calls only retry failed components."""
    for component, (load, names) in _COMPONENTS.items():
        if component in STATUS and STATUS[component].ok:
            continue
        try:
            STATUS[component] = ComponentStatus(ok=True, names=load() or list(names))
        except Exception:  # noqa: BLE001  (one broken component must not hide the others)
            STATUS[component] = ComponentStatus(ok=False, names=list(names), error=traceback.format_exc())
            logger.warning(
                "verl-selflock: could not register %s (run `verl-selflock doctor`):\n%s",
                component,
                STATUS[component].error,
            )
    return STATUS


register()
