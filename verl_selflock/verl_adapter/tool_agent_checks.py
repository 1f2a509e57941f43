"""Driver-side checks of runs that use the ``tool_agent_arew`` loop (before Ray starts).

Called by :func:`~verl_selflock.verl_adapter.config_validation.validate_selflock_config`, the one
validation entry point, when :func:`uses_tool_agent`: the loop's knobs (the ``selflock_tool_agent`` node,
already resolved and pinned there, and any ``tool_agent_arew`` entry of the agent-loop YAML) and the tool
config veRL's workers will open. The dataset files are checked with every other run's
(:mod:`verl_selflock.verl_adapter.data_checks`, which asks for an environment spec only on rows that
``active_reasoning`` plays). Errors are :class:`~verl_selflock.verl_adapter.data_checks.DataCheckError`,
re-raised by the caller as its own type.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from verl_selflock.tools.loop_config import TOOL_AGENT_NAME, TOOL_AGENT_TARGET, TOOL_CONFIG_KEY, ToolAgentArewConfig
from verl_selflock.verl_adapter.data_checks import (
    AGENT_LOOP_KEY,
    DEFAULT_LOOP_KEY,
    DataCheckError,
    _get,
    load_loop_yaml,
)

__all__ = ["check_tool_agent_run", "check_tool_knobs", "uses_tool_agent"]

MULTI_TURN = "actor_rollout_ref.rollout.multi_turn"


def uses_tool_agent(config: Any) -> bool:
    """The run's rows default to ``tool_agent_arew``, or the config sets its ``selflock_tool_agent`` node."""
    return str(_get(config, DEFAULT_LOOP_KEY, "")) == TOOL_AGENT_NAME or _get(config, TOOL_CONFIG_KEY) is not None


def check_tool_knobs(knobs: Mapping[str, Any], where: str) -> ToolAgentArewConfig:
    """The loop's knobs (names, with a close match for a typo, then values), as the worker will build them.

    Raises:
        DataCheckError: naming ``where`` (the config key or the YAML file) and the bad knob.
    """
    try:
        return ToolAgentArewConfig.from_mapping(knobs, where=where)
    except (TypeError, ValueError) as err:
        raise DataCheckError(str(err)) from None


def check_tool_agent_run(config: Any, node_knobs: Mapping[str, Any] | None) -> None:
    """Check a run that uses ``tool_agent_arew`` (see the module docstring).

    Args:
        config: the full veRL config, as ``main_ppo`` hands it to ``validate_config``.
        node_knobs: the resolved ``selflock_tool_agent`` node (checked by the caller), or None.

    Raises:
        DataCheckError: one line naming the config key, the file and what to change.
    """
    loop_path = str(_get(config, AGENT_LOOP_KEY, ""))
    entries = load_loop_yaml(loop_path, strict=True) if loop_path else []
    stops: list[str] = []  # where stop_after_tool_call=true comes from
    for entry in entries:
        if _declares_tool_agent(entry):  # its keys are knobs too (under the node's)
            where = f"{AGENT_LOOP_KEY}={loop_path}"
            stops += [where] if check_tool_knobs(entry, where).stop_after_tool_call else []
    node_stop = (node_knobs or {}).get("stop_after_tool_call")
    if node_stop is not None:  # the node wins over an entry, as in the worker
        stops = [TOOL_CONFIG_KEY] if node_stop else []
    if stops and str(_get(config, "actor_rollout_ref.rollout.name", "")) == "sglang":
        # veRL runs SGLang with skip_tokenizer_init: stop strings never match there (as for active_reasoning's
        # stop_on_closing_tag, data_checks), and SGLang rejects vLLM's include_stop_str_in_output.
        raise DataCheckError(
            f"{stops[0]}: stop_after_tool_call=true needs a rollout that matches stop strings (vLLM, our CPU 'hf'); "
            "actor_rollout_ref.rollout.name=sglang does not: set stop_after_tool_call=false"
        )
    _check_tool_config(config)


def _declares_tool_agent(entry: Any) -> bool:
    return isinstance(entry, Mapping) and (
        entry.get("name") == TOOL_AGENT_NAME or entry.get("_target_") == TOOL_AGENT_TARGET
    )


def _check_tool_config(config: Any) -> None:
    """AREW's critiques come from tool calls: an ``arew`` run needs a tool, and its tool config must exist
    where veRL's ``AgentLoopWorker`` looks for it (``resolve_config_path``)."""
    tool_path = _get(config, f"{MULTI_TURN}.tool_config_path")
    function_path = _get(config, f"{MULTI_TURN}.function_tool_path")
    if str(_get(config, "algorithm.adv_estimator", "")) == "arew" and not (tool_path or function_path):
        raise DataCheckError(
            f"{DEFAULT_LOOP_KEY}={TOOL_AGENT_NAME} infers AREW's critiques from tool calls, and no tool is "
            f"configured: set {MULTI_TURN}.tool_config_path (or function_tool_path)"
        )
    if tool_path:
        from verl.utils.import_utils import resolve_config_path

        try:
            found = os.path.isfile(resolve_config_path(str(tool_path)))
        except FileNotFoundError:
            found = False
        if not found:  # resolve_config_path returns an absolute path unchecked
            raise DataCheckError(
                f"{MULTI_TURN}.tool_config_path: {tool_path} does not exist (relative paths: the working directory "
                f"{os.getcwd()} or beside veRL's package); the calculator's is ${{selflock.calculator_tools:}}"
            )
