"""POST /v1/responses: OpenAI's Responses API for text, over the chat path (chat template, sampling, engine).

`input` (a string or a list of message items) and `instructions` become chat messages; the answer is one
assistant message with one output_text part. Nothing is stored: fields that need a stored response
(previous_response_id, conversation, background) and those asking for what this server cannot do (tools, a
JSON text format, reasoning, extra `include` outputs) are refused with a 400 naming the field, rather than
ignored; fields that change nothing here (store, metadata, user, ...) are accepted.

Streaming sends the API's named server-sent events, `event: <type>` then `data: <json>`, each with a
sequence_number, from response.created to response.completed (response.incomplete when cut at
max_output_tokens, response.failed when the server stopped it); there is no `data: [DONE]` line.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, field_validator

from jisu.errors import InvalidRequestError
from jisu.sampling_params import SamplingParams
from jisu.server import protocol as p
from jisu.server.async_engine import OutputStream
from jisu.server.sse import AbortingEventStream

logger = logging.getLogger("jisu.server")

_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text")


# ----------------------------------------------------------------------------- the request


def _check_input(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        return value
    raise ValueError("must be a string or a non-empty list of input items (objects)")


class ResponsesRequest(p._Strict):
    model: str | None = None
    input: Any
    """A string (one user message) or a list of message items: {"role", "content"} with content a string
    or a list of input_text / output_text parts, optionally with "type": "message"."""
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    # vLLM's extras, as on the other routes.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = None
    ignore_eos: bool = False
    # Accepted; they change nothing here (nothing is stored).
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Refused unless they ask for nothing (checked in check_supported).
    tools: list[Any] | None = None
    tool_choice: Any = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    text: Any = None
    reasoning: Any = None
    include: list[Any] | None = None
    top_logprobs: int | None = None
    truncation: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        return _check_input(v)

    def check_supported(self) -> None:
        def refuse(param: str, why: str):
            raise p.bad_request(f"{param}: {why}", param=param)

        if self.tools:
            refuse("tools", "tools are not supported by this server")
        if self.tool_choice not in (None, "none", "auto"):
            refuse("tool_choice", "this server runs no tools; only 'none' or 'auto' (without tools) are accepted")
        if self.previous_response_id is not None:
            refuse("previous_response_id", "this server stores no responses; send the whole conversation in input")
        if self.conversation is not None:
            refuse("conversation", "this server stores no conversations; send the whole conversation in input")
        if self.background:
            refuse("background", "background responses are not supported by this server; use stream instead")
        if self.prompt is not None:
            refuse("prompt", "stored prompt templates are not supported by this server; send the text in input")
        if self.reasoning is not None:
            refuse("reasoning", "reasoning options are not supported by this server")
        if self.include:
            refuse("include", "no extra outputs can be included by this server")
        if self.top_logprobs:
            refuse("top_logprobs", "logprobs are not supported on /v1/responses by this server; "
                                   "use /v1/chat/completions")
        if self.truncation not in (None, "disabled"):
            refuse("truncation", "only 'disabled' is supported: an input that does not fit is refused, not cut")
        if self.text is not None:
            fmt = self.text.get("format") if isinstance(self.text, dict) else None
            kind = fmt.get("type") if isinstance(fmt, dict) else None
            if not isinstance(self.text, dict) or (fmt is not None and kind != "text"):
                refuse("text.format", f"only the 'text' format is supported, got {kind!r}")

    def sampling_params(self) -> SamplingParams:
        given = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                 if getattr(self, k) is not None}
        try:
            return SamplingParams(n=1, seed=self.seed, max_tokens=self.max_output_tokens,
                                  ignore_eos=self.ignore_eos, **given)
        except InvalidRequestError as e:
            raise p.bad_request(str(e)) from None

    def message_dicts(self) -> list[dict[str, Any]]:
        """Chat messages: the instructions as a system message first, then the input."""
        out = [] if self.instructions is None else [{"role": "system", "content": self.instructions}]
        if isinstance(self.input, str):
            return out + [{"role": "user", "content": self.input}]
        return out + [_message(item, f"input[{i}]") for i, item in enumerate(self.input)]


def _message(item: dict, where: str) -> dict[str, Any]:
    kind = item.get("type", "message")
    if kind != "message":
        raise p.bad_request(f"{where}.type: only message items are supported by this server, got {kind!r}",
                            param=f"{where}.type")
    role = item.get("role")
    if role not in _ROLES:
        raise p.bad_request(f"{where}.role: must be one of {', '.join(_ROLES)}, got {role!r}", param=f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise p.bad_request(f"{where}.content: must be a string or a list of content parts", param=f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise p.bad_request(
                f"{where}.content[{j}]: only text parts ({{'type': 'input_text', 'text': ...}}) are supported, "
                f"got type {kind!r}", param=f"{where}.content[{j}]")
        texts.append(part["text"])
    return {"role": role, "content": "".join(texts)}


# ----------------------------------------------------------------------------- the handler


class Responses:
    """The /v1/responses handler over the app's shared steps (parse, model check, chat encoding, submit)."""

    def __init__(self, server):
        self.server = server

    async def create(self, request: Request) -> Response:
        s = self.server
        req = await s.parse(request, ResponsesRequest)
        s.check_model(req.model)
        req.check_supported()
        params = req.sampling_params()
        try:
            prompt = await s.encode_chat(req.message_dicts())
            _, stream = await s.submit([prompt], params, "resp", "input")
        except p.APIError as e:
            raise _renamed(e) from None
        answer = _Answer(req, s.model_name)
        if req.stream:
            return AbortingEventStream(_sse_lines(self._events(answer, stream)), lambda: s.async_engine.abort(stream))
        finals = await s.collect(request, stream)
        if finals is None:
            return Response(status_code=499)
        out = finals[stream.request_ids[0]]
        return JSONResponse(answer.finish(out, stream))

    async def _events(self, answer: _Answer, stream: OutputStream) -> AsyncIterator[dict]:
        yield {"type": "response.created", "response": answer.snapshot()}
        yield {"type": "response.in_progress", "response": answer.snapshot()}
        yield {"type": "response.output_item.added", "output_index": 0, "item": answer.item("in_progress", [])}
        where = {"item_id": answer.message_id, "output_index": 0, "content_index": 0}
        yield {"type": "response.content_part.added", **where, "part": _text_part("")}
        sent = 0
        final = None
        async for outs in stream.updates():
            out = outs[-1]
            text = out.outputs[0].text
            if len(text) > sent:
                yield {"type": "response.output_text.delta", **where, "delta": text[sent:], "logprobs": []}
                sent = len(text)
            if out.finished:
                final = out
        if final is None:  # updates() ends only once every request has finished
            raise RuntimeError("the stream ended without a final output")
        body = answer.finish(final, stream)
        item = body["output"][0]
        text = item["content"][0]["text"]
        yield {"type": "response.output_text.done", **where, "text": text, "logprobs": []}
        yield {"type": "response.content_part.done", **where, "part": item["content"][0]}
        yield {"type": "response.output_item.done", "output_index": 0, "item": item}
        last = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(body["status"],
                                                                                          "response.failed")
        yield {"type": last, "response": body}


def _renamed(e: p.APIError) -> p.APIError:
    """An error of the shared chat steps, in this API's field names (input, max_output_tokens)."""
    param, message = e.param, e.message
    if param == "messages":
        param = "input"
        if message.startswith("messages: "):
            message = "input: " + message[len("messages: "):]
    elif param == "max_tokens":
        param = "max_output_tokens"
        message = message.replace("max_tokens", "max_output_tokens")
    return p.APIError(e.status, message, e.type, param, e.code, e.headers)


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _Answer:
    """The response object of one request, as it is while running and once it has finished."""

    def __init__(self, req: ResponsesRequest, model_name: str):
        self.req = req
        self.model_name = model_name
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = p.now()

    def item(self, status: str, content: list[dict]) -> dict:
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def snapshot(self, status: str = "in_progress", output: list | None = None) -> dict:
        req = self.req
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {}, "model": self.model_name,
            "output": output or [], "parallel_tool_calls": False, "previous_response_id": None, "reasoning": None,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": "none", "tools": [], "truncation": "disabled",
            "usage": None, "user": req.user,
        }

    def finish(self, out, stream: OutputStream) -> dict:
        c = out.outputs[0]
        if c.finish_reason == "stop":
            status, item_status = "completed", "completed"
        elif c.finish_reason == "length":
            status, item_status = "incomplete", "incomplete"
        else:  # "abort": the server stopped it (shutting down)
            status, item_status = "failed", "incomplete"
        body = self.snapshot(status, [self.item(item_status, [_text_part(c.text)])])
        if status == "completed":
            body["completed_at"] = p.now()
        elif status == "incomplete":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            body["error"] = {"code": "server_error", "message": "the server stopped this response before it "
                                                                "finished (it is shutting down)"}
        timings = p.timings([out], stream.handoff_s)
        input_tokens, output_tokens = len(out.prompt_token_ids), len(c.token_ids)
        body["usage"] = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": timings["cached_prompt_tokens"], "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }
        body["timings"] = timings
        return body


# ----------------------------------------------------------------------------- streaming


async def _sse_lines(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    seq = 0

    def line(event: dict) -> str:
        nonlocal seq
        event = {**event, "sequence_number": seq}
        seq += 1
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    try:
        async for event in events:
            yield line(event)
    except Exception as e:  # the status line is already out: the error goes in the stream
        logger.exception("stream failed")
        yield line({"type": "error", "code": "server_error", "message": str(e) or type(e).__name__, "param": None})

