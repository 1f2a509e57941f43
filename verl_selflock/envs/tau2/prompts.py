"""Prompt text of the tau2 telecom task: the agent's system prompt and turn format, and the user model's prompt.

The agent's prompt is ours (role, turn format) around tau2's telecom policy and the agent tools'
JSON schemas; the user model's prompt is tau2's ``simulation_guidelines_tools.md`` with the task's
user scenario and a compact line per user tool. Shared by the environment (the turn format in its
observations, the user model's messages) and the data builder (the first messages of every row).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from verl_selflock.envs.tau2.assets import new_environment, telecom_agent_tools, telecom_policy

__all__ = ["OPENING_USER_MESSAGE", "agent_turn_format", "tau2_messages", "tau2_system_prompt", "user_system_prompt"]

OPENING_USER_MESSAGE = "A customer has just been connected to you. Open the conversation."


# --- the user model -----------------------------------------------------------------------------


def _type_hint(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> str:
    """A short type for a JSON-schema property: its type, or the enum values of a referenced definition."""
    for option in [prop, *prop.get("anyOf", [])]:
        ref = option.get("$ref", "")
        target = defs.get(ref.rsplit("/", 1)[-1], {}) if ref else option
        if "enum" in target:
            return "one of " + "|".join(map(str, target["enum"]))
    return str(prop.get("type") or next((o.get("type") for o in prop.get("anyOf", []) if "type" in o), "any"))


@functools.lru_cache(maxsize=1)
def _user_tools_description() -> str:
    """One line per user tool, ``name(arg: type, ...): description`` (compact: a small user model's
    context is short, and 30 full JSON schemas cost ~2,400 tokens)."""
    lines = []
    for tool in new_environment().get_user_tools():
        function = tool.openai_schema["function"]
        parameters = function.get("parameters", {})
        defs = parameters.get("$defs", {})
        properties = parameters.get("properties", {})
        arguments = ", ".join(f"{name}: {_type_hint(prop, defs)}" for name, prop in properties.items())
        description = " ".join(str(function.get("description", "")).split())
        lines.append(f"- {function['name']}({arguments}): {description}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def _user_guidelines() -> str:
    from tau2.utils import DATA_DIR

    return (DATA_DIR / "tau2" / "user_simulator" / "simulation_guidelines_tools.md").read_text()


def user_system_prompt(task: Any) -> str:
    """The user model's system prompt: tau2's guidelines (tool version), the scenario, the tools."""
    return (
        f"{_user_guidelines().strip()}\n\n<scenario>\n{task.user_scenario}\n</scenario>\n\n"
        "## Your tools\nTo make a tool call, reply with only\n"
        '<tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>\n'
        "and nothing else; its result comes back to you inside <tool_result>...</tool_result>. "
        "Otherwise reply with your message to the agent as plain text.\n"
        f"Tools:\n{_user_tools_description()}"
    )


# --- the agent ----------------------------------------------------------------------------------


def agent_turn_format() -> str:
    """The turn format the agent is asked to follow (shared with the prompt builder)."""
    return (
        "Each of your turns: first think briefly inside <think>...</think>, then do exactly one of:\n"
        "- send a message to the user: <message>your message</message>\n"
        '- call one tool: <tool_call>{"name": "<tool name>", "arguments": {<JSON arguments>}}</tool_call>\n'
        "Never both in one turn. Tool results come back inside <tool_response>...</tool_response>; "
        "the user's messages come back as plain text. The user cannot see tool results."
    )


def tau2_system_prompt() -> str:
    """The agent's system message: role, turn format, tau2's telecom policy, the tool schemas."""
    tools = "\n".join(json.dumps(schema["function"], separators=(",", ":")) for schema in telecom_agent_tools())
    return (
        "<instructions>\nYou are a telecom customer service agent. Help the user according to the policy "
        "below, using your tools to look up and change the customer's account, and guiding the user "
        "through the steps they must perform on their own phone.\n"
        f"{agent_turn_format()}\nTool arguments must be valid JSON.\n</instructions>\n"
        f"<tools>\n{tools}\n</tools>\n<policy>\n{telecom_policy()}\n</policy>"
    )


def tau2_messages() -> list[dict[str, str]]:
    """The prompt of every row (the task only differs in the environment: the user and the database)."""
    return [{"role": "system", "content": tau2_system_prompt()}, {"role": "user", "content": OPENING_USER_MESSAGE}]
