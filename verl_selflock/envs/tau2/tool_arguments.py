"""Tool-call arguments checked against the tool's own JSON schema before tau2 runs the call.

tau2's tools are plain Python functions: they do not check argument types, so a call with valid ids
and a wrong-typed value (``"reason": 123``, ``"gb_amount": true``, ``"gb_amount": "5"``) can run and
write that value into the database, earning a +1 ``write_state_change`` for a malformed call (the
same failure as ``NaN`` in the arguments). A call whose arguments do not fit the tool's schema
(unknown parameter, missing required one, wrong JSON type) is refused here with a tool error and
never reaches tau2's environment, so it is not in the transcript that tau2's evaluator replays.
Unknown tool names are left to tau2, which answers them with its own error.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from verl_selflock.envs.tau2.assets import new_environment

__all__ = ["argument_error"]

# JSON-schema type -> the Python types json.loads produces for it (bool is not a number in JSON).
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


@functools.lru_cache(maxsize=2)
def _schemas(requestor: str) -> dict[str, Mapping[str, Any]]:
    """Parameters schema of each tool the requestor (``assistant`` or ``user``) may call."""
    environment = new_environment()
    tools = environment.get_tools() if requestor == "assistant" else environment.get_user_tools()
    return {tool.name: tool.openai_schema["function"]["parameters"] for tool in tools}


def _fits(value: Any, schema: Mapping[str, Any], defs: Mapping[str, Any]) -> bool:
    if "$ref" in schema:
        schema = defs.get(str(schema["$ref"]).rsplit("/", 1)[-1], {})
    if "anyOf" in schema:
        return any(_fits(value, option, defs) for option in schema["anyOf"])
    if "enum" in schema and value not in schema["enum"]:
        return False
    expected = schema.get("type")
    if expected is None:
        return True  # an untyped parameter takes anything
    types = _JSON_TYPES.get(str(expected), ())
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def argument_error(name: str, arguments: Mapping[str, Any], requestor: str) -> str | None:
    """Why ``arguments`` do not fit tool ``name``'s schema, or None (also None for an unknown tool)."""
    schema = _schemas(requestor).get(name)
    if schema is None:
        return None
    properties: Mapping[str, Any] = schema.get("properties", {})
    defs: Mapping[str, Any] = schema.get("$defs", {})
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        return f"{name} has no parameter {unknown[0][:40]!r}"
    missing = [key for key in schema.get("required", []) if key not in arguments]
    if missing:
        return f"{name} needs the parameter {missing[0]!r}"
    for key, value in arguments.items():
        if not _fits(value, properties[key], defs):
            return f"{name}: parameter {key!r} has the wrong type or value ({type(value).__name__})"
    return None
