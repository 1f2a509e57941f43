"""The calculator of the tool-agent example as a veRL tool (``BaseTool``): a tool config YAML names it as
``class_name: verl_selflock.verl_adapter.calculator_tool.CalculatorTool`` (written by the data builder,
``verl_selflock/tools/calculator_tools.yaml``). The arithmetic is :mod:`verl_selflock.tools.calculator`."""

from __future__ import annotations

from typing import Any

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import ToolResponse

from verl_selflock.tools.calculator import CalculatorError, evaluate

__all__ = ["CalculatorTool"]


class CalculatorTool(BaseTool):
    """Stateless: ``{"expression": "347 * 29"}`` -> ``"10063"``; a bad call gets a text starting ``Error:``
    (what the ``tool_agent_arew`` critic's default ``error_patterns`` recognise). Step reward 0."""

    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs: Any) -> tuple[ToolResponse, float, dict]:
        expression = parameters.get("expression") if isinstance(parameters, dict) else None
        if not isinstance(expression, str):
            return ToolResponse(text='Error: call the calculator with {"expression": "<arithmetic>"}'), 0.0, {}
        try:
            return ToolResponse(text=evaluate(expression)), 0.0, {}
        except CalculatorError as err:
            return ToolResponse(text=f"Error: {err}"), 0.0, {}
