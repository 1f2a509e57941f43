"""Driver-side checks of runs that use the ``tool_agent_arew`` loop (before Ray starts).

:func:`validate_run_config` is what the plugin installs in veRL's ``validate_config`` and what our
trainer mode calls: :func:`~verl_selflock.verl_adapter.config_validation.validate_selflock_config` for
every run, except that a run whose rows are played by ``tool_agent_arew`` gets the tool agent's own input
checks instead of the ``active_reasoning`` ones (those require an environment spec,
``extra_info.env``, which tool rows do not have). Settings checks (``algorithm.arew``, trainer mode,
critic, diagnostics) are the same for both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from verl_selflock.tools.loop_config import TOOL_AGENT_NAME, TOOL_AGENT_TARGET, ToolAgentArewConfig
from verl_selflock.verl_adapter import config_validation
from verl_selflock.verl_adapter.config_validation import SelflockConfigError, validate_selflock_config

__all__ = ["check_tool_agent_inputs", "is_tool_agent_run", "validate_run_config"]

LOOP_KEY = "actor_rollout_ref.rollout.agent.agent_loop_config_path"
DEFAULT_LOOP_KEY = "actor_rollout_ref.rollout.agent.default_agent_loop"
MULTI_TURN = "actor_rollout_ref.rollout.multi_turn"


def _get(config: Any, dotted: str, default: Any = None) -> Any:
    node = config
    for key in dotted.split("."):
        node = node.get(key) if hasattr(node, "get") else None
        if node is None:
            return default
    return node


def is_tool_agent_run(config: Any) -> bool:
    """The run's rows default to ``tool_agent_arew`` (``rollout.agent.default_agent_loop``)."""
    return str(_get(config, DEFAULT_LOOP_KEY, "")) == TOOL_AGENT_NAME


def validate_run_config(config: Any) -> None:
    """Raise :class:`SelflockConfigError` if ``config`` asks for our components with settings or files that
    cannot work (see the module docstring)."""
    if not is_tool_agent_run(config):
        validate_selflock_config(config)
        return
    config_validation._check_settings(config)  # the settings half of validate_selflock_config
    check_tool_agent_inputs(config)


def _loop_entries(config: Any) -> list[Mapping[str, Any]]:
    from omegaconf import OmegaConf
    from verl.utils.import_utils import resolve_config_path

    path = _get(config, LOOP_KEY)
    if not path:
        return []
    try:
        entries = OmegaConf.to_container(OmegaConf.load(resolve_config_path(str(path))), resolve=True)
    except Exception as err:  # noqa: BLE001  (missing file, YAML or resolver error: the user's to fix)
        raise SelflockConfigError(f"{LOOP_KEY}={path}: not a readable agent-loop YAML ({err})") from None
    return [e for e in entries or [] if isinstance(e, Mapping)]


def check_tool_agent_inputs(config: Any) -> None:
    """The ``tool_agent_arew`` knobs of the agent-loop YAML, the tool config and the data files."""
    for entry in _loop_entries(config):
        if entry.get("name") == TOOL_AGENT_NAME or entry.get("_target_") == TOOL_AGENT_TARGET:
            try:
                ToolAgentArewConfig.from_mapping(entry)
            except (TypeError, ValueError) as err:
                raise SelflockConfigError(f"{LOOP_KEY}: {err}") from None
    tool_path = _get(config, f"{MULTI_TURN}.tool_config_path")
    function_path = _get(config, f"{MULTI_TURN}.function_tool_path")
    if str(_get(config, "algorithm.adv_estimator", "")) == "arew" and not (tool_path or function_path):
        raise SelflockConfigError(
            f"{DEFAULT_LOOP_KEY}={TOOL_AGENT_NAME} infers AREW's critiques from tool calls, and no tool is "
            f"configured: set {MULTI_TURN}.tool_config_path (or function_tool_path)"
        )
    if tool_path:
        from verl.utils.import_utils import resolve_config_path

        try:
            resolve_config_path(str(tool_path))  # where veRL's AgentLoopWorker looks for it
        except FileNotFoundError:
            raise SelflockConfigError(f"{MULTI_TURN}.tool_config_path: {tool_path} does not exist") from None
    train_files = _get(config, "data.train_files")
    for item in [train_files] if isinstance(train_files, str) else list(train_files or []):
        if "://" not in str(item) and not os.path.exists(os.path.expanduser(str(item))):
            raise SelflockConfigError(f"data.train_files: {item} does not exist (relative to {os.getcwd()})")
