"""OmegaConf resolvers of the tool-agent example (``recipes/tool_agent``), like those of
:mod:`verl_selflock.verl_adapter.resolvers` for our own loop:

* ``${selflock.calculator_data:16,8,0}`` -> a cached folder with ``train.parquet`` and ``test.parquet`` of
  the calculator task (train rows, test rows, seed; :mod:`verl_selflock.data.calculator`);
* ``${selflock.calculator_tools:}`` -> the calculator's veRL tool config shipped inside the package
  (``rollout.multi_turn.tool_config_path``): veRL's agent-loop workers open it on every node, so it must not
  live in one node's cache;
* ``${selflock.tool_agent_yaml:}`` -> the agent-loop YAML shipped inside the package, ``tool_agent_loop.yaml``
  beside this file (optional: the loop is registered by name). The loop's knobs go in the top-level ``selflock_tool_agent`` node, which every
  agent-loop worker receives; the old form with ``'key=value'`` knobs, which wrote a YAML file into the
  resolving node's cache, fails with the replacement to write (:func:`tool_agent_yaml`).

Registered by the plugin in every veRL process (:mod:`verl_selflock.verl_adapter.plugin`).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from verl_selflock.cache import build_once, cache_dir
from verl_selflock.tools.calculator import TOOL_CONFIG_PATH
from verl_selflock.tools.loop_config import TOOL_CONFIG_KEY, ToolAgentArewConfig
from verl_selflock.verl_adapter.resolvers import register

__all__ = [
    "TOOL_AGENT_LOOP_YAML",
    "calculator_data_dir",
    "calculator_tools_path",
    "register_tool_resolvers",
    "tool_agent_yaml",
]

TOOL_AGENT_LOOP_YAML = str(Path(__file__).with_name("tool_agent_loop.yaml"))
"""The agent-loop YAML of ``tool_agent_arew`` shipped inside the package (present on every node that has it)."""


def calculator_data_dir(n_train: int, n_test: int, seed: int = 0) -> str:
    """Build (once) and return a cached calculator dataset folder."""
    from verl_selflock.data.calculator import build_calculator_dataset

    name = f"calculator_train{int(n_train)}_test{int(n_test)}_seed{int(seed)}"

    def build(folder: Path) -> None:
        build_calculator_dataset(int(n_train), int(n_test), int(seed), folder)

    return str(build_once(cache_dir() / "data" / name, build))


def calculator_tools_path() -> str:
    """The installed path of the calculator's tool config (``${selflock.calculator_tools:}``)."""
    return TOOL_CONFIG_PATH


def tool_agent_yaml(*knobs: Any) -> str:
    """The path of the agent-loop YAML shipped inside the package, which declares ``tool_agent_arew``.

    Knobs are no longer accepted: this resolver used to write them into a YAML file under the cache of the
    process that resolved the config, which agent-loop workers on other nodes never found. They fail here
    with the exact ``selflock_tool_agent`` node (and command-line flags) to write instead.
    """
    # The helpers of the active_reasoning resolver: one parser and one printer of 'key=value' knobs.
    from verl_selflock.verl_adapter.resolvers import _dotted, _flag_value, _parse_knobs

    if not knobs:
        return TOOL_AGENT_LOOP_YAML
    bare = [knob for knob in knobs if "=" not in str(knob)]
    if bare:
        raise ValueError(f"selflock.tool_agent_yaml takes no argument (knobs go in {TOOL_CONFIG_KEY}), got {bare[0]!r}")
    moved = _parse_knobs(knobs)
    ToolAgentArewConfig.from_mapping(moved, where="selflock.tool_agent_yaml")  # a misspelt knob: name it first
    block = f"{TOOL_CONFIG_KEY}: {_flag_value(moved)}"
    flags = " ".join(shlex.quote(f"++{TOOL_CONFIG_KEY}.{key}={value}") for key, value in _dotted(moved))
    raise ValueError(
        "selflock.tool_agent_yaml no longer takes knobs (the file it wrote existed only on the node that "
        f"resolved the config). Put them in the top-level {TOOL_CONFIG_KEY} node, which every agent-loop worker "
        "receives, and drop agent_loop_config_path (the plugin registers tool_agent_arew by name): in a recipe "
        f"`{block}`; on the command line `{flags}`"
    )


def register_tool_resolvers() -> list[str]:
    """Register the resolvers with OmegaConf (idempotent)."""
    return register(
        {
            "selflock.calculator_data": calculator_data_dir,
            "selflock.calculator_tools": calculator_tools_path,
            "selflock.tool_agent_yaml": tool_agent_yaml,
        }
    )
