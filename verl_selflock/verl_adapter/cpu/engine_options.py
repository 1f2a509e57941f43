"""The ``hf`` rollout's options, ``actor_rollout_ref.rollout.engine_kwargs.hf``: their names and their check.

Checked twice: on the driver before Ray starts (:mod:`verl_selflock.verl_adapter.config_validation`) and
by the generation server that reads them. Light to import (no veRL, no transformers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from verl_selflock.verl_adapter.cpu.speculation import NgramSpeculation

HF_ENGINE_OPTIONS = (
    "dtype",
    "max_batch_size",
    "batch_wait_ms",
    "num_threads",
    "prefix_cache_mb",
    "prefix_cache_entries",
    "speculative_config",
)
"""The keys of ``actor_rollout_ref.rollout.engine_kwargs.hf``."""


def check_hf_engine_options(options: Mapping[str, Any]) -> NgramSpeculation | None:
    """Raise ValueError on an unknown ``engine_kwargs.hf`` key or a bad ``speculative_config``; return the
    speculation it asks for (None: one token per step)."""
    unknown = sorted(set(options) - set(HF_ENGINE_OPTIONS))
    if unknown:
        raise ValueError(
            f"actor_rollout_ref.rollout.engine_kwargs.hf: unknown keys {unknown} (known: {list(HF_ENGINE_OPTIONS)})"
        )
    return NgramSpeculation.from_options(options.get("speculative_config"))
