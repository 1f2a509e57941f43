"""Algorithms as pure functions and validated configs, no veRL: AREW (``arew``, ``arew_config``, ``advantage``),
IGPO (``igpo``, ``igpo_config``), T3 (``t3``) and the tensor view of the critique fields (``critique_batch``)."""
