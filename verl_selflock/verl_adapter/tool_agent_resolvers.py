"""OmegaConf resolvers of the tool-agent example (``recipes/tool_agent``), like those of
:mod:`verl_selflock.verl_adapter.resolvers` for our own loop:

* ``${selflock.calculator_data:16,8,0}`` -> a cached folder with ``train.parquet``, ``test.parquet`` and
  ``tools.yaml`` of the calculator task (train rows, test rows, seed; :mod:`verl_selflock.data.calculator`);
* ``${selflock.tool_agent_yaml:'max_turn_tokens=48','critique.repeat=-1'}`` -> the path of an agent-loop
  YAML declaring ``tool_agent_arew`` with those knobs (a dotted key sets a key of a nested mapping),
  checked here, on the driver, so that a misspelt knob fails before Ray starts.

Registered by the plugin in every veRL process (:mod:`verl_selflock.verl_adapter.plugin`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from verl_selflock.cache import build_once, cache_dir
from verl_selflock.tools.loop_config import TOOL_AGENT_NAME, TOOL_AGENT_TARGET, ToolAgentArewConfig

__all__ = ["TOOL_RESOLVERS", "calculator_data_dir", "register_tool_resolvers", "tool_agent_yaml"]

TOOL_RESOLVERS = ("selflock.calculator_data", "selflock.tool_agent_yaml")


def calculator_data_dir(n_train: int, n_test: int, seed: int = 0) -> str:
    """Build (once) and return a cached calculator dataset folder."""
    from verl_selflock.data.calculator import build_calculator_dataset

    name = f"calculator_train{int(n_train)}_test{int(n_test)}_seed{int(seed)}"

    def build(folder: Path) -> None:
        build_calculator_dataset(int(n_train), int(n_test), int(seed), folder)

    return str(build_once(cache_dir() / "data" / name, build))


def tool_agent_yaml(*knobs: Any) -> str:
    """Write (once) an agent-loop YAML for ``tool_agent_arew`` with ``'key=value'`` knobs; return its path."""
    import yaml

    entry: dict[str, Any] = {"name": TOOL_AGENT_NAME, "_target_": TOOL_AGENT_TARGET}
    for knob in knobs:
        key, sep, value = str(knob).partition("=")
        if not sep:
            raise ValueError(f"selflock.tool_agent_yaml takes key=value knobs, got {knob!r}")
        key, parsed = key.strip(), yaml.safe_load(value)
        if "." in key:  # 'critique.repeat=0' sets a key of the nested critique mapping
            parent, child = key.split(".", 1)
            entry.setdefault(parent, {})[child] = parsed
        else:
            entry[key] = parsed
    ToolAgentArewConfig.from_mapping(entry)  # fail here, on the driver, on a bad knob
    text = yaml.safe_dump([entry], sort_keys=True)
    path = cache_dir() / "agent_loops" / f"{TOOL_AGENT_NAME}-{hashlib.sha1(text.encode()).hexdigest()[:12]}.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: concurrent resolvers never see a partial file
    return str(path)


def register_tool_resolvers() -> list[str]:
    """Register the resolvers with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("selflock.calculator_data"):
        OmegaConf.register_new_resolver("selflock.calculator_data", calculator_data_dir)
    if not OmegaConf.has_resolver("selflock.tool_agent_yaml"):
        OmegaConf.register_new_resolver("selflock.tool_agent_yaml", tool_agent_yaml)
    return list(TOOL_RESOLVERS)
