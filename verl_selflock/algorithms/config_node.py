"""Reading one config node (``algorithm.arew``, ``algorithm.igpo``, the agent loop's ``t3``) into a dataclass."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def checked_kwargs(cls: type, mapping: Mapping[str, Any] | Any, config_path: str) -> dict[str, Any]:
    """The node's keys as constructor kwargs of the dataclass ``cls``.

    Args:
        cls: the settings dataclass.
        mapping: the node (a dict or an OmegaConf ``DictConfig``; ``DictConfig.items()`` resolves
            interpolations and yields plain scalars).
        config_path: where the node lives, for the messages (``algorithm.igpo``).

    Raises:
        ValueError: if the node is not a mapping, or on an unknown key (listing the known ones).
    """
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{config_path} must be a mapping of settings, got {type(mapping).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(str(key) for key in mapping if key not in known)
    if unknown:
        raise ValueError(f"unknown key(s) {[f'{config_path}.{k}' for k in unknown]}; known keys: {known}")
    return {str(key): value for key, value in mapping.items()}
