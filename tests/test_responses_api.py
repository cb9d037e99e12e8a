"""POST /v1/responses, driven by the official openai client (client.responses.create, plain and streamed), with
the raw JSON checked against the openai package's own pydantic types."""

from __future__ import annotations

import json
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from jisu import LLM
from jisu.server.app import create_app
from jisu.server.serve import ServerThread

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})  # a random tiny model: run to max_output_tokens
N = 6


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), num_kv_blocks=64, max_num_seqs=4)
    app = create_app(llm.engine, model_name="tiny")
    with ServerThread(app) as url:
        yield SimpleNamespace(url=url, engine=llm.engine)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@contextmanager
def every_token_ends(engine):
    """Every token is an end-of-sequence token for requests added meanwhile: a response then completes
    (finish "stop") at its first token, which a random model does not otherwise do when asked."""
    eos = engine.eos_token_ids
    engine.eos_token_ids = frozenset(range(engine.model_config.vocab_size))
    try:
        yield
    finally:
        engine.eos_token_ids = eos


def sse_events(text: str) -> list[dict]:
    """The Responses API's named events: `event: <type>` then `data: <json>`; checks the two agree."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        events.append(event)
    return events


def test_response_object_is_openais_and_answers_as_chat_does(client, server):
    r = client.responses.create(model="tiny", input="hello world", instructions="be brief", max_output_tokens=N,
                                **GREEDY)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "incomplete"
    [part] = item.content
    assert part.type == "output_text" and part.annotations == [] and part.text == r.output_text != ""
    assert r.usage.output_tokens == N and r.usage.total_tokens == r.usage.input_tokens + N
    assert r.instructions == "be brief" and r.max_output_tokens == N and r.temperature == 0
    # The same answer as chat with the instructions as a system message first: one path through the template.
    chat = client.chat.completions.create(model="tiny", max_tokens=N, **GREEDY, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    # Every field the openai types require is there, of its type (the client itself does not validate).
    raw = httpx.post(server.url + "/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 2})
    assert raw.status_code == 200
    Response.model_validate(raw.json())


def test_input_items_are_chat_messages(client):
    def text(input, **kw):
        return client.responses.create(model="tiny", input=input, max_output_tokens=N, **GREEDY, **kw).output_text

    expected = text("hello there")
    assert text([{"role": "user", "content": "hello there"}]) == expected
    assert text([{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "hello "}, {"type": "input_text", "text": "there"}]}]) == expected
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and then?"}]
    chat = client.chat.completions.create(model="tiny", messages=turns, max_tokens=N, **GREEDY)
    items = [turns[0], turns[1],
             {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
              "content": [{"type": "output_text", "text": "hello", "annotations": []}]},
             turns[3]]
    assert text(items) == chat.choices[0].message.content
    assert text(turns[1:], instructions="be brief") == chat.choices[0].message.content


def test_streamed_response_sends_the_api_events(client, server):
    plain = client.responses.create(model="tiny", input="stream me", max_output_tokens=N, **GREEDY)
    events = list(client.responses.create(model="tiny", input="stream me", max_output_tokens=N, stream=True,
                                          **GREEDY))
    types = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * len(deltas) + [
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert "".join(deltas) == events[-4].text == events[-3].part.text == plain.output_text
    final = events[-1].response
    assert final.id == events[0].response.id and final.output_text == plain.output_text
    assert final.status == "incomplete" and final.usage.output_tokens == N
    assert events[-2].item.id == final.output[0].id == events[2].item.id
    # The raw stream, event by event, against the openai types; no `data: [DONE]` as in chat.
    raw = httpx.post(server.url + "/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 3,
                                                         "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream") and "[DONE]" not in raw.text
    adapter = TypeAdapter(ResponseStreamEvent)
    for event in sse_events(raw.text):
        adapter.validate_python(event)


def test_a_response_that_ends_on_its_own_is_completed(client, server):
    with every_token_ends(server.engine):
        r = client.responses.create(model="tiny", input="hi", max_output_tokens=N, temperature=0)
        events = list(client.responses.create(model="tiny", input="hi", max_output_tokens=N, stream=True))
    assert r.status == "completed" and r.incomplete_details is None and r.completed_at is not None
    assert r.output[0].status == "completed" and r.usage.output_tokens == 1
    assert events[-1].type == "response.completed" and events[-1].response.status == "completed"
    assert events[-2].item.status == "completed"


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"previous_response_id": "resp_123", "store": True}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}, "text.format"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"metadata": {"a": 1}}, "metadata.a"),
])
def test_unsupported_or_bad_fields_are_400_naming_the_field(server, extra, param):
    body = {"model": "tiny", "input": "hi", "max_output_tokens": 2, **extra}
    r = httpx.post(server.url + "/v1/responses", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in err["message"]


def test_openapi_describes_the_request_body(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    body = spec["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert schema["required"] == ["input"] and "max_output_tokens" in schema["properties"]


def test_harmless_fields_are_accepted(client):
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=2, store=True, metadata={"k": "v"},
                                user="u1", tool_choice="auto", truncation="disabled", parallel_tool_calls=False,
                                text={"format": {"type": "text"}}, stream_options=None, top_p=0.9)
    assert r.usage.output_tokens >= 1 and r.metadata == {"k": "v"} and r.user == "u1"
