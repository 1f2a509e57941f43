"""Tool-using agents under AREW, without veRL: critique rules inferred from tool calls, the
``tool_agent_arew`` loop's knobs, and the calculator task's arithmetic (the veRL tool wrapper lives in
:mod:`verl_selflock.verl_adapter.calculator_tool`)."""
