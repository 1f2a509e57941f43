"""The only place that imports veRL: our agent loop, reward manager, trainer mode, estimator names,
IGPO's scoring step, config validation and resolvers, the CPU backend, and the plugin that registers
them all (:mod:`~verl_selflock.verl_adapter.plugin`). The private veRL names we rely on are listed in
:mod:`~verl_selflock.verl_adapter.private_names`."""
