"""What evaluators and embedding clients call: the echo / prompt-logprobs pieces of /v1/completions,
GET /tokenizer_info and POST /v1/embeddings.

lm-evaluation-harness's `local-completions` scores a multiple-choice answer with one completions request of token
ids, `max_tokens` 1, `logprobs` 1 and `echo`, and reads `token_logprobs` over the prompt (the first is null:
nothing predicts it). Its remote-tokenizer probe asks /tokenizer_info (vLLM's route) for the special tokens, then
tokenizes through /tokenize.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, field_validator

from jisu.errors import InvalidRequestError
from jisu.pooling import POOLING_KINDS, PoolingParams
from jisu.sampling_params import SamplingParams
from jisu.server import protocol as p

MAX_EMBEDDING_INPUTS = 256


# ----------------------------------------------------------------------------- completions: echo


def echo_text(token_text: p.TokenText, tokenizer, out) -> str:
    """The prompt as echo returns it: the text given, or the decoded ids of a token-id prompt."""
    return out.prompt if out.prompt is not None else tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)


def echo_logprobs(token_text: p.TokenText, out, k: int) -> dict:
    """The legacy logprobs of the prompt tokens (first entry null), in completion_logprobs' shape."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = 0
    entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)  # none on a request the server aborted
    for token_id, e in zip(out.prompt_token_ids, entries):
        text = token_text(token_id)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if e is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(e.logprob)
        alternatives: dict[str, float] = {}
        for tid, lp in e.top[:k]:
            alternatives.setdefault(token_text(tid)[0], lp)
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def join_logprobs(first: dict | None, second: dict) -> dict:
    """The prompt's legacy logprobs followed by the completion's (first None: the completion's alone)."""
    if first is None:
        return second
    return {key: first[key] + second[key] for key in first}


def prompt_logprobs_json(token_text: p.TokenText, entries: list, k: int) -> list:
    """vLLM's per-choice `prompt_logprobs`: null, then per token {token id: {logprob, rank, decoded_token}} holding
    the prompt token and the top k."""
    result: list[dict | None] = []
    for e in entries or ():
        if e is None:
            result.append(None)
            continue
        d = {str(e.token_id): {"logprob": e.logprob, "rank": e.rank, "decoded_token": token_text(e.token_id)[0]}}
        for rank, (tid, lp) in enumerate(e.top[:k], start=1):
            d.setdefault(str(tid), {"logprob": lp, "rank": rank, "decoded_token": token_text(tid)[0]})
        result.append(d)
    return result


# ----------------------------------------------------------------------------- /v1/embeddings


class EmbeddingRequest(p._Strict):
    model: str | None = None
    input: Any
    encoding_format: str = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    # Extensions: how the hidden states are pooled.
    pooling: str = "last"
    normalize: bool = True

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        return p.check_prompts(v, MAX_EMBEDDING_INPUTS, "input")

    @field_validator("encoding_format")
    @classmethod
    def _format(cls, v):
        if v not in ("float", "base64"):
            raise ValueError("must be 'float' or 'base64'")
        return v

    @field_validator("pooling")
    @classmethod
    def _pooling(cls, v):
        if v not in POOLING_KINDS:
            raise ValueError(f"must be one of {', '.join(POOLING_KINDS)}")
        return v


class ScoringRoutes:
    """Routes on the server's shared handlers (parse, auth, model check, submit, collect)."""

    def __init__(self, server):
        self.server = server

    async def tokenizer_info(self, request: Request) -> Response:
        """vLLM's GET /tokenizer_info: the tokenizer's class and special tokens, its chat template and limits."""
        s = self.server
        s.authorize(request)
        tok = s.tokenizer
        spec = tok.spec
        specials = dict(spec.special_tokens)

        def text_of(token_id):
            return None if token_id is None else tok.decode([token_id], skip_special_tokens=False)

        specials.setdefault("bos_token", text_of(spec.bos_token_id))
        specials.setdefault("eos_token", text_of(spec.eos_token_ids[0] if spec.eos_token_ids else None))
        return JSONResponse({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": specials.get("bos_token"),
            "eos_token": specials.get("eos_token"),
            "pad_token": specials.get("pad_token"),
            "unk_token": specials.get("unk_token"),
            "add_bos_token": spec.add_bos_token,
            "add_eos_token": spec.add_eos_token,
            "chat_template": spec.chat_template,
            "model_max_length": s.engine.max_model_len,
            "vocab_size": tok.vocab_size,
        })

    async def embeddings(self, request: Request) -> Response:
        s = self.server
        req = await s.parse(request, EmbeddingRequest)
        s.check_model(req.model)
        try:
            pooling = PoolingParams(req.pooling, req.normalize, req.dimensions)
        except InvalidRequestError as e:
            raise p.bad_request(str(e), param="pooling") from None
        hidden = s.engine.model_config.hidden_size
        if req.dimensions is not None and req.dimensions > hidden:
            raise p.bad_request(f"dimensions: {req.dimensions} exceeds the model's hidden size {hidden}",
                                param="dimensions")
        prompts = [await s.encode(x, param="input") for x in req.input]
        request_id, stream = await s.submit(prompts, SamplingParams(max_tokens=0), "embd", "input", pooling=pooling)
        finals = await s.collect(request, stream)
        if finals is None:
            return Response(status_code=499)
        outs = [finals[rid] for rid in stream.request_ids]
        data = []
        for i, out in enumerate(outs):
            if out.embedding is None:  # aborted by a shutdown
                raise p.APIError(503, "the server shut down before the request finished", "server_unavailable",
                                 code="shutting_down")
            vec: Any = out.embedding
            if req.encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
                vec = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": vec})
        tokens = sum(len(o.prompt_token_ids) for o in outs)
        return JSONResponse({"object": "list", "data": data, "model": s.model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def add_scoring_routes(app, server, post) -> None:
    """Registers GET /tokenizer_info and POST /v1/embeddings (`post` registers a body model for the schema)."""
    routes = ScoringRoutes(server)
    post("/v1/embeddings", EmbeddingRequest, routes.embeddings)
    app.add_api_route("/tokenizer_info", routes.tokenizer_info, methods=["GET"], response_model=None)
