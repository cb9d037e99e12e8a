"""Structured output on the default model: every constrained answer parses and validates, in the Python API and
through the official openai client; the constraint changes no other row of the batch; bad constraints are 400s."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from jisu import LLM
from jisu.errors import InvalidRequestError
from jisu.sampling_params import SamplingParams
from jisu.server.app import create_app
from jisu.structured import strict_schema
from jisu.server.serve import ServerThread
from jisu.structured import StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "height_m": {"type": "number", "minimum": 1.2, "maximum": 2.3},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "height_m", "role", "tags", "address"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Make up a user profile for our website."}]


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=1024)


def _texts(outs):
    return [c.text for o in outs for c in o.outputs]


def test_json_schema_outputs_validate_greedy_and_sampled(llm):
    spec = StructuredOutputsParams(json=PERSON)
    params = [
        SamplingParams(temperature=0, max_tokens=200, structured_outputs=spec),
        SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=200, structured_outputs=spec),
    ]
    outs = llm.chat([ASK, ASK], params)
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), PERSON)


def test_choice_regex_and_grammars(llm):
    cases = [
        (StructuredOutputsParams(choice=["positive", "negative", "neutral"]),
         lambda t: t in ("positive", "negative", "neutral")),
        (StructuredOutputsParams(regex=r"\d{3}-\d{4}"), lambda t: re.fullmatch(r"\d{3}-\d{4}", t)),
        (StructuredOutputsParams(grammar='start: "SELECT " COL " FROM users"\nCOL: "id" | "name" | "email"'),
         lambda t: re.fullmatch(r"SELECT (id|name|email) FROM users", t)),
        (StructuredOutputsParams(grammar='root ::= "x=" [0-9] [0-9]?'), lambda t: re.fullmatch(r"x=[0-9]{1,2}", t)),
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    outs = llm.generate(["Answer:"] * len(cases),
                        [SamplingParams(temperature=0.7, seed=3, max_tokens=60, structured_outputs=s) for s, _ in cases])
    for (spec, ok), out in zip(cases, outs):
        assert ok(out.text), (spec.kind, out.text)
        assert out.finish_reason == "stop"


def test_constraint_leaves_the_other_rows_of_the_batch_alone(llm):
    plain = SamplingParams(temperature=0, max_tokens=24)
    alone = llm.generate(["The capital of France is"], plain)[0].token_ids
    mixed = llm.generate(
        ["The capital of France is", "Pick one:"],
        [plain, SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(choice=["a", "b"]))],
    )
    assert mixed[0].token_ids == alone
    assert mixed[1].text in ("a", "b")


def test_cut_by_max_tokens_says_length(llm):
    out = llm.chat(ASK, SamplingParams(temperature=0, max_tokens=5,
                                       structured_outputs=StructuredOutputsParams(json=PERSON)))[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 5


def test_refused_constraints_name_the_problem(llm):
    with pytest.raises(InvalidRequestError, match="structured_outputs.json cannot be used: .*strange"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "strange"})))
    with pytest.raises(InvalidRequestError, match="structured_outputs.regex cannot be used"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="((")))
    with pytest.raises(InvalidRequestError, match="unknown name"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(grammar="start: nothing_here")))
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    assert not llm.engine.has_unfinished_requests()


def test_logit_bias(llm):
    token = llm.tokenizer.encode(" banana", add_special_tokens=False)[0]
    out = llm.generate("I like", SamplingParams(temperature=0, max_tokens=3, logit_bias={token: 100}))[0]
    assert out.token_ids == [token] * 3
    plain = llm.generate("I like", SamplingParams(temperature=0, max_tokens=3))[0].token_ids
    first = plain[0]
    banned = llm.generate("I like", SamplingParams(temperature=0, max_tokens=3, logit_bias={first: -100}))[0]
    assert banned.token_ids[0] != first
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate("I like", SamplingParams(logit_bias={10**7: 1}))


def test_strict_schema_closes_objects_but_not_property_names():
    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
                                               "items": {"type": "array", "items": {"type": "object"}}}}
    out = strict_schema(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]  # the map of property names is data, not a schema
    assert out["properties"]["items"]["items"]["additionalProperties"] is False
    assert strict_schema({"type": "object", "additionalProperties": True})["additionalProperties"] is True


# ---- through the server, with the official client ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(llm):
    app = create_app(llm.engine, model_name="smollm2")
    thread = ServerThread(app)
    url = thread.__enter__()
    yield url
    thread.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


SCHEMAS = {
    "person": PERSON,
    "order": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                               "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["sku", "qty"]}},
            "express": {"type": "boolean"},
            "total": {"type": "number", "minimum": 0, "maximum": 1000},
        },
        "required": ["items", "express", "total"],
    },
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_openai_json_schema_parses_and_validates(client, name, temperature):
    schema = SCHEMAS[name]
    resp = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": f"Give me a JSON {name}."}], max_tokens=256,
        temperature=temperature, seed=11, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
    )
    for choice in resp.choices:
        assert choice.finish_reason == "stop"
        value = json.loads(choice.message.content)
        jsonschema.validate(value, strict_schema(schema))


def test_openai_json_schema_streamed(client):
    stream = client.chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=256, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_openai_json_object_and_vllm_extension_fields(client):
    resp = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=128, temperature=0,
                                          response_format={"type": "json_object"})
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
    choice = client.completions.create(model="smollm2", prompt="Is the sky blue? Answer:", max_tokens=8,
                                       temperature=0, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].text in ("yes", "no")
    regex = client.completions.create(model="smollm2", prompt="Date:", max_tokens=16, temperature=0,
                                      extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", regex.choices[0].text)
    grammar = client.completions.create(model="smollm2", prompt="Say:", max_tokens=16, temperature=0,
                                        extra_body={"structured_outputs": {"grammar": 'start: "ok" | "no"'}})
    assert grammar.choices[0].text in ("ok", "no")


def test_openai_cut_answer_says_length(client):
    resp = client.chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=4, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert resp.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strange"}}}},
     "response_format", "strange"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "schema is required"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "one output constraint"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias", "outside the vocabulary"),
])
def test_refused_constraints_are_400s_naming_the_field(server, body, param, words):
    r = httpx.post(server + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"], error
