"""verl-selflock: train active-reasoning LLM agents with veRL without information self-locking.

Importing this package is cheap and imports nothing from veRL; veRL loads our registrations
through the ``verl.plugins`` entry point (:mod:`verl_selflock.verl_adapter.plugin`).
"""

__version__ = "0.1.0"
