"""The request's tools and tool_choice, checked, and what they make of a chat request.

OpenAI's shapes: tools = [{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}],
tool_choice = "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}. A required or
named call is constrained by a JSON schema as vLLM does it: a named call's output is its function's arguments
object; a required call's output is a JSON array of {"name": const, <args key>: parameters} items (one item
unless parallel_tool_calls).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jisu.errors import InvalidRequestError
from jisu.structured import StructuredOutputsParams, strict_schema

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class ToolError(InvalidRequestError):
    """A bad tools / tool_choice / tool message; `param` is the request field it is about."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict
    definition: dict
    """The tool as the client sent it ({"type": "function", "function": {...}}), for the chat template."""


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # none | auto | required | named
    name: str | None = None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_tools(value: Any) -> list[Tool]:
    """The request's `tools`, checked; [] for none."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ToolError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}} objects, "
                        f"got {_type_name(value)}", "tools")
    if len(value) > MAX_TOOLS:
        raise ToolError(f"tools: {len(value)} tools given; at most {MAX_TOOLS}", "tools")
    tools, seen = [], set()
    for i, t in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise ToolError(f"{where} must be an object {{'type': 'function', 'function': {{...}}}}, "
                            f"got {_type_name(t)}", where)
        if t.get("type", "function") != "function":
            raise ToolError(f"{where}.type: only 'function' tools are supported, got {t.get('type')!r}",
                            f"{where}.type")
        f = t.get("function")
        if not isinstance(f, dict):
            raise ToolError(f"{where}.function must be an object with a 'name', got {_type_name(f)}",
                            f"{where}.function")
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"{where}.function.name must be 1 to 64 letters, digits, '_', '-' or '.', "
                            f"got {name!r}", f"{where}.function.name")
        if name in seen:
            raise ToolError(f"{where}.function.name: {name!r} names two tools; names must be unique",
                            f"{where}.function.name")
        seen.add(name)
        description = f.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolError(f"{where}.function.description must be a string, got {_type_name(description)}",
                            f"{where}.function.description")
        parameters = f.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        elif not isinstance(parameters, dict):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object, got "
                            f"{_type_name(parameters)}", f"{where}.function.parameters")
        strict = f.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ToolError(f"{where}.function.strict must be true or false, got {strict!r}",
                            f"{where}.function.strict")
        definition = {"type": "function", "function": {k: v for k, v in f.items() if v is not None}}
        tools.append(Tool(name, description, parameters, definition))
    return tools


def parse_tool_choice(value: Any, tools: list[Tool]) -> ToolChoice:
    """The request's `tool_choice` against its tools (default: auto with tools, none without)."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise ToolError(f"tool_choice must be 'none', 'auto', 'required' or "
                            f"{{'type': 'function', 'function': {{'name': ...}}}}, got {value!r}", "tool_choice")
        if value == "required" and not tools:
            raise ToolError("tool_choice is 'required' but the request has no tools", "tool_choice")
        return ToolChoice(value if tools else "none")
    if not isinstance(value, dict):
        raise ToolError(f"tool_choice must be a string or an object, got {_type_name(value)}", "tool_choice")
    if value.get("type", "function") != "function":
        raise ToolError(f"tool_choice.type must be 'function', got {value.get('type')!r}", "tool_choice.type")
    f = value.get("function")
    name = f.get("name") if isinstance(f, dict) else None
    if not isinstance(name, str):
        raise ToolError("tool_choice.function.name must name one of the request's tools", "tool_choice.function.name")
    if name not in {t.name for t in tools}:
        known = ", ".join(repr(t.name) for t in tools) or "none"
        raise ToolError(f"tool_choice.function.name: {name!r} is not among the request's tools ({known})",
                        "tool_choice.function.name")
    return ToolChoice("named", name)


def _object_schema(parameters: dict) -> dict:
    # A schema without a type would let the arguments be any JSON value; a call's arguments are an object.
    return strict_schema(parameters if "type" in parameters else {"type": "object", **parameters})


def constraint_schema(tools: list[Tool], choice: ToolChoice, parallel: bool, args_key: str) -> dict | None:
    """The JSON schema a required or named call's output must match; None for none and auto."""
    if choice.mode == "named":
        tool = next(t for t in tools if t.name == choice.name)
        return _object_schema(tool.parameters)
    if choice.mode != "required":
        return None
    items = [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [t.name]}, args_key: _object_schema(t.parameters)},
        "required": ["name", args_key],
        "additionalProperties": False,
    } for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


@dataclass
class ToolPlan:
    """What a chat request's tools make of it: the tools the template sees, the output constraint, the parser."""

    tools: list[Tool]
    choice: ToolChoice
    parallel: bool
    parser: Any  # jisu.tools.parsers.ToolParser; None when nothing is parsed (tool_choice none)
    structured: StructuredOutputsParams | None

    @property
    def template_tools(self) -> list[dict] | None:
        """The tools as the chat template gets them; None with tool_choice none (as vLLM, no tools in the prompt)."""
        if self.choice.mode == "none" or not self.tools:
            return None
        return [t.definition for t in self.tools]


def plan_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any, template_source: str | None) -> ToolPlan:
    """Checks the request's tool fields and decides how the template gets them and how calls are read back."""
    from jisu.tools.parsers import NamedCallParser, parser_for_template

    if parallel_tool_calls is None:
        parallel_tool_calls = True
    if not isinstance(parallel_tool_calls, bool):
        raise ToolError(f"parallel_tool_calls must be true or false, got {parallel_tool_calls!r}",
                        "parallel_tool_calls")
    checked = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, checked)
    names = [t.name for t in checked]
    parser, structured = None, None
    if choice.mode == "named":
        parser = NamedCallParser(choice.name)
    elif choice.mode in ("auto", "required"):
        parser = parser_for_template(template_source, names, parallel_tool_calls)
        if choice.mode == "required":
            parser = parser.constrained()
    schema = constraint_schema(checked, choice, parallel_tool_calls, getattr(parser, "args_key", "arguments"))
    if schema is not None:
        structured = StructuredOutputsParams(json=schema)
    return ToolPlan(checked, choice, parallel_tool_calls, parser, structured)


def template_tool_calls(value: Any, where: str) -> list[dict]:
    """An assistant message's tool_calls, checked, in the shape transformers gives chat templates: each call's
    arguments parsed to an object where they are valid JSON (HF templates write them with tojson)."""
    import json

    if not isinstance(value, list):
        raise ToolError(f"{where}.tool_calls must be a list of {{'id', 'type': 'function', 'function': "
                        f"{{'name', 'arguments'}}}} objects, got {_type_name(value)}", f"{where}.tool_calls")
    calls = []
    for j, c in enumerate(value):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(c, dict):
            raise ToolError(f"{at} must be an object {{'id', 'type': 'function', 'function': {{...}}}}, "
                            f"got {_type_name(c)}", at)
        if c.get("type", "function") != "function":
            raise ToolError(f"{at}.type: only 'function' calls are supported, got {c.get('type')!r}", f"{at}.type")
        call_id = c.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ToolError(f"{at}.id must be a string, got {_type_name(call_id)}", f"{at}.id")
        f = c.get("function")
        if not isinstance(f, dict):
            raise ToolError(f"{at}.function must be an object with 'name' and 'arguments', got {_type_name(f)}",
                            f"{at}.function")
        if not isinstance(f.get("name"), str) or not f["name"]:
            raise ToolError(f"{at}.function.name must be a non-empty string, got {f.get('name')!r}",
                            f"{at}.function.name")
        arguments = f.get("arguments")
        if not isinstance(arguments, str):
            raise ToolError(f"{at}.function.arguments must be a string holding JSON, got {_type_name(arguments)}",
                            f"{at}.function.arguments")
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        call = {"type": "function", "function": {"name": f["name"],
                                                   "arguments": parsed if isinstance(parsed, dict) else arguments}}
        if call_id is not None:
            call["id"] = call_id
        calls.append(call)
    return calls
