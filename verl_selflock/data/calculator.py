"""The calculator task of the tool-agent example: arithmetic a small model cannot do in its head.

Each row asks for one product or sum of 3- and 2-digit numbers (``What is 347 * 29?``) and is played by
the ``tool_agent_arew`` loop (veRL's ``ToolAgentLoop`` + critiques) with one tool, ``calculator``
(:class:`verl_selflock.verl_adapter.calculator_tool.CalculatorTool`). The prompt describes the tool-call
format (hermes: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``) and shows two solved
examples, because small chat templates (SmolLM2's) do not render tool schemas. Reward
(:func:`verl_selflock.tools.calculator.compute_score`): 1 when the last ``<answer>`` is the true value.

:func:`build_calculator_dataset` writes ``train.parquet`` and ``test.parquet`` into one folder (seeded,
deterministic); the tool config for ``rollout.multi_turn.tool_config_path`` ships in the package
(``verl_selflock/tools/calculator_tools.yaml``, ``${selflock.calculator_tools:}``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from verl_selflock.data.parquet import check_count, split_rows, write_splits
from verl_selflock.tools.loop_config import TOOL_AGENT_NAME

__all__ = ["DATA_SOURCE", "build_calculator_dataset", "calculator_messages"]

DATA_SOURCE = "selflock_calculator"

_CALL = '<tool_call>{{"name": "calculator", "arguments": {{"expression": "{}"}}}}</tool_call>'
SYSTEM = (
    "You have a calculator tool. To use it, reply with only:\n"
    + _CALL.format("12 * 34")
    + "\nAfter the result, reply with <answer>NUMBER</answer>."
)
# Two solved examples: a 135M model imitates the call format from them far more often than from the
# instruction alone (measured on SmolLM2-135M-Instruct at temperature 1.0).
EXAMPLES = (("58 * 71", "4118"), ("903 + 488", "1391"))



def _question(expression: str) -> str:
    return f"Use the calculator: what is {expression}?"


def calculator_messages(expression: str) -> list[dict[str, str]]:
    """The prompt of one row: the system instruction, the solved examples, the question."""
    messages = [{"role": "system", "content": SYSTEM}]
    for example, value in EXAMPLES:
        messages += [
            {"role": "user", "content": _question(example)},
            {"role": "assistant", "content": _CALL.format(example)},
            {"role": "tool", "content": value},
            {"role": "assistant", "content": f"<answer>{value}</answer>"},
        ]
    messages.append({"role": "user", "content": _question(expression)})
    return messages


def _draw(rng: np.random.Generator) -> tuple[str, int]:
    a, b = int(rng.integers(100, 1000)), int(rng.integers(11, 100))
    if rng.random() < 0.5:
        return f"{a} * {b}", a * b
    c = int(rng.integers(100, 1000))
    return f"{a} + {c} + {b}", a + b + c


def build_calculator_rows(n_train: int, n_test: int, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """``{"train": rows, "test": rows}``, no question repeated across splits."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()

    def make_row(split: str, index: int) -> dict[str, Any]:
        expression, value = _draw(rng)
        while expression in seen:
            expression, value = _draw(rng)
        seen.add(expression)
        return {
            "data_source": DATA_SOURCE,
            "prompt": calculator_messages(expression),
            "ability": "tool_use",
            "agent_name": TOOL_AGENT_NAME,
            "reward_model": {"style": "rule", "ground_truth": str(value)},
            "extra_info": {"index": index, "split": split, "expression": expression},
        }

    counts = {"train": check_count(n_train, "--train"), "test": check_count(n_test, "--test")}
    return split_rows(counts, make_row, "building calculator rows", progress=False)


def build_calculator_dataset(n_train: int, n_test: int, seed: int, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``train.parquet`` and ``test.parquet`` into ``out_dir``; returns their paths. The tool config
    ships in the package (:data:`verl_selflock.tools.calculator.TOOL_CONFIG_PATH`), present on every node."""
    return write_splits(build_calculator_rows(n_train, n_test, seed), out_dir)
