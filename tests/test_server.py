"""The HTTP server, driven over 127.0.0.1 by the official openai client (and raw httpx for bad input).

Servers run in this process (uvicorn in a thread) so tests can look into the engine behind them; the
SIGTERM test runs `jisu serve` as a subprocess. The tiny model is copied with a 4096-token context: its
long generations take many seconds, which gives the disconnect and queue tests requests that are
reliably still running when the test acts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from jisu import LLM
from jisu.request import CompletionOutput, RequestOutput
from jisu.server.app import create_app
from jisu.server.async_engine import OutputStream
from jisu.server.serve import ServerThread

LONG_CONTEXT = 4096
LONG = dict(max_tokens=3000, extra_body={"ignore_eos": True})  # runs for many seconds unless aborted


@pytest.fixture(scope="module")
def long_model_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-long")
    shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = LONG_CONTEXT
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def start(model_dir, *, max_num_seqs=8, max_queue=64, api_key=None, num_kv_blocks=1024, **llm_kwargs):
    llm = LLM(model=str(model_dir), num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs, **llm_kwargs)
    app = create_app(llm.engine, model_name="tiny", api_key=api_key, max_queue=max_queue)
    thread = ServerThread(app)
    url = thread.__enter__()
    return SimpleNamespace(url=url, engine=llm.engine, app=app, thread=thread)


@pytest.fixture(scope="module")
def server(long_model_dir):
    s = start(long_model_dir)
    yield s
    s.thread.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metric(base_url: str, name: str, **labels) -> float:
    text = httpx.get(base_url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def wait_idle(server, timeout=20.0) -> None:
    """Until the engine has nothing in flight and every KV block is back in the pool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = sum(metric(server.url, f"jisu:{name}") for name in
                   ("num_requests_running", "num_requests_waiting", "kv_cache_used_blocks"))
        if busy == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the server did not go idle")


@contextmanager
def slowed(engine, seconds: float = 0.02):
    """Each engine step takes at least `seconds`: a request of 3000 tokens then runs for a minute, so it cannot
    finish while a test still counts on it running. Unslowed, the tiny model makes 3000 tokens in ~2 s, and
    on a loaded host a test once saw the running request finish and free its queue slot."""
    step = engine.step
    engine.step = lambda: (time.sleep(seconds), step())[1]
    try:
        yield
    finally:
        engine.step = step


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


# ----------------------------------------------------------------------------- the API


def test_models_lists_the_served_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].max_model_len == LONG_CONTEXT


def test_completion_has_usage_and_timings(client):
    r = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason == "length" and c.text
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    t = r.model_extra["timings"]
    assert t["prompt_tokens"] == r.usage.prompt_tokens and t["generated_tokens"] == 12
    assert t["cached_prompt_tokens"] == r.usage.prompt_tokens_details.cached_tokens
    for key in ("queue_ms", "prefill_ms", "time_to_first_token_ms", "decode_ms", "prompt_tokens_per_second",
                "generation_tokens_per_second"):
        assert t[key] is not None and t[key] > 0, key
    assert t["time_to_first_token_ms"] == pytest.approx(t["queue_ms"] + t["prefill_ms"], abs=0.01)
    assert t["generation_tokens_per_second"] == pytest.approx(11 / (t["decode_ms"] / 1000), rel=1e-3)


def test_chat_completion(client):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion"
    m = r.choices[0].message
    assert m.role == "assistant" and m.content
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens > 5
    assert r.model_extra["timings"]["generated_tokens"] == 10


def _collect_stream(stream):
    texts, finish, chunks = {}, {}, []
    for chunk in stream:
        chunks.append(chunk)
        for ch in chunk.choices:
            piece = ch.text if hasattr(ch, "text") else (ch.delta.content or "")
            texts[ch.index] = texts.get(ch.index, "") + piece
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return texts, finish, chunks


@pytest.mark.parametrize("stop", [None, "e"])
def test_streamed_text_equals_non_streamed(client, stop):
    kw = dict(model="tiny", max_tokens=40, temperature=0, stop=stop)
    full = client.completions.create(prompt="hello world", **kw).choices[0]
    texts, finish, chunks = _collect_stream(client.completions.create(prompt="hello world", stream=True, **kw))
    assert texts[0] == full.text and finish[0] == full.finish_reason
    assert len(chunks) >= 2  # it really streamed
    assert "timings" in chunks[-1].model_extra  # the last chunk carries the timings

    chat = client.chat.completions.create(messages=CHAT, **kw).choices[0]
    texts, finish, chunks = _collect_stream(client.chat.completions.create(messages=CHAT, stream=True, **kw))
    assert texts[0] == chat.message.content and finish[0] == chat.finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"


def test_stream_include_usage(client):
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert last.model_extra["timings"]["generated_tokens"] == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string_ends_text_before_it(client):
    kw = dict(model="tiny", prompt="hello world", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "the greedy text should have a printable middle"
    r = client.completions.create(stop=[stop], **kw).choices[0]
    assert r.finish_reason == "stop" and r.model_extra["stop_reason"] == stop
    assert r.text == text[: text.index(stop)]


def test_n_choices_and_seed(client):
    kw = dict(model="tiny", prompt="the model", max_tokens=12, temperature=1.0, n=3, seed=7,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same text
    assert len({c.text for c in a.choices}) > 1  # the n sequences draw independently
    assert a.usage.completion_tokens == 36
    other = client.completions.create(**{**kw, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]
    texts, finish, _ = _collect_stream(client.completions.create(stream=True, **kw))
    assert texts == {c.index: c.text for c in a.choices} and finish == {0: "length", 1: "length", 2: "length"}


def test_several_prompts_in_one_completion(client):
    r = client.completions.create(model="tiny", prompt=["hello", "world"], n=2, max_tokens=4, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    alone = client.completions.create(model="tiny", prompt="world", max_tokens=4, temperature=0).choices[0].text
    assert {c.index: c.text for c in r.choices}[2] == alone


def test_completion_logprobs(client):
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for token_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert token_lp <= 0 and 1 <= len(top) <= 3
        assert token_lp == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="tiny", prompt="hello", max_tokens=8, temperature=0, logprobs=3, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(lp.token_logprobs)
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


def test_chat_logprobs_bytes_rebuild_the_text(client):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 24
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    # Tokens can split a UTF-8 character; their bytes, joined, are the exact text.
    raw = bytes(b for entry in content for b in entry.bytes)
    assert raw.decode("utf-8", errors="replace") == r.choices[0].message.content
    none = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
    assert none.choices[0].logprobs is None


def test_tokenize_and_detokenize(server):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == LONG_CONTEXT
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == "hello world"
    chat = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == server.engine.tokenizer.encode_chat(CHAT)


def test_health_and_metrics_names(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    client.completions.create(model="tiny", prompt="hello", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket", "num_requests_running",
                 "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "prompt_tokens_total", "generation_tokens_total",
                 "request_success_total"):
        assert f"jisu:{name}" in text, name
    assert metric(server.url, "jisu:generation_tokens_total") >= 3
    assert metric(server.url, "jisu:request_success_total", finished_reason="length") >= 1


def test_openapi_describes_the_request_bodies(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = body["$ref"].rsplit("/", 1)[1]
    schema = spec["components"]["schemas"][name]
    assert "messages" in schema["required"] and "ChatMessage" in spec["components"]["schemas"]


# ----------------------------------------------------------------------------- reliability


def test_output_stream_keeps_only_the_newest_output():
    """A client that reads slowly holds one output per request, not one per step."""

    async def main():
        stream = OutputStream(asyncio.get_running_loop(), ["r"])

        def engine_thread():
            for i in range(1, 101):
                c = CompletionOutput(0, "x" * i, list(range(i)), "length" if i == 100 else None)
                stream.push(RequestOutput("r", None, [1], [c], finished=i == 100))

        t = threading.Thread(target=engine_thread)
        t.start()
        t.join()
        return [batch async for batch in stream.updates()]

    batches = asyncio.run(main())
    assert len(batches) == 1 and batches[0][0].outputs[0].text == "x" * 100 and batches[0][0].finished


def test_disconnect_mid_stream_aborts_and_frees_blocks(client, server):
    wait_idle(server)
    aborted = metric(server.url, "jisu:request_success_total", finished_reason="abort")
    with slowed(server.engine):
        stream = client.completions.create(model="tiny", prompt="hello", stream=True, **LONG)
        got = 0
        for chunk in stream:
            got += len(chunk.choices[0].text)
            if got > 20:
                break
        assert metric(server.url, "jisu:kv_cache_used_blocks") > 0  # still generating
        stream.close()
        wait_idle(server)
    engine = server.engine
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert metric(server.url, "jisu:request_success_total", finished_reason="abort") == aborted + 1


def test_disconnect_while_waiting_for_a_full_answer_aborts(server):
    wait_idle(server)
    aborted = metric(server.url, "jisu:request_success_total", finished_reason="abort")
    with slowed(server.engine):  # until the abort: finishing would not count as one
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", timeout=1.0,
                       json={"messages": CHAT, "max_tokens": 3000, "ignore_eos": True})
        wait_idle(server)
    assert metric(server.url, "jisu:request_success_total", finished_reason="abort") == aborted + 1


def test_queue_overflow_gets_503_with_retry_after(long_model_dir):
    s = start(long_model_dir, max_num_seqs=1, max_queue=1, num_kv_blocks=512)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            with slowed(s.engine), http.stream("POST", "/v1/completions", json=body) as running:
                assert running.status_code == 200
                # The first token is out: this one is running. The line iterator is kept, as closing it
                # (dropping it) closes the response, which hangs up and aborts the request.
                lines = running.iter_lines()
                next(lines)
                with http.stream("POST", "/v1/completions", json=body) as waiting:
                    assert waiting.status_code == 200  # takes the one queue slot
                    r = http.post("/v1/completions", json={**body, "stream": False})
                    assert r.status_code == 503
                    assert int(r.headers["Retry-After"]) >= 1
                    assert r.json()["error"]["code"] == "queue_full" and "retry" in r.json()["error"]["message"]
                    assert metric(s.url, "jisu:num_requests_running") == 1  # the first was still running
            # Both streams closed: their requests are aborted, and the server takes work again.
            wait_idle(s)
            r = http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 4})
            assert r.status_code == 200
        assert metric(s.url, "jisu:request_rejected_total", reason="queue_full") == 1
    finally:
        s.thread.__exit__(None, None, None)


def test_prompt_plus_max_tokens_beyond_context_names_both(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=list(range(10)), max_tokens=4090)
    msg = e.value.body["message"]
    assert "10" in msg and "4090" in msg and str(LONG_CONTEXT) in msg
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[1] * 5000, max_tokens=1)
    assert "5000" in e.value.body["message"] and str(LONG_CONTEXT) in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=5000)
    assert "5000" in e.value.body["message"]


BAD_REQUESTS = [
    # (path, raw body, the field the error must name or None for whole-body problems)
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": ', None),
    ("/v1/completions", b"", None),
    ("/v1/completions", b"\xff\xfe", None),
    ("/v1/completions", b"[1, 2]", "body"),
    ("/v1/completions", b'{"max_tokens": 3}', "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": "hot"}', "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": -0.5}', "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "n": true}', "n"),
    ("/v1/completions", b'{"prompt": "hi", "n": 0}', "n"),
    ("/v1/completions", b'{"prompt": "hi", "n": 100000}', "n"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1.5}', "max_tokens"),
    ("/v1/completions", b'{"prompt": ["a", "b"], "n": 40}', "n"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": -1}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": 0}', "top_p"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": 1.5}', "top_p"),
    ("/v1/completions", b'{"prompt": "hi", "top_k": -2}', "top_k"),
    ("/v1/completions", b'{"prompt": "hi", "min_p": 2}', "min_p"),
    ("/v1/completions", b'{"prompt": "hi", "presence_penalty": 3}', "presence_penalty"),
    ("/v1/completions", b'{"prompt": "hi", "frequency_penalty": -9}', "frequency_penalty"),
    ("/v1/completions", b'{"prompt": "hi", "repetition_penalty": 0}', "repetition_penalty"),
    ("/v1/completions", b'{"prompt": "hi", "logprobs": 21}', "logprobs"),
    ("/v1/completions", b'{"prompt": "hi", "seed": "x"}', "seed"),
    ("/v1/completions", b'{"prompt": "hi", "stop": ""}', "stop"),
    ("/v1/completions", b'{"prompt": "hi", "stop": [1]}', "stop"),
    ("/v1/completions", b'{"prompt": ""}', "prompt"),
    ("/v1/completions", b'{"prompt": []}', "prompt"),
    ("/v1/completions", b'{"prompt": [-1]}', "prompt"),
    ("/v1/completions", b'{"prompt": {"a": 1}}', "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "model": "gpt-4"}', "model"),
    ("/v1/completions", b'{"prompt": "hi", "echo": 1}', "echo"),
    ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"1": 500}}', "logit_bias"),
    ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"x": 5}}', "logit_bias"),
    ("/v1/completions", b'{"prompt": "hi", "stream_options": {"include_usage": true}}', "stream_options"),
    ("/v1/chat/completions", b'{"messages": []}', "messages"),
    ("/v1/chat/completions", b'{"messages": "hi"}', "messages"),
    ("/v1/chat/completions", b'{}', "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     "messages[0].content[0]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 30, "logprobs": true}',
     "top_logprobs"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', "top_logprobs"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}',
     "max_completion_tokens"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "model": "nope"}', "model"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}',
     "tools[0].function"),
    ("/detokenize", b'{"tokens": [100000]}', "tokens[0]"),
    ("/detokenize", b'{"tokens": "abc"}', "tokens"),
    ("/tokenize", b'{}', "prompt"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS)
def test_bad_input_is_a_4xx_naming_the_field(server, path, body, param):
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    # A model not served here is not found (404), as OpenAI and vLLM answer.
    assert r.status_code in ((404,) if param == "model" else (400, 422)), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if param is not None and param != "body":
        assert param.split("[")[0].split(".")[0] in err["message"]


def test_unknown_routes_and_methods_use_openai_errors(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_api_key(long_model_dir):
    s = start(long_model_dir, api_key="sekret", num_kv_blocks=64)
    try:
        body = {"prompt": "hi", "max_tokens": 2}
        assert httpx.post(s.url + "/v1/completions", json=body).status_code == 401
        r = httpx.post(s.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/v1/models").status_code == 401
        # A key is checked before the body, so a bad body without a key is still a 401.
        assert httpx.post(s.url + "/v1/completions", content=b"{").status_code == 401
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="hi", max_tokens=2)
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(s.url + "/health").status_code == 200  # probes need no key
    finally:
        s.thread.__exit__(None, None, None)


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% for m in messages %}{{ m.__class__.__base__.__subclasses__() }}{% endfor %}",
])
def test_chat_template_reaching_python_internals_is_refused(tiny_llama_dir, tmp_path, template):
    model = tmp_path / "evil"
    shutil.copytree(tiny_llama_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    s = start(model, num_kv_blocks=32)
    try:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2})
        assert r.status_code == 400
        assert "sandbox" in r.json()["error"]["message"] and r.json()["error"]["code"] == "chat_template_error"
        r = httpx.post(s.url + "/tokenize", json={"messages": CHAT})
        assert r.status_code == 400
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    finally:
        s.thread.__exit__(None, None, None)


def test_sigterm_drains_and_exits_zero(long_model_dir):
    cmd = [sys.executable, "-m", "jisu.cli", "serve", "--model", str(long_model_dir), "--port", "0",
           "--num-kv-blocks", "512", "--shutdown-timeout", "1", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"ready on (http://127\.0\.0\.1:\d+)", line)
        assert m, line + proc.stderr.read()
        url = m.group(1)
        events: list[str] = []
        first = threading.Event()

        def read_stream():
            # As long as the context allows (~2.7 s here), so it outlives the 1 s grace even on a faster host.
            body = {"prompt": "hello", "max_tokens": LONG_CONTEXT - 16, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
        reader.join(timeout=10)
        # The request in flight outlived the 1 s grace period: it was ended cleanly, not cut off.
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "abort"
        assert last["timings"]["generated_tokens"] >= 1  # what it had generated is still reported
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- the real model


@pytest.mark.real_model
def test_real_model_end_to_end(real_llm):
    app = create_app(real_llm.engine, model_name="smollm2")
    with ServerThread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
        answer = r.choices[0].message.content
        assert "Paris" in answer
        assert r.usage.completion_tokens >= 1 and r.model_extra["timings"]["time_to_first_token_ms"] > 0
        texts, finish, _ = _collect_stream(client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=16, temperature=0, stream=True))
        assert texts[0] == answer and finish[0] == r.choices[0].finish_reason
        done = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                         temperature=0, logprobs=2)
        assert len(done.choices[0].logprobs.tokens) == done.usage.completion_tokens
