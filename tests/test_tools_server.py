"""Tool calling through `jisu serve` on the default model, driven by the official openai client.

Required and named calls are grammar-constrained, so the 135M model makes valid calls, deterministically at
temperature 0; auto may answer either way, so only the shape is checked here (the parsers are tested on
canned outputs in test_tools.py)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from jisu.server.app import create_app
from jisu.server.protocol import ChatCompletionRequest
from jisu.server.serve import ServerThread

pytestmark = pytest.mark.real_model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
OPTS = dict(model="smollm2", temperature=0, max_tokens=48)


@pytest.fixture(scope="module")
def server(real_llm):
    with ServerThread(create_app(real_llm.engine, model_name="smollm2")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def streamed(stream) -> tuple[str, list[dict], str]:
    """A stream's content, its calls rebuilt from delta.tool_calls, and its finish reason."""
    content, calls, finish = "", [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            if tc.index == len(calls):
                assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                calls.append({"name": tc.function.name, "arguments": ""})
            else:
                assert tc.id is None and tc.function.name is None
            calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, calls, finish


def check_call(call, tools=TOOLS) -> dict:
    """A call names one of the tools and its arguments are a JSON object with that tool's required keys."""
    tool = next(t["function"] for t in tools if t["function"]["name"] == call["name"])
    args = json.loads(call["arguments"])
    assert isinstance(args, dict) and set(tool["parameters"]["required"]) <= set(args)
    return args


def as_dicts(tool_calls) -> list[dict]:
    return [{"name": c.function.name, "arguments": c.function.arguments} for c in tool_calls]


@pytest.mark.parametrize("choice,parallel", [("required", True), ("required", False), (NAMED, None)])
def test_constrained_calls_streamed_and_not(client, choice, parallel):
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    r = client.chat.completions.create(messages=ASK, tools=TOOLS, tool_choice=choice, **extra, **OPTS)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    calls = as_dicts(c.message.tool_calls)
    assert calls and all(tc.id.startswith("call_") and tc.type == "function" for tc in c.message.tool_calls)
    for call in calls:
        check_call(call)
    if choice is NAMED:
        assert [x["name"] for x in calls] == ["get_weather"]
        assert json.loads(calls[0]["arguments"])["city"] == "Paris"
    if parallel is False:
        assert len(calls) == 1
    content, streamed_calls, finish = streamed(client.chat.completions.create(
        messages=ASK, tools=TOOLS, tool_choice=choice, stream=True, **extra, **OPTS))
    assert (content, streamed_calls, finish) == ("", calls, "tool_calls")


def test_round_trip_call_result_answer(client):
    first = client.chat.completions.create(messages=ASK, tools=TOOLS, tool_choice=NAMED, **OPTS).choices[0].message
    call = first.tool_calls[0]
    # Sent back as clients do: content null, the calls as they came.
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 22, "sky": "sunny"})}]
    r = client.chat.completions.create(messages=messages, tools=TOOLS, **OPTS)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls")
    assert c.message.content or c.message.tool_calls
    # Without tools in the request, the history with calls and results still renders.
    r = client.chat.completions.create(messages=messages, **OPTS)
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None
    content, calls, finish = streamed(client.chat.completions.create(messages=messages, stream=True, **OPTS))
    assert content == r.choices[0].message.content and calls == [] and finish == r.choices[0].finish_reason
    # The result reached the prompt.
    assert r.usage.prompt_tokens > client.chat.completions.create(messages=ASK, **OPTS).usage.prompt_tokens


def test_tool_choice_none_is_plain_text_without_tools_in_the_prompt(client):
    r = client.chat.completions.create(messages=ASK, tools=TOOLS, tool_choice="none", **OPTS)
    plain = client.chat.completions.create(messages=ASK, **OPTS)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    with_tools = client.chat.completions.create(messages=ASK, tools=TOOLS, tool_choice="required", **OPTS)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools are in that prompt


def test_auto_answers_with_text_or_calls(client):
    r = client.chat.completions.create(messages=ASK, tools=TOOLS, tool_choice="auto", **OPTS)
    c = r.choices[0]
    content, calls, finish = streamed(client.chat.completions.create(
        messages=ASK, tools=TOOLS, stream=True, **OPTS))  # auto is the default with tools
    if c.message.tool_calls:
        assert c.finish_reason == "tool_calls" and calls == as_dicts(c.message.tool_calls)
        for call in calls:
            check_call(call)
    else:
        assert c.message.content and finish == c.finish_reason
        assert content == c.message.content and calls == []


def test_hermes_template_tools_and_calls(real_llm, client):
    """The same model under a Qwen-style template: tools go in through the template, calls are read back from
    its <tool_call> form (constrained here, so the items carry "arguments")."""
    from test_tools import QWEN_TEMPLATE

    from jisu.chat_template import ChatTemplate

    tok = real_llm.engine.tokenizer
    own = tok._template
    tok._template = ChatTemplate(QWEN_TEMPLATE)
    try:
        r = client.chat.completions.create(messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, **OPTS)
        (call,) = as_dicts(r.choices[0].message.tool_calls)
        check_call(call)
        history = [*ASK, {"role": "assistant", "content": None,
                          "tool_calls": [r.choices[0].message.tool_calls[0].model_dump()]},
                   {"role": "tool", "tool_call_id": r.choices[0].message.tool_calls[0].id, "content": "22 C"}]
        text = tok.apply_chat_template(ChatCompletionRequest(messages=history).message_dicts(), tools=TOOLS)
        assert "<tools>" in text and "<tool_response>\n22 C\n</tool_response>" in text
        arguments = json.dumps(json.loads(call["arguments"]))  # as the template's tojson writes them
        assert f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {arguments}}}' in text
        assert client.chat.completions.create(messages=history, tools=TOOLS, **OPTS).choices[0].finish_reason
    finally:
        tok._template = own


BAD = [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "maybe"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": {"id": "x"}}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f", "arguments": {"a": 1}}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [*ASK, {"role": "tool", "content": "22 C"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_tool_requests_are_400_naming_the_field(server, body, param):
    r = httpx.post(server + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in err["message"]


def test_assistant_content_null_is_accepted(client):
    messages = [*ASK, {"role": "assistant", "content": None}, {"role": "user", "content": "Hello?"}]
    assert client.chat.completions.create(messages=messages, max_tokens=2, model="smollm2").choices[0].message
