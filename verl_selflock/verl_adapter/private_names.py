"""Every place where we rely on a veRL 0.9.1 name that is not a documented extension point.

Kept in one module so that a veRL upgrade has one file to check (``tests/test_verl_hooks_on_cpu.py``
asserts each name still exists). The CPU backend's own patches live in
:mod:`verl_selflock.verl_adapter.cpu.patches` and apply only on the CPU platform.

1. Driver-side validation. ``verl/trainer/main_ppo.py`` (0.9.1, L23 import, L182 call) runs
   ``verl.utils.config.validate_config`` on the driver before ``ray.init``. We wrap that function so
   that our checks run at the same moment. This works because veRL imports plugins from
   ``verl/__init__.py`` before ``main_ppo`` does ``from verl.utils.config import validate_config``.
2. Registry introspection for ``verl-selflock doctor``: the agent-loop registry
   (``verl/experimental/agent_loop/agent_loop.py`` ``_agent_loop_registry``) has no public getter.
"""

from __future__ import annotations

import functools
from typing import Any

_WRAPPED_MARK = "__verl_selflock_wrapped__"


def install_config_validation() -> None:
    """Make veRL's driver-side ``validate_config`` also run :func:`validate_selflock_config`. Idempotent."""
    import verl.utils.config as verl_config

    from verl_selflock.verl_adapter.config_validation import validate_selflock_config

    original = verl_config.validate_config
    if getattr(original, _WRAPPED_MARK, False):
        return

    @functools.wraps(original)
    def validate_config(config: Any, *args: Any, **kwargs: Any) -> Any:
        validate_selflock_config(config)
        return original(config, *args, **kwargs)

    setattr(validate_config, _WRAPPED_MARK, True)
    verl_config.validate_config = validate_config


def config_validation_installed() -> bool:
    import verl.utils.config as verl_config

    return bool(getattr(verl_config.validate_config, _WRAPPED_MARK, False))


def registered_agent_loops() -> list[str]:
    from verl.experimental.agent_loop import agent_loop

    return sorted(agent_loop._agent_loop_registry)


def registered_trainer_modes() -> list[str]:
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    return sorted(TRAINER_REGISTRY)


def registered_estimators() -> list[str]:
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY

    return sorted(str(name) for name in ADV_ESTIMATOR_REGISTRY)


def registered_reward_managers() -> list[str]:
    from verl.experimental.reward_loop.reward_manager.registry import REWARD_MANAGER

    return sorted(REWARD_MANAGER)
