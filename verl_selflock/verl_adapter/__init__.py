"""The only place that imports veRL: our agent loop, reward manager, trainer mode (with IGPO's step and
scoring), estimator names, config validation and resolvers, the standalone agent-loop builder,
``verl-selflock doctor``, the CPU backend (:mod:`~verl_selflock.verl_adapter.cpu`), and the plugin that
registers them all (:mod:`~verl_selflock.verl_adapter.plugin`). The private veRL names we rely on are
listed, with the veRL file:line and what we assume, in :mod:`~verl_selflock.verl_adapter.private_names`."""
