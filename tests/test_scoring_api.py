"""LLM.score / classify, and the same numbers through the server as evaluators ask for them (echo + logprobs,
lm-evaluation-harness's local-completions request and parser, vLLM's prompt_logprobs, /tokenizer_info)."""

from __future__ import annotations

import json
import math
from operator import itemgetter

import httpx
import openai
import pytest
import torch

from jisu import SamplingParams
from jisu.model_run import score_batch
from jisu.scoring import encode_pair
from jisu.server.app import create_app
from jisu.server.serve import ServerThread

try:  # the harness's own parser where lm-eval is installed (benchmarks/bench_lm_eval.py installs it)
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    parse_logprobs = LocalCompletionsAPI.parse_logprobs
except ImportError:
    def parse_logprobs(outputs, tokens=None, ctxlens=None, **kwargs):
        """lm-eval 0.4's LocalCompletionsAPI.parse_logprobs, reproduced."""
        res = []
        for out in outputs if isinstance(outputs, list) else [outputs]:
            for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens):
                token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
                top = choice["logprobs"]["top_logprobs"][ctxlen:-1]
                greedy = all(t == max(tp.values()) for t, tp in zip(token_logprobs, top))
                res.append((sum(token_logprobs), greedy))
        return res

PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " the city of London"),
    ("The sun rises in the", " east"),
    ("The sun rises in the ", "west"),  # the trailing space moves into the continuation
]


@pytest.fixture(scope="module")
def llm(real_llm):
    return real_llm


PROMPT_IDS_TEXT = "The sun rises in the east"


@pytest.fixture(scope="module")
def scores(llm):
    return llm.score([c for c, _ in PAIRS], [x for _, x in PAIRS])


@pytest.fixture(scope="module")
def prompt_reference(llm):
    ids = llm.tokenizer.encode(PROMPT_IDS_TEXT)
    return ids, llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=2))[0].prompt_logprobs


@pytest.fixture(scope="module")
def server(llm, scores, prompt_reference):
    """Computes the engine-side references first: once the server runs, only its engine thread may step."""
    app = create_app(llm.engine, model_name="smol")
    with ServerThread(app) as url:
        yield url


def test_score_is_the_continuations_log_likelihood(llm, scores):
    for (ctx, cont), s in zip(PAIRS, scores):
        c_ids, x_ids = encode_pair(llm.tokenizer, ctx, cont)
        ids = c_ids + x_ids
        lp = torch.log_softmax(score_batch(llm.engine, [ids])[0], dim=-1)
        want = [lp[p - 1, ids[p]].item() for p in range(len(c_ids), len(ids))]
        assert s.token_ids == x_ids and s.context_length == len(c_ids)
        assert s.token_logprobs == pytest.approx(want, abs=1e-5)
        assert s.logprob == pytest.approx(math.fsum(want), abs=1e-4)
        greedy = all(lp[p - 1].argmax().item() == ids[p] for p in range(len(c_ids), len(ids)))
        assert s.is_greedy == greedy
    assert scores[0].logprob > scores[1].logprob  # Paris, not London
    assert scores[0].is_greedy


def test_pairs_split_as_lm_eval_does(llm, scores):
    tok = llm.tokenizer
    # "in the " + "west" scores " west" after "in the": the space belongs to the continuation's first token.
    c_ids, x_ids = encode_pair(tok, "The sun rises in the ", "west")
    assert (c_ids, x_ids) == encode_pair(tok, "The sun rises in the", " west")
    assert scores[3].token_ids == tok.encode(" west", add_special_tokens=False)
    # Token ids go in as they are; one context may go with many continuations.
    by_ids = llm.score(c_ids, [x_ids, tok.encode(" east", add_special_tokens=False)])
    assert by_ids[0].token_logprobs == scores[3].token_logprobs
    assert by_ids[1].token_logprobs == scores[2].token_logprobs
    # An empty context is conditioned on BOS (EOS where there is none), as lm-eval does.
    empty = encode_pair(tok, "", "Hello")
    assert len(empty[0]) == 1 and empty[1] == tok.encode("Hello", add_special_tokens=False)


def test_score_refuses_bad_pairs(llm):
    from jisu.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="2 prompts for 3 continuations"):
        llm.score(["a", "b"], ["x", "y", "z"])
    with pytest.raises(InvalidRequestError, match="both be text or both"):
        llm.score("a", [[1, 2]])


def test_classify_picks_the_likelier_label(llm):
    texts = ["I loved this film, it was wonderful and moving.", "A dull, boring waste of two hours."]
    out = llm.classify(texts, ["positive", "negative"], template="Review: {text}\nSentiment:")
    assert [o.label for o in out] == ["positive", "negative"]
    scored = llm.score("Review: " + texts[0] + "\nSentiment:", [" positive", " negative"])
    assert out[0].scores == {"positive": scored[0].logprob, "negative": scored[1].logprob}
    assert sum(out[0].probs.values()) == pytest.approx(1.0)
    per_token = llm.classify(texts[:1], ["positive", "negative"], template="Review: {text}\nSentiment:",
                             normalize="tokens")
    assert per_token[0].scores["positive"] == pytest.approx(scored[0].logprob / len(scored[0].token_ids))


def test_classify_by_choice_constraint_agrees_with_greedy_decoding(llm):
    texts = ["I loved this film, it was wonderful and moving.", "A dull, boring waste of two hours."]
    out = llm.classify(texts, ["positive", "negative"], template="Review: {text}\nSentiment:", method="choice")
    assert [o.label for o in out] == ["positive", "negative"]
    with pytest.raises(ValueError, match="method must be"):
        llm.classify(texts, ["a", "b"], method="vote")


# ----------------------------------------------------------------------------- through the server


def test_echo_logprobs_reproduce_score_through_openai(server, llm, scores):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    for (ctx, cont), s in zip(PAIRS[:3], scores):
        c_ids, x_ids = encode_pair(llm.tokenizer, ctx, cont)
        r = client.completions.create(model="smol", prompt=c_ids + x_ids, max_tokens=0, echo=True, logprobs=1,
                                      temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "length"
        assert choice.text == llm.tokenizer.decode(c_ids + x_ids, skip_special_tokens=False)
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert len(lp.tokens) == len(c_ids) + len(x_ids)
        assert lp.token_logprobs[len(c_ids):] == s.token_logprobs  # the same numbers, exactly
        assert lp.text_offset[1] == len(lp.tokens[0])


def test_lm_eval_request_and_parser(server, llm, scores):
    """lm-eval's local-completions loglikelihood request, verbatim, on a batch of token-id prompts."""
    pairs = [encode_pair(llm.tokenizer, c, x) for c, x in PAIRS]
    body = {"model": "smol", "prompt": [c + x for c, x in pairs], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for c, (ctx, cont) in zip(out["choices"], pairs):
        assert len(c["logprobs"]["token_logprobs"]) == len(ctx) + len(cont) + 1  # + the generated token
    parsed = parse_logprobs(out, tokens=body["prompt"], ctxlens=[len(c) for c, _ in pairs])
    assert [p[0] for p in parsed] == pytest.approx([s.logprob for s in scores], abs=1e-9)
    assert [p[1] for p in parsed] == [s.is_greedy for s in scores]


def test_vllm_prompt_logprobs_field(server, llm, prompt_reference):
    ids, want = prompt_reference
    r = httpx.post(server + "/v1/completions", json={"prompt": ids, "max_tokens": 2, "temperature": 0,
                                                    "prompt_logprobs": 2}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] and "logprobs" in choice and choice["logprobs"] is None  # no echo: no legacy logprobs
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for entry, token, e in zip(plp[1:], ids[1:], want[1:]):
        assert entry[str(token)] == {"logprob": e.logprob, "rank": e.rank,
                                     "decoded_token": llm.tokenizer.decode([token], skip_special_tokens=False)}
        assert {v["rank"] for v in entry.values()} >= {1, 2} and len(entry) == (2 if e.rank <= 2 else 3)
    # With echo too, the legacy logprobs keep their own top-N (1) though the prompt's rows computed 2.
    r = httpx.post(server + "/v1/completions", json={"prompt": ids, "max_tokens": 2, "temperature": 0, "echo": True,
                                                    "logprobs": 1, "prompt_logprobs": 2}, timeout=60)
    legacy = r.json()["choices"][0]["logprobs"]
    assert all(len(top) == 1 for top in legacy["top_logprobs"][1:])
    assert legacy["token_logprobs"][1 : len(ids)] == [e.logprob for e in want[1:]]


def test_echo_streams_the_prompt_first(server, llm):
    body = {"prompt": "The sun rises in the", "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 0,
            "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["text"] for e in events for c in e["choices"])
    plain = httpx.post(server + "/v1/completions", json={**body, "stream": False}, timeout=60).json()["choices"][0]
    assert text == plain["text"] and text.startswith("The sun rises in the")
    streamed = [lp for e in events for c in e["choices"] if c["logprobs"] for lp in c["logprobs"]["token_logprobs"]]
    assert streamed == plain["logprobs"]["token_logprobs"]
    offsets = [o for e in events for c in e["choices"] if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert offsets == plain["logprobs"]["text_offset"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "hi", "prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "echo": "yes"}, "echo"),
])
def test_bad_scoring_fields_are_400s(server, body, param):
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_tokenizer_info_as_lm_eval_probes_it(server, llm):
    info = httpx.get(server + "/tokenizer_info", timeout=60).json()
    assert {"tokenizer_class", "eos_token", "bos_token", "pad_token", "chat_template", "model_max_length"} <= set(info)
    assert info["model_max_length"] == llm.engine.max_model_len
    # lm-eval's remote tokenizer turns the EOS text into its id through /tokenize.
    tokens = httpx.post(server + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False},
                        timeout=60).json()["tokens"]
    assert tokens[0] in llm.engine.eos_token_ids


def test_echo_with_several_choices(server):
    body = {"prompt": ["The sun rises in the", "Once upon a"], "max_tokens": 3, "n": 2, "temperature": 0.9,
            "seed": 7, "echo": True, "logprobs": 0}
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c in choices:
        prompt = body["prompt"][c["index"] // 2]
        lp = c["logprobs"]
        assert c["text"].startswith(prompt) and lp["token_logprobs"][0] is None
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    # Both choices of a prompt share its prompt logprobs (computed once, by the first sequence).
    n_prompt = len(choices[0]["logprobs"]["tokens"]) - 3
    assert choices[0]["logprobs"]["token_logprobs"][:n_prompt] == choices[1]["logprobs"]["token_logprobs"][:n_prompt]
