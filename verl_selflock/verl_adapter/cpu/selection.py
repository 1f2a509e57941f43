"""Names of the CPU backend and the switch that selects it (no veRL, no torch: every CPU module reads these).

Kept apart from :mod:`verl_selflock.verl_adapter.cpu` (which registers the backend and imports its
modules) so that the platform, the patches and the rollout can read them without an import loop.
"""

from __future__ import annotations

import os

PLATFORM_NAME = "cpu"
"""Name of :class:`~verl_selflock.verl_adapter.cpu.platform.PlatformCPU` in veRL's ``PlatformRegistry``."""
ROLLOUT_NAME = "hf"
"""``actor_rollout_ref.rollout.name`` of the HF-transformers rollout (:mod:`.hf_rollout`)."""
THREADS_ENV = "VERL_SELFLOCK_CPU_THREADS"
"""Intra-op torch threads for every veRL process on the CPU platform; unset: left as is (Ray gives
its workers ``OMP_NUM_THREADS=1``). Measured on a shared 2-core machine: with other busy
processes, 2 threads made a 3x576x1536 matmul 30x slower than 1 thread (OpenMP spin contention),
so one thread per process is the safe default."""


def cpu_platform_requested() -> bool:
    """True when this process was asked to run veRL on the CPU (``VERL_PLATFORM=cpu``)."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME


def cpu_platform_active() -> bool:
    """True when veRL runs (or, once its platform singleton is resolved, will run) on the CPU platform.

    ``VERL_PLATFORM`` is the first thing veRL's detection reads (``platform_manager.py``
    ``_detect_platform_name``), so the environment decides; this does not resolve the singleton,
    so it is safe while ``verl/__init__.py`` is still importing plugins.
    """
    return cpu_platform_requested()
