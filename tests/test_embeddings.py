"""Embeddings: pooled final hidden states (after the final norm) through the engine, against transformers'
AutoModel.last_hidden_state on the same tiny weights, and through POST /v1/embeddings."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch

from jisu import LLM
from jisu.errors import InvalidRequestError
from jisu.pooling import PoolingParams
from jisu.server.app import create_app
from jisu.server.serve import ServerThread

PROMPTS = [[1 + (7 * j + 3) % 90 for j in range(n)] for n in (5, 13, 30)]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def hidden(tiny_llama_dir) -> list[torch.Tensor]:
    import transformers

    model = transformers.AutoModel.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).last_hidden_state[0] for ids in PROMPTS]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooled_hidden_states_match_transformers(llm, hidden, pooling):
    free = llm.engine.blocks.num_free_blocks
    raw = llm.embed(PROMPTS, pooling=pooling, normalize=False)
    unit = llm.embed(PROMPTS, pooling=pooling)
    for h, r, u in zip(hidden, raw, unit):
        want = h[-1] if pooling == "last" else h.mean(dim=0)
        torch.testing.assert_close(torch.tensor(r), want, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(u), want / want.norm(), atol=2e-5, rtol=1e-4)
    assert llm.engine.blocks.num_free_blocks == free


def test_embeddings_do_not_depend_on_chunking_or_batch(llm, monkeypatch):
    whole = [llm.embed(p, pooling="mean")[0] for p in PROMPTS]
    monkeypatch.setattr(llm.engine.scheduler.config, "max_num_batched_tokens", 7)
    assert llm.embed(PROMPTS, pooling="mean") == whole  # exactly: deterministic rows, summed in position order


def test_dimensions_and_bad_pooling(llm):
    full = llm.embed(PROMPTS[1], normalize=False)[0]
    cut = llm.embed(PROMPTS[1], normalize=False, dimensions=8)[0]
    assert cut == full[:8]
    assert sum(x * x for x in llm.embed(PROMPTS[1], dimensions=8)[0]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(InvalidRequestError, match="pooling must be one of"):
        llm.embed("hi", pooling="max")
    with pytest.raises(InvalidRequestError, match="exceeds the model's hidden size"):
        llm.embed("hi", dimensions=10_000)
    with pytest.raises(InvalidRequestError, match="max_tokens must be 0"):
        from jisu import SamplingParams

        llm.engine.add_request("hi", SamplingParams(max_tokens=3), pooling=PoolingParams())


def prompt_tokens_metric(url: str) -> float:
    lines = httpx.get(url + "/metrics", timeout=60).text.splitlines()
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("jisu:prompt_tokens_total"))


def test_embeddings_endpoint(llm):
    want_last = llm.embed(PROMPTS)
    want_mean = llm.embed(PROMPTS[0], pooling="mean", normalize=False)[0]
    want_text = llm.embed("hello world")[0]
    app = create_app(llm.engine, model_name="tiny")
    with ServerThread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        before = prompt_tokens_metric(url)
        r = client.embeddings.create(model="tiny", input=PROMPTS)  # the client asks for base64 by default
        assert prompt_tokens_metric(url) - before == sum(map(len, PROMPTS))  # counted though nothing is generated
        assert [d.index for d in r.data] == [0, 1, 2]
        assert [list(d.embedding) for d in r.data] == want_last  # float32 both ways: exactly
        assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, PROMPTS))
        r = httpx.post(url + "/v1/embeddings", json={"input": PROMPTS[0], "encoding_format": "float",
                                                     "pooling": "mean", "normalize": False}, timeout=60).json()
        assert r["object"] == "list" and r["data"][0]["object"] == "embedding"
        assert r["data"][0]["embedding"] == want_mean
        r = httpx.post(url + "/v1/embeddings", json={"input": "hello world", "encoding_format": "base64"},
                       timeout=60).json()
        got = np.frombuffer(base64.b64decode(r["data"][0]["embedding"]), dtype="<f4").tolist()
        assert got == want_text
        for body, param in [({"input": ""}, "input"), ({"input": "hi", "dimensions": 10_000}, "dimensions"),
                            ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
                            ({"input": [[10**9]]}, "input")]:
            r = httpx.post(url + "/v1/embeddings", json=body, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
