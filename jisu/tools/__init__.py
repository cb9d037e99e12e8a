"""OpenAI tool calling: checking tools and tool_choice, putting tools into the prompt, and reading calls back.

definitions: the request's tools and tool_choice, checked, and the JSON schema that constrains a required or
named call. prompt: tools and tool messages for chat templates that do not handle them. parsers: the calls in
a model's output (Hermes/Qwen <tool_call> blocks, Llama 3 JSON, generic JSON), whole or while it streams.
"""

from jisu.tools.definitions import Tool, ToolChoice, ToolError, ToolPlan, parse_tool_choice, parse_tools, plan_tools
from jisu.tools.parsers import ExtractedCalls, ToolCall, ToolStream, parser_for_template

__all__ = [
    "ExtractedCalls",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolError",
    "ToolPlan",
    "ToolStream",
    "parse_tool_choice",
    "parse_tools",
    "parser_for_template",
    "plan_tools",
]
