"""The FastAPI app: OpenAI routes, tokenize/detokenize, health and metrics over one AsyncEngine.

Handlers only parse, validate, tokenize and turn engine outputs into OpenAI JSON; the engine thread does
the rest. Every error leaves as an OpenAI error body with a 4xx status naming the field, except 503 when
the server is full or stopping, and 500 only for a bug.

Without an API key a server on 127.0.0.1 is still reachable from any web page the user opens, so by default
it answers only to loopback Host names (DNS rebinding), takes only JSON bodies (a form or text/plain POST
needs no CORS preflight), sends no CORS headers, and tokenizes special tokens typed in messages as text.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from os import PathLike
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.middleware.cors import CORSMiddleware

from jisu.errors import ContextLengthError, InvalidRequestError, JisuError
from jisu.server import protocol as p
from jisu.server.async_engine import AsyncEngine, NotAcceptingError, OutputStream, QueueFullError
from jisu.server.chunks import (Deltas, chat_message, disconnected, sse_lines, tool_chunks, usage_and_timings,
                                with_summary)
from jisu.server.error_handlers import add_error_handlers, body_schema, register_schemas
from jisu.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from jisu.server.guards import LOOPBACK_HOSTS, HostCheck, is_json, max_token_bytes
from jisu.server.metrics import ServerMetrics
from jisu.server.sse import AbortingEventStream
from jisu.server.responses import Responses, ResponsesRequest
from jisu.server.scoring_routes import add_scoring_routes, echo_logprobs, echo_text, join_logprobs, prompt_logprobs_json
from jisu.tools import ToolError, ToolPlan, ToolStream, plan_tools

logger = logging.getLogger("jisu.server")

MAX_BODY_BYTES = 8 * 1024 * 1024
RETRY_AFTER_S = 1
REQUEST_BODY_TIMEOUT_S = 30.0
_LONG_TEXT = 16384  # characters; longer prompts are tokenized in a worker thread
_TOKENIZER_THREADS = 4  # chat templates and long prompts; bounds the CPU a flood of them can take


def default_model_name(model: str | PathLike | None) -> str:
    """The id /v1/models lists: the short name, or the file / folder name without .gguf."""
    from jisu.loader.resolve import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    path = Path(model)
    return path.stem if path.suffix.lower() == ".gguf" else path.name or str(model)


def create_app(
    engine,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int = 256,
    allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
    allowed_origins: Sequence[str] | None = None,
    special_tokens_in_content: bool = False,
    request_body_timeout_s: float = REQUEST_BODY_TIMEOUT_S,
) -> FastAPI:
    """An app serving `engine` (an LLMEngine). Its engine thread starts and stops with the app's lifespan;
    app.state.async_engine.begin_drain(grace) starts a graceful shutdown.

    allowed_hosts: the Host names (any port) it answers to; None or "*" among them: any. The default suits
    a server bound to a loopback address. allowed_origins: web origins that may call it from a browser
    (CORS); None sends no CORS headers, so browsers keep other sites' pages from reading its answers.
    special_tokens_in_content: let text such as "<|im_start|>" inside a message become the special token
    (a client could then forge turns of other roles); off, it is tokenized as the text it is."""
    name = model_name or default_model_name(engine.config.model)
    metrics = ServerMetrics(name)
    async_engine = AsyncEngine(engine, metrics, max_queue)
    server = _Handlers(engine, async_engine, metrics, name, api_key, special_tokens_in_content,
                       request_body_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.shutdown()
            server.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="jisu", version="0.1.0", lifespan=lifespan)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.state.model_name = name
    add_error_handlers(app)
    # Added last, so outermost: a request for a foreign Host gets no further, not even a CORS answer.
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    if allowed_hosts is not None and "*" not in allowed_hosts:
        app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)

    body_models = {}

    def post(path: str, model: type[BaseModel], handler: Callable):
        body_models[path] = model
        app.add_api_route(path, handler, methods=["POST"], response_model=None, openapi_extra=body_schema(model))

    post("/v1/completions", p.CompletionRequest, server.completions)
    post("/v1/chat/completions", p.ChatCompletionRequest, server.chat_completions)
    post("/v1/responses", ResponsesRequest, Responses(server).create)
    post("/tokenize", p.TokenizeRequest, server.tokenize)
    post("/detokenize", p.DetokenizeRequest, server.detokenize)
    app.add_api_route("/v1/models", server.models, methods=["GET"], response_model=None)
    # :path, as a Hub id the server also answers to ("org/name") has a slash.
    app.add_api_route("/v1/models/{model_id:path}", server.model, methods=["GET"], response_model=None)
    app.add_api_route("/health", server.health, methods=["GET"], response_model=None)
    app.add_api_route("/metrics", server.metrics_text, methods=["GET"], response_model=None)
    add_scoring_routes(app, server, post)
    register_schemas(app, body_models.values())
    return app


# ----------------------------------------------------------------------------- handlers


class _Handlers:
    def __init__(self, engine, async_engine: AsyncEngine, metrics: ServerMetrics, model_name: str,
                 api_key: str | None, special_tokens_in_content: bool, body_timeout_s: float):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.async_engine = async_engine
        self.metrics = metrics
        self.model_name = model_name
        # Clients may also name the model as the server was started with it (a path or short name).
        given = engine.config.model
        self.model_names = {model_name} | ({str(given)} if given is not None else set())
        self.model_created = p.now()
        # Digests have one length whatever the key's, so comparing them tells a timing observer nothing of it.
        self.api_key_digest = None if api_key is None else hashlib.sha256(api_key.encode()).digest()
        self.special_tokens_in_content = special_tokens_in_content
        self.body_timeout_s = body_timeout_s
        self.token_text = p.TokenText(self.tokenizer)
        self.executor = ThreadPoolExecutor(_TOKENIZER_THREADS, thread_name_prefix="jisu-tokenize")
        bytes_per_token = max_token_bytes(self.tokenizer)
        self.max_prompt_bytes = None if bytes_per_token is None else engine.max_model_len * bytes_per_token

    # ---- shared steps --------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        if self.api_key_digest is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise p.APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                             "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        # Header values arrive as latin-1 text; encoding them back gives the bytes the client sent, so a key
        # with non-ASCII characters (sent as UTF-8) matches the same key given on the command line.
        sent = hashlib.sha256(token.strip().encode("latin-1")).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, self.api_key_digest):
            raise p.APIError(401, "invalid API key", "authentication_error", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})

    async def parse(self, request: Request, model: type[BaseModel]):
        self.authorize(request)
        content_type = request.headers.get("content-type")
        if not is_json(content_type):
            # A browser sends text/plain and form bodies cross-site without asking (no CORS preflight).
            got = "no Content-Type" if content_type is None else f"Content-Type {content_type[:100]!r}"
            raise p.APIError(415, f"the request has {got}; send the body as JSON with "
                                  f"'Content-Type: application/json'", param="content-type",
                             code="unsupported_media_type")
        body = await self.read_body(request)
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            raise p.from_validation_error(e) from None

    async def read_body(self, request: Request) -> bytes:
        """The body, at most MAX_BODY_BYTES, arriving within the body timeout. A client that hangs up meanwhile
        raises ClientDisconnect, which the app answers quietly."""
        chunks, size = [], 0
        # The rest of a refused body is never read, so the connection cannot carry another request.
        close = {"Connection": "close"}
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise p.APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                                         param="body", headers=close)
                    chunks.append(chunk)
        except TimeoutError:
            raise p.APIError(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                  f"({size} bytes came)", param="body", code="request_timeout",
                             headers=close) from None
        return b"".join(chunks)

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            # 404, as OpenAI and vLLM answer a model they do not have (OpenAI keeps the type below).
            raise p.APIError(404, f"model: {model!r} is not served here; this server serves {self.model_name!r}",
                             "invalid_request_error", param="model", code="model_not_found")

    def check_prompt_bytes(self, text: str, param: str) -> None:
        """Refuses, before tokenizing it, text too long for the context whatever its tokens are."""
        if self.max_prompt_bytes is None or len(text) * 4 <= self.max_prompt_bytes:  # 4: most bytes a char takes
            return
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_prompt_bytes:
            raise p.bad_request(
                f"{param}: {size} bytes of text cannot fit in this model's context of {self.engine.max_model_len} "
                f"tokens (no token of its vocabulary stands for more than "
                f"{self.max_prompt_bytes // self.engine.max_model_len} bytes); shorten it",
                param=param, code="context_length_exceeded")

    async def encode(self, prompt: str | list[int], add_special_tokens: bool = True,
                     param: str = "prompt") -> list[int]:
        if not isinstance(prompt, str):
            return prompt
        self.check_prompt_bytes(prompt, param)
        if len(prompt) > _LONG_TEXT:  # would stall every stream on the event loop
            return await self.off_loop(self.tokenizer.encode, prompt, add_special_tokens)
        return self.tokenizer.encode(prompt, add_special_tokens)

    async def off_loop(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def submit(self, prompts: list[list[int]], params, prefix: str, prompt_param: str, pooling=None):
        """Hands the prompts to the engine thread; returns (request id, its OutputStream). `pooling`: embed."""
        if len(prompts) > self.async_engine.max_queue:
            raise p.bad_request(
                f"prompt: {len(prompts)} prompts in one request, but this server queues at most "
                f"{self.async_engine.max_queue}", param="prompt")
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        try:
            return request_id, await self.async_engine.submit(prompts, params, request_id, pooling)
        except QueueFullError as e:
            raise p.APIError(503, str(e), "server_overloaded", code="queue_full",
                             headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except NotAcceptingError as e:
            self.metrics.request_rejected("shutting_down")
            raise p.APIError(503, str(e), "server_unavailable", code="shutting_down",
                             headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ContextLengthError as e:
            raise p.bad_request(str(e), param=_param_of(str(e), prompt_param), code="context_length_exceeded") from None
        except InvalidRequestError as e:
            raise p.bad_request(str(e), param=_param_of(str(e), prompt_param)) from None

    def event_stream(self, events: AsyncIterator[dict], stream: OutputStream) -> AbortingEventStream:
        """The events as SSE `data:` lines, ending with [DONE]; the engine requests are aborted however it ends."""
        return AbortingEventStream(sse_lines(events), lambda: self.async_engine.abort(stream))

    async def collect(self, request: Request, stream: OutputStream) -> dict | None:
        """Waits for the final outputs; None if the client went away first (its requests are aborted)."""
        result = asyncio.ensure_future(stream.final())
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
            return result.result() if result.done() else None
        finally:
            gone.cancel()
            if not result.done():
                result.cancel()
                self.async_engine.abort(stream)

    # ---- /v1/completions -----------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        req = await self.parse(request, p.CompletionRequest)
        self.check_model(req.model)
        params = _params(req)
        prompts = [await self.encode(x) for x in req.prompt]
        request_id, stream = await self.submit(prompts, params, "cmpl", "prompt")
        if req.stream:
            return self.event_stream(self._completion_events(req, request_id, stream), stream)
        finals = await self.collect(request, stream)
        if finals is None:
            return Response(status_code=499)
        outs = [finals[rid] for rid in stream.request_ids]
        choices = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                text, lp, offset = c.text, None, 0
                if req.echo:  # the prompt first, and with logprobs its tokens' logprobs first
                    text = echo_text(self.token_text, self.tokenizer, out) + c.text
                    if req.logprobs is not None:
                        lp = echo_logprobs(self.token_text, out, req.logprobs)
                        offset = lp["text_offset"][-1] + len(lp["tokens"][-1])
                if req.logprobs is not None and c.logprobs is not None:
                    lp = join_logprobs(lp, p.completion_logprobs(self.token_text, c.logprobs, offset))
                choice = {"index": i * req.n + c.index, "text": text, "logprobs": lp,
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = prompt_logprobs_json(self.token_text, out.prompt_logprobs,
                                                                     req.prompt_logprobs)
                choices.append(choice)
        return JSONResponse({
            "id": request_id, "object": "text_completion", "created": p.now(), "model": self.model_name,
            "choices": choices, **usage_and_timings(outs, stream),
        })

    async def _completion_events(self, req, request_id: str, stream: OutputStream) -> AsyncIterator[dict]:
        created = p.now()
        track = Deltas()
        base = {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name}
        finals = {}
        offsets: dict[int, int] = {}  # per choice: where its next token's text starts, as text_offset counts
        echoed: set[int] = set()  # choices that have had their first delta (echo sends the prompt with it)
        async for outs in stream.updates():
            chunks = []
            for out in outs:
                i = stream.request_ids.index(out.request_id)
                for c in out.outputs:
                    d = track.advance(i * req.n + c.index, c)
                    if d is None:
                        continue
                    lp = None
                    first = d.index not in echoed
                    echoed.add(d.index)
                    if req.echo and first:  # the prompt goes first, with the choice's first delta
                        d.text = echo_text(self.token_text, self.tokenizer, out) + d.text
                        if req.logprobs is not None:
                            lp = echo_logprobs(self.token_text, out, req.logprobs)
                            offsets[d.index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                    if req.logprobs is not None and c.logprobs is not None:
                        new = p.completion_logprobs(self.token_text, c.logprobs[d.tokens_from:d.tokens_to],
                                                    offsets.get(d.index, 0))
                        if new["tokens"]:
                            offsets[d.index] = new["text_offset"][-1] + len(new["tokens"][-1])
                        lp = join_logprobs(lp, new)
                    choice = {"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason,
                              "stop_reason": c.stop_reason if d.finish_reason else None}
                    if req.prompt_logprobs is not None and first:
                        choice["prompt_logprobs"] = prompt_logprobs_json(self.token_text, out.prompt_logprobs,
                                                                         req.prompt_logprobs)
                    chunks.append({**base, "choices": [choice]})
                if out.finished:
                    finals[out.request_id] = out
            for chunk in with_summary(chunks, stream, finals, base, req.stream_options):
                yield chunk

    # ---- /v1/chat/completions ------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        req = await self.parse(request, p.ChatCompletionRequest)
        self.check_model(req.model)
        params = _params(req)
        plan = self.tool_plan(req, params)
        prompt = await self.encode_chat(req.message_dicts(), tools=plan.template_tools)
        request_id, stream = await self.submit([prompt], params, "chatcmpl", "messages")
        if req.stream:
            return self.event_stream(self._chat_events(req, request_id, stream, plan), stream)
        finals = await self.collect(request, stream)
        if finals is None:
            return Response(status_code=499)
        out = finals[request_id]
        choices = []
        for c in out.outputs:
            lp = p.chat_logprobs(self.token_text, c.logprobs) if req.logprobs and c.logprobs is not None else None
            message, finish_reason = chat_message(c, plan)
            choices.append({"index": c.index, "message": message,
                            "logprobs": lp, "finish_reason": finish_reason, "stop_reason": c.stop_reason})
        return JSONResponse({
            "id": request_id, "object": "chat.completion", "created": p.now(), "model": self.model_name,
            "choices": choices, **usage_and_timings([out], stream),
        })

    def tool_plan(self, req, params) -> ToolPlan:
        """The request's tools checked against this model's template; a required or named call's constraint
        goes into params."""
        try:
            plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, self.tokenizer.chat_template)
        except ToolError as e:
            raise p.bad_request(str(e), param=e.param) from None
        except InvalidRequestError as e:  # the tools' constraint schema refused
            raise p.bad_request(f"tools: {e}", param="tools") from None
        if plan.structured is not None:
            if params.structured_outputs is not None:
                raise p.bad_request("tool_choice: a required or named tool call constrains the output itself; it "
                                    "cannot be combined with response_format or structured_outputs",
                                    param="tool_choice")
            params.structured_outputs = plan.structured
        return plan

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                          tools: list[dict] | None = None) -> list[int]:
        try:
            chars = sum(_content_chars(m) for m in messages) + (len(json.dumps(tools)) if tools else 0)
            if self.max_prompt_bytes is not None and chars * 4 > self.max_prompt_bytes:
                # Rendering alone (no tokenizing) tells whether the template's text can fit at all.
                text = await self.off_loop(self.tokenizer.apply_chat_template, messages, add_generation_prompt,
                                           tools)
                self.check_prompt_bytes(text, "messages")
            # Always off the event loop: the template is the model file's code and may be slow on purpose.
            return await self.off_loop(self.tokenizer.encode_chat, messages, add_generation_prompt,
                                       special_tokens_in_content=self.special_tokens_in_content, tools=tools)
        except p.APIError:
            raise
        except InvalidRequestError as e:
            raise p.bad_request(f"messages: {e}", param="messages") from None
        except JisuError as e:  # ChatTemplateError: the model's template failed or the sandbox refused it
            raise p.bad_request(str(e), param="messages", code="chat_template_error") from None
        except Exception as e:
            # The template is code from the model file; on messages it did not expect (content null, say)
            # it can raise anything, e.g. TypeError from '+' on None. That is the request meeting the template.
            raise p.bad_request(f"the model's chat template failed on these messages: {type(e).__name__}: {e}",
                                param="messages", code="chat_template_error") from None

    async def _chat_events(self, req, request_id: str, stream: OutputStream,
                           plan: ToolPlan | None = None) -> AsyncIterator[dict]:
        base = {"id": request_id, "object": "chat.completion.chunk", "created": p.now(), "model": self.model_name}
        # The role comes first, before any token, as OpenAI sends it.
        yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(req.n)]}
        track = Deltas()
        finals = {}
        # Per choice, when calls are read from the output: text that may start a call waits until it is decided.
        tool_streams: dict[int, ToolStream] | None = {} if plan is not None and plan.parser is not None else None
        async for outs in stream.updates():
            chunks = []
            for out in outs:
                for c in out.outputs:
                    d = track.advance(c.index, c)
                    if d is None:
                        continue
                    lp = None
                    if req.logprobs and c.logprobs is not None:
                        lp = p.chat_logprobs(self.token_text, c.logprobs[d.tokens_from:d.tokens_to])
                    if tool_streams is not None:
                        ts = tool_streams.setdefault(d.index, ToolStream(plan.parser))
                        chunks += tool_chunks(base, d, c, lp, ts)
                        continue
                    delta = {"content": d.text} if d.text else {}
                    chunks.append({**base, "choices": [{"index": d.index, "delta": delta, "logprobs": lp,
                                                        "finish_reason": d.finish_reason,
                                                        "stop_reason": c.stop_reason if d.finish_reason else None}]})
                if out.finished:
                    finals[out.request_id] = out
            for chunk in with_summary(chunks, stream, finals, base, req.stream_options):
                yield chunk

    # ---- other routes ----------------------------------------------------------------------------

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.model_created, "owned_by": "jisu",
                "max_model_len": self.engine.max_model_len}

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request, model_id: str) -> Response:
        """GET /v1/models/{id}: the served model under any name requests may give it, else 404."""
        self.authorize(request)
        self.check_model(model_id)
        return JSONResponse(self.model_card())

    async def tokenize(self, request: Request) -> Response:
        req = await self.parse(request, p.TokenizeRequest)
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise p.bad_request("give exactly one of prompt and messages", param="prompt")
        if req.prompt is not None:
            tokens = await self.encode(req.prompt, req.add_special_tokens)
        else:
            chat = p.ChatCompletionRequest(messages=req.messages)
            tokens = await self.encode_chat(chat.message_dicts(), req.add_generation_prompt)
        return JSONResponse({"count": len(tokens), "max_model_len": self.engine.max_model_len, "tokens": tokens})

    async def detokenize(self, request: Request) -> Response:
        req = await self.parse(request, p.DetokenizeRequest)
        self.check_model(req.model)
        vocab = self.tokenizer.vocab_size
        for i, t in enumerate(req.tokens):
            if not 0 <= t < vocab:
                raise p.bad_request(f"tokens[{i}]: token id {t} is outside the vocabulary [0, {vocab})",
                                    param=f"tokens[{i}]")
        return JSONResponse({"prompt": self.tokenizer.decode(req.tokens)})

    async def health(self) -> Response:
        if self.async_engine.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse(p.error_body("the server is shutting down", "server_unavailable"), status_code=503)

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=METRICS_CONTENT_TYPE)


# ----------------------------------------------------------------------------- request parameters


def _content_chars(message: dict) -> int:
    return len(message.get("content") or "") + len(message.get("name") or "")


def _params(req):
    try:
        return req.to_params()
    except InvalidRequestError as e:
        raise p.bad_request(str(e), param=_param_of(str(e), None)) from None


_FIELD_AT_START = re.compile(r"^([a-z_]+)(\[\d+\])?\b")


def _param_of(message: str, prompt_param: str | None) -> str | None:
    """The request field an engine message is about (its messages name the field first)."""
    if "max_tokens" in message:
        return "max_tokens"
    m = _FIELD_AT_START.match(message)
    if m is None:
        return None
    if m.group(1) == "prompt":
        return prompt_param
    return m.group(0)
