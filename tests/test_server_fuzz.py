"""Property test of the HTTP API: over 1,000 generated requests, none gets a 5xx, and every answer is
well formed (an OpenAI error body naming a problem, a complete response, or a stream ending in [DONE]).

Each body starts valid for its endpoint and then has up to two fields set to arbitrary JSON or edge
values (or dropped), so accepted, streamed and refused paths all run. The server's context is 64 tokens,
which bounds every generation and keeps the run short.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jisu import LLM
from jisu.server.app import create_app
from jisu.server.serve import ServerThread

MIN_REQUESTS = 1000
JSON = {"content-type": "application/json"}  # anything else is refused before the body is read

json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.integers(), st.floats(allow_nan=False),
    st.text(max_size=12),
)
json_any = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


text = st.text(max_size=24)
some_text = st.text(min_size=1, max_size=24)
token_ids = st.lists(st.integers(0, 480), min_size=1, max_size=8)
# What a mutation puts in a field: anything JSON, or a number near the edges of the allowed ranges.
odd_value = st.one_of(json_any, st.floats(-3.0, 3.0, allow_nan=False), st.integers(-2, 70), st.just(""), st.just([]))

sampling = {
    "model": st.just("tiny"),
    "n": st.integers(1, 3),
    "temperature": st.floats(0.0, 2.0),
    "top_p": st.floats(0.01, 1.0),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0.0, 1.0),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "repetition_penalty": st.floats(0.5, 2.0),
    "seed": st.integers(-5, 2**40),
    "stop": st.one_of(some_text, st.lists(some_text, max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 480), max_size=3),
    "ignore_eos": st.booleans(),
    "user": text,
}
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                                 "content": st.one_of(some_text, st.lists(st.fixed_dictionaries(
                                     {"type": st.just("text"), "text": some_text}), min_size=1, max_size=2))})


@st.composite
def body(draw, required: dict, optional: dict):
    """A valid body for the endpoint, then 0-2 of its fields (or new ones) set to odd values."""
    out = draw(st.fixed_dictionaries(required, optional=optional))
    if out.get("stream") and draw(st.booleans()):
        out["stream_options"] = {"include_usage": draw(st.booleans())}
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        key = draw(st.sampled_from(sorted({*required, *optional, "stream_options", "messages", "prompt", "x"})))
        if draw(st.booleans()) or key not in out:
            out[key] = draw(odd_value)
        else:
            del out[key]
    return out


completion_body = body(
    {"prompt": st.one_of(some_text, token_ids, st.lists(some_text, min_size=1, max_size=3)), "stream": st.booleans()},
    {**sampling, "max_tokens": st.integers(1, 8), "logprobs": st.integers(0, 5), "echo": st.just(False)},
)
chat_body = body(
    {"messages": st.lists(message, min_size=1, max_size=3), "stream": st.booleans()},
    {**sampling, "max_tokens": st.integers(1, 8), "max_completion_tokens": st.integers(1, 8),
     "logprobs": st.booleans(), "response_format": st.just({"type": "text"})},
)
tokenize_body = body({"prompt": some_text}, {"model": st.just("tiny"), "add_special_tokens": st.booleans()})
tokenize_chat_body = body({"messages": st.lists(message, min_size=1, max_size=2)}, {"model": st.just("tiny")})
detokenize_body = body({"tokens": token_ids}, {"model": st.just("tiny")})

request = st.one_of(
    st.tuples(st.just("/v1/completions"), completion_body),
    st.tuples(st.just("/v1/chat/completions"), chat_body),
    st.tuples(st.just("/tokenize"), st.one_of(tokenize_body, tokenize_chat_body)),
    st.tuples(st.just("/detokenize"), detokenize_body),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), json_any),  # not even an object
)


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), max_model_len=64, num_kv_blocks=128, max_num_seqs=16)
    app = create_app(llm.engine, model_name="tiny", max_queue=256)
    with ServerThread(app) as url:
        yield url, llm.engine


def check_answer(path: str, body, r: httpx.Response) -> None:
    assert r.status_code < 500, (path, body, r.status_code, r.text)
    if r.status_code != 200:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"], (body, r.text)
        assert set(err) == {"message", "type", "param", "code"}
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", (body, r.text[-500:])
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks), (body, r.text[-500:])
        assert "timings" in chunks[-1]
        return
    out = r.json()
    if path.startswith("/v1/"):
        assert out["choices"] and out["usage"]["completion_tokens"] >= 0 and "timings" in out


def test_no_5xx_over_generated_requests(fuzz_server):
    url, engine = fuzz_server
    sent = 0

    with httpx.Client(base_url=url, timeout=30) as http:

        @settings(max_examples=MIN_REQUESTS + 50, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(request)
        def one_request(case):
            nonlocal sent
            path, body = case
            r = http.post(path, content=json.dumps(body).encode(), headers=JSON)
            sent += 1
            check_answer(path, body, r)

        one_request()

    assert sent >= MIN_REQUESTS
    # Every request finished or was refused: nothing is left running and no KV block leaked.
    assert not engine.has_unfinished_requests()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@given(st.binary(max_size=64))
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_raw_bytes_are_refused_cleanly(fuzz_server, raw):
    url, _ = fuzz_server
    r = httpx.post(url + "/v1/chat/completions", content=raw, headers=JSON)
    assert r.status_code < 500
    if r.status_code != 200:
        assert r.json()["error"]["message"]
