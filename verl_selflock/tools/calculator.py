"""The calculator of the tool-agent example: safe arithmetic on a string, and the task's reward.

``evaluate("347 * 29") == "10063"``. Only numbers, ``+ - * / // %``, ``**`` with a small exponent,
unary signs and parentheses are accepted (an AST walk, never ``eval``). Errors raise
:class:`CalculatorError` with a message that does not echo the expression, so a tool output can never
carry an ``<answer>`` tag the model wrote into its call.

:data:`TOOL_CONFIG_PATH` is the veRL tool config of the calculator, shipped beside this file.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TOOL_CONFIG_PATH", "CalculatorError", "compute_score", "evaluate", "final_answer"]

TOOL_CONFIG_PATH = str(Path(__file__).with_name("calculator_tools.yaml"))
"""The calculator's veRL tool config (``rollout.multi_turn.tool_config_path``) inside the installed package:
present on every node, unlike a file written under one node's cache (``${selflock.calculator_tools:}``)."""

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 10
MAX_MAGNITUDE = 1e15

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """The expression is not plain arithmetic, or its value cannot be computed."""


def evaluate(expression: str) -> str:
    """The value of an arithmetic expression as text (an integer when the value is whole, else 6
    significant decimals)."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("empty expression")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip().replace("^", "**").replace("×", "*"), mode="eval")
    except SyntaxError:
        raise CalculatorError("not an arithmetic expression") from None
    value = _value(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent larger than {MAX_EXPONENT}")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        if isinstance(result, complex) or not math.isfinite(result) or abs(result) > MAX_MAGNITUDE:
            raise CalculatorError("result out of range")
        return result
    raise CalculatorError("only numbers, + - * / // % ** and parentheses are allowed")


_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def final_answer(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` in ``text``, or None."""
    found = _ANSWER.findall(text or "")
    return found[-1] if found else None


def compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict[str, Any] | None = None, **kwargs: Any
) -> float:
    """veRL ``custom_reward_function``: 1.0 when the last ``<answer>`` equals the true value, else 0.0.

    ``solution_str`` is the decoded response, tool outputs included; the calculator never writes an
    ``<answer>`` tag, so only the model's own answer can score."""
    answer = final_answer(solution_str)
    if answer is None:
        return 0.0
    try:
        return float(abs(float(answer.replace(",", "")) - float(ground_truth)) < 1e-6)
    except ValueError:
        return 0.0
