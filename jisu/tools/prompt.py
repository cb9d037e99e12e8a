"""Tools and tool messages for chat templates that do not handle them, in a generic form.

A template that never mentions `tools` gets the tools described in its system message, with how to call
one: a JSON object {"name": ..., "arguments": {...}} (jisu.tools.parsers' generic JSON form). A template
that never mentions `tool_calls` gets an assistant turn's calls written as that JSON in its content, and
tool results as a user turn (consecutive results in one), so templates that allow only user and assistant
turns render them too. Content null becomes "".
"""

from __future__ import annotations

import json
from typing import Any

_INSTRUCTIONS = (
    "You can call functions. To call one, answer with only a JSON object of the form "
    '{"name": <function name>, "arguments": <object of argument values>}'
    "{several}. Otherwise answer the user directly. The functions, as JSON:"
)
_SEVERAL = "; to call several at once, answer with a JSON list of such objects"


def _dumps(value: Any) -> str:
    # ensure_ascii=False: the tokenizer's marker characters (private use) must reach the prompt as they are.
    return json.dumps(value, ensure_ascii=False)


def tools_text(tools: list[dict], parallel: bool = True) -> str:
    """The generic description of the tools for a system message."""
    lines = [_INSTRUCTIONS.replace("{several}", _SEVERAL if parallel else "")]
    for t in tools:
        f = t.get("function", t)
        lines.append(_dumps({k: f[k] for k in ("name", "description", "parameters") if f.get(k) is not None}))
    return "\n".join(lines)


def _call_text(call: dict) -> dict:
    f = call.get("function") or {}
    return {"name": f.get("name"), "arguments": f.get("arguments")}


def generic_messages(messages: list[dict]) -> list[dict]:
    """Messages with tool calls and tool results written as text, for a template that knows neither."""
    out: list[dict] = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        calls = m.pop("tool_calls", None)
        if calls:
            written = [_call_text(c) for c in calls]
            text = _dumps(written[0] if len(written) == 1 else written)
            m["content"] = f"{m['content']}\n{text}" if m["content"] else text
        if m.get("role") == "tool":
            about = m.pop("name", None) or m.get("tool_call_id")
            result = f"Result of the function call{f' {about}' if about else ''}:\n{m['content']}"
            if out and out[-1].get("_jisu_tool_results"):
                out[-1]["content"] += "\n\n" + result
                continue
            m = {"role": "user", "content": result, "_jisu_tool_results": True}
        out.append(m)
    for m in out:
        m.pop("_jisu_tool_results", None)
    return out


def with_tools_in_system(messages: list[dict], tools: list[dict], parallel: bool = True) -> list[dict]:
    """Messages whose system message (a new first one if there is none) describes the tools."""
    text = tools_text(tools, parallel)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content') or ''}\n\n{text}".lstrip("\n")
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def prepare(template: str, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
    """The messages and tools to render with this template: passed through where the template handles them,
    written generically where it does not."""
    if "tool_calls" not in template:
        messages = generic_messages(messages)
    if tools and "tools" not in template:
        return with_tools_in_system(messages, tools), None
    return messages, tools
