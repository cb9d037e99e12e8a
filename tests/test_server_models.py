"""GET /v1/models/{id}, 404 model_not_found for a model the server does not serve (on every route), and
400 context_length_exceeded for prompts that do not fit, as the official openai client sees them."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import openai
import pytest

from starlette.testclient import TestClient

from jisu import LLM
from jisu.server.app import create_app
from jisu.server.serve import ServerThread

CONTEXT = 256  # the tiny model's max_position_embeddings
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), num_kv_blocks=64, max_num_seqs=4)
    assert llm.engine.max_model_len == CONTEXT
    app = create_app(llm.engine, model_name="tiny")
    with ServerThread(app) as url:
        yield SimpleNamespace(url=url, model_dir=tiny_llama_dir, engine=llm.engine)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_retrieve_model_is_the_listed_model_under_each_name_it_answers_to(client, server):
    listed = client.models.list().data
    assert len(listed) == 1
    # The name it serves, and the path it was started with (slashes and all), as check_model accepts them.
    for name in ("tiny", str(server.model_dir)):
        model = client.models.retrieve(name)
        assert model.model_dump() == listed[0].model_dump()
        assert model.id == "tiny" and model.object == "model" and model.max_model_len == CONTEXT
    r = httpx.get(f"{server.url}/v1/models/{server.model_dir}")  # unquoted slashes as well
    assert r.status_code == 200 and r.json()["id"] == "tiny"


def test_retrieve_model_needs_the_api_key(server):
    # No lifespan, so no engine thread: the key is checked before anything would reach the engine.
    c = TestClient(create_app(server.engine, model_name="tiny", api_key="sekret"), base_url="http://127.0.0.1")
    assert c.get("/v1/models/tiny").status_code == 401
    assert c.get("/v1/models/nope").status_code == 401  # whether a model exists is not told without the key
    assert c.post("/v1/responses", json={"input": "hi"}).status_code == 401
    r = c.get("/v1/models/tiny", headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 200 and r.json()["id"] == "tiny"


def _assert_model_not_found(body: dict, model: str) -> None:
    assert body["type"] == "invalid_request_error" and body["code"] == "model_not_found"
    assert body["param"] == "model" and repr(model) in body["message"]


@pytest.mark.parametrize("call", [
    lambda c, m: c.models.retrieve(m),
    lambda c, m: c.completions.create(model=m, prompt="hi", max_tokens=1),
    lambda c, m: c.chat.completions.create(model=m, messages=MESSAGES, max_tokens=1),
    lambda c, m: c.chat.completions.create(model=m, messages=MESSAGES, max_tokens=1, stream=True),
    lambda c, m: c.responses.create(model=m, input="hi", max_output_tokens=1),
    lambda c, m: c.responses.create(model=m, input="hi", max_output_tokens=1, stream=True),
], ids=["retrieve", "completions", "chat", "chat-stream", "responses", "responses-stream"])
def test_unknown_model_is_404_model_not_found(client, call):
    with pytest.raises(openai.NotFoundError) as e:
        call(client, "gpt-4o")
    assert e.value.status_code == 404
    _assert_model_not_found(e.value.body, "gpt-4o")


@pytest.mark.parametrize("path,body", [
    ("/v1/models/org/other-model", None),
    ("/tokenize", {"model": "nope", "prompt": "hi"}),
    ("/detokenize", {"model": "nope", "tokens": [1]}),
])
def test_unknown_model_is_404_on_the_other_routes(server, path, body):
    r = httpx.get(server.url + path) if body is None else httpx.post(server.url + path, json=body)
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    _assert_model_not_found(r.json()["error"], path.removeprefix("/v1/models/") if body is None else "nope")


LONG_TEXT = "hi " * 400  # more tokens than the context holds, but few enough bytes to reach the engine's check


@pytest.mark.parametrize("call,param", [
    (lambda c: c.completions.create(model="tiny", prompt=[1] * (CONTEXT + 10), max_tokens=1), "prompt"),
    (lambda c: c.completions.create(model="tiny", prompt=LONG_TEXT, max_tokens=1), "prompt"),
    (lambda c: c.completions.create(model="tiny", prompt=[1] * 10, max_tokens=CONTEXT), "max_tokens"),
    (lambda c: c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": LONG_TEXT}],
                                         max_tokens=1), "messages"),
    (lambda c: c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=CONTEXT, stream=True),
     "max_tokens"),
    (lambda c: c.responses.create(model="tiny", input=LONG_TEXT, max_output_tokens=1), "input"),
    (lambda c: c.responses.create(model="tiny", input="hello", max_output_tokens=CONTEXT), "max_output_tokens"),
    (lambda c: c.responses.create(model="tiny", input="hello", max_output_tokens=CONTEXT, stream=True),
     "max_output_tokens"),
], ids=["completions-ids", "completions-text", "completions-max", "chat", "chat-stream-max", "responses",
        "responses-max", "responses-stream-max"])
def test_context_overflow_is_400_context_length_exceeded(client, call, param):
    with pytest.raises(openai.BadRequestError) as e:
        call(client)
    body = e.value.body
    assert body["code"] == "context_length_exceeded" and body["type"] == "invalid_request_error"
    assert body["param"] == param and str(CONTEXT) in body["message"]
    # The engine's own check answered (not the byte bound in front of it), with its count of the tokens.
    assert "tokens" in body["message"] and "bytes" not in body["message"]


def test_the_byte_bound_is_context_length_exceeded_too(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input="x" * 200_000, max_output_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "input"
