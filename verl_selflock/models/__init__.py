"""Small models that ship on PyPI, for the CPU backend's embedded default and for tests."""

from verl_selflock.models.smollm2 import smollm2_path

__all__ = ["smollm2_path"]
