"""What crosses the line between rollout and training: one definition of each name, field and key.

* :mod:`~verl_selflock.contracts.critique`: the per-token critique fields an agent loop hands to the
  advantage step (``critique``, ``critique_channel``, ``turn_ids``, ``fallback_eligible``).
* :mod:`~verl_selflock.contracts.episode`: the per-episode record (``selflock_*`` keys) that the agent
  loop writes and the reward manager, diagnostics, eval and IGPO read.
* :mod:`~verl_selflock.contracts.names`: the names we register in veRL.

Plain Python: no veRL, no Ray.
"""
