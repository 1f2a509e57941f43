"""Import-time registration for nodes without our entry point: kept for commands that name it.

``VERL_USE_EXTERNAL_MODULES=verl_selflock.verl_adapter.cpu._autoregister`` used to register only the CPU
backend; it now registers everything, exactly as the ``verl.plugins`` entry point does (the CPU
backend, the estimators, the trainer mode, the agent loop, the reward manager, the config
resolvers and validation). The documented name is ``verl_selflock.verl_adapter.plugin``.
"""

from verl_selflock.verl_adapter.cpu import _REGISTERED
from verl_selflock.verl_adapter.plugin import STATUS, register

register()
REGISTERED = list(_REGISTERED)
"""The CPU backend's names, as before (``platform:cpu``, ``rollout:hf`` and, on the CPU platform, patches)."""

__all__ = ["REGISTERED", "STATUS"]
