"""The ``verl.plugins`` entry point: veRL imports this module on ``import verl`` in every process.

That covers the driver, the TaskRunner and every Ray worker (FSDP, agent-loop, reward-loop, vLLM
servers), so our names are registered wherever veRL looks them up, with no flag from the user. veRL
swallows plugin import errors at DEBUG level, so each component registers separately, failures are
logged at WARNING and recorded in :data:`STATUS`, and ``verl-selflock doctor`` reports them.

Light by design (issue 14): ``import verl`` must not pull in veRL's trainer, engines, agent loop or
reward loop for us (each process would pay ~1,500 modules and ~150 MB), nor resolve veRL's platform
singleton (a vendor platform plugin loaded after ours would never be detected). So the components
whose registry lives in a heavy veRL module register *lazily*: right after veRL itself executes that
module (:func:`verl_selflock.verl_adapter.lazy.when_imported`), which is before anything can look a
name up in it. Only cheap things happen at import: the ``cpu`` platform class goes into
``PlatformRegistry`` (not resolved), the config resolvers, and the driver-side wrapper of
``verl.utils.config.validate_config`` (``main_ppo`` imports it by name, so it must be in place first).

Nodes without the entry point (``VERL_USE_EXTERNAL_PLUGINS=none``, or this package not installed as
a distribution): ``VERL_USE_EXTERNAL_MODULES=verl_selflock.verl_adapter.plugin`` registers the same
everything (:mod:`verl_selflock.verl_adapter.cpu._autoregister` is an alias kept for old commands).
"""

from __future__ import annotations

import importlib
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

from verl_selflock.verl_adapter import lazy

logger = logging.getLogger("verl_selflock")


@dataclass
class ComponentStatus:
    ok: bool
    names: list[str] = field(default_factory=list)
    error: str = ""
    waits_for: str = ""
    """For a lazy component not registered yet: the veRL module whose import registers it."""


STATUS: dict[str, ComponentStatus] = {}
"""Component -> what it registered (or the traceback of why it could not, or what it waits for)."""


def _cpu_backend() -> list[str]:
    from verl_selflock.verl_adapter import cpu

    return list(cpu.register(on_error=_deferred_failure("cpu_backend")))


def _config_resolvers() -> list[str]:
    from verl_selflock.verl_adapter.resolvers import register_resolvers
    from verl_selflock.verl_adapter.tool_agent_resolvers import register_tool_resolvers

    return register_resolvers() + register_tool_resolvers()


def _config_validation() -> list[str]:
    from verl_selflock.verl_adapter.config_validation import validate_selflock_config
    from verl_selflock.verl_adapter.private_names import install_config_validation

    # The one validation entry point: it also runs the tool_agent_arew checks for runs that use that loop.
    install_config_validation(validate_selflock_config)
    return ["validate_config"]


# Registered now, in this order: the CPU platform class must be in PlatformRegistry before anything
# asks veRL for the current platform. Each is cheap (a few of our modules, nothing heavy from veRL).
_EAGER: dict[str, tuple[Callable[[], list[str]], list[str]]] = {
    "cpu_backend": (_cpu_backend, []),
    "config_validation": (_config_validation, []),
    "config_resolvers": (_config_resolvers, []),
}

# component -> (veRL module that holds the registry, our module that registers on import, names).
# The trigger is the *package* where a package's __init__ imports the registry module and the
# classes we subclass (v1 trainer, agent loop, reward managers): when it has executed, everything our
# module imports from it exists, whichever of its submodules the process imported first.
LAZY: dict[str, tuple[str, str, list[str]]] = {
    "estimators": ("verl.trainer.ppo.core_algos", "verl_selflock.verl_adapter.estimators", ["arew", "igpo"]),
    "trainer_mode": ("verl.trainer.ppo.v1", "verl_selflock.verl_adapter.trainer_mode", ["selflock"]),
    "agent_loops": ("verl.experimental.agent_loop", "verl_selflock.verl_adapter.agent_loop", ["active_reasoning"]),
    # veRL's ToolAgentLoop, which ours subclasses, is imported by the same package's __init__.
    "tool_agent_loops": (
        "verl.experimental.agent_loop",
        "verl_selflock.verl_adapter.tool_agent_loop",
        ["tool_agent_arew"],
    ),
    "reward_managers": (
        "verl.experimental.reward_loop.reward_manager",
        "verl_selflock.verl_adapter.reward_manager",
        ["active_reasoning"],
    ),
}


def _failed(component: str, names: list[str], error: str) -> None:
    STATUS[component] = ComponentStatus(ok=False, names=list(names), error=error)
    logger.warning("verl-selflock: could not register %s (run `verl-selflock doctor`):\n%s", component, error)


def _deferred_failure(component: str) -> Callable[[str, BaseException], None]:
    def report(module: str, err: BaseException) -> None:
        names = STATUS[component].names if component in STATUS else []
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        _failed(component, names, f"after veRL imported {module}:\n{text}")

    return report


def _lazy_loader(component: str, ours: str, names: list[str]) -> Callable[[ModuleType], None]:
    def load(_: ModuleType) -> None:
        importlib.import_module(ours)
        STATUS[component] = ComponentStatus(ok=True, names=list(names))

    return load


def register() -> dict[str, ComponentStatus]:
    """Register every component with veRL. Idempotent: later calls only retry failed components.

    Lazy components are ``ok`` with ``waits_for`` set until veRL imports their module; if it is
    imported already, they register now.
    """
    for component, (load, names) in _EAGER.items():
        if component in STATUS and STATUS[component].ok:
            continue
        try:
            STATUS[component] = ComponentStatus(ok=True, names=load() or list(names))
        except Exception:  # noqa: BLE001  (one broken component must not hide the others)
            _failed(component, names, traceback.format_exc())
    for component, (trigger, ours, names) in LAZY.items():
        if component in STATUS and (STATUS[component].ok or not _importable_now(trigger)):
            continue  # registered, waiting for its trigger, or failed and nothing changed since
        STATUS[component] = ComponentStatus(ok=True, names=list(names), waits_for=trigger)
        lazy.when_imported(trigger, _lazy_loader(component, ours, names), _deferred_failure(component))
    return STATUS


def _importable_now(trigger: str) -> bool:
    """A failed lazy component is retried once its trigger module is fully imported."""
    return lazy.is_imported(trigger)


def register_all_now() -> dict[str, ComponentStatus]:
    """Import every lazy component's trigger module, so that all names are registered in this process
    (what ``verl-selflock doctor`` checks; heavy: veRL's trainer, agent loop and reward loop)."""
    register()
    for component, (trigger, _, names) in LAZY.items():
        try:
            importlib.import_module(trigger)
        except Exception:  # noqa: BLE001
            _failed(component, names, f"importing {trigger} failed:\n{traceback.format_exc()}")
    lazy.run_pending()
    return register()


register()
