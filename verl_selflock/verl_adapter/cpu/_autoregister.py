"""Import-time registration, for ``VERL_USE_EXTERNAL_MODULES=verl_selflock.verl_adapter.cpu._autoregister``.

Our ``verl.plugins`` entry point normally calls :func:`verl_selflock.verl_adapter.cpu.register`; this
module is for environments where entry points are disabled (``VERL_USE_EXTERNAL_PLUGINS=none``).
"""

from verl_selflock.verl_adapter.cpu import register

REGISTERED = register()
