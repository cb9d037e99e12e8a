"""OpenAI wire format: request models, error bodies, and the JSON pieces of responses.

Requests are parsed strictly (no "1" -> 1, no true -> 1, no NaN) so a client bug is reported, not guessed at.
Every failure becomes an APIError whose body is OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jisu.errors import InvalidRequestError
from jisu.request import RequestOutput
from jisu.sampling_params import MAX_LOGPROBS, SamplingParams
from jisu.structured import StructuredOutputsParams, strict_schema
from jisu.tools.definitions import ToolError, template_tool_calls

# Most sequences (prompts x n) one request may start: each one holds KV blocks.
MAX_N = 64
MAX_PROMPTS = 64


# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error the client gets back as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def _loc_to_param(loc: tuple) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def from_validation_error(e: ValidationError) -> APIError:
    """The first problem pydantic found, with the field it is in as `param`."""
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    param = _loc_to_param(err["loc"])
    if param is None:
        return bad_request(f"the request body must be a JSON object: {err['msg']}", param="body")
    msg = err["msg"]
    if err["type"] == "value_error" and msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = "" if err["type"] == "missing" else f" (got {_short(err.get('input'))})"
    return bad_request(f"{param}: {msg}{got}", param=param)


# ----------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    # Unknown fields are ignored: OpenAI SDKs and agents send fields of newer API versions.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


def _check_stop(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value):
        return value
    if isinstance(value, list) and all(isinstance(s, str) and s for s in value):
        return value
    raise ValueError("must be a non-empty string or a list of non-empty strings")


class JsonSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    # "schema" would shadow a BaseModel attribute: read under another name.
    json_schema: dict | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Strict):
    """vLLM's `structured_outputs` extension: exactly one of these."""

    json_schema: Any = Field(None, alias="json")  # "json" would shadow a BaseModel method
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _SamplingFields(_Strict):
    """Fields completions and chat completions share (OpenAI's, plus vLLM's extras)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = None
    stop: Any = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    # Constrained output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return _check_stop(v)

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        given = {
            k: getattr(self, k)
            for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                      "repetition_penalty")
            if getattr(self, k) is not None
        }
        return SamplingParams(
            n=self.n,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            logit_bias=self.logit_bias or None,
            structured_outputs=self.output_constraint(),
            **given,
        )

    def output_constraint(self) -> StructuredOutputsParams | None:
        """The one constraint the request puts on its output, from whichever field gave it; two are refused."""
        given: list[tuple[str, dict]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise bad_request("response_format.json_schema.schema is required for type 'json_schema'",
                                  param="response_format.json_schema")
            schema = rf.json_schema.json_schema
            given.append(("response_format", {"json": strict_schema(schema) if rf.json_schema.strict else schema}))
        if self.structured_outputs is not None:
            fields = self.structured_outputs.model_dump(exclude_none=True, by_alias=True)
            if fields.get("json_object") is False:
                del fields["json_object"]
            given.append(("structured_outputs", fields))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                given.append((name, {key: getattr(self, name)}))
        if not given:
            return None
        if len(given) > 1:
            raise bad_request(f"give one output constraint, got {' and '.join(n for n, _ in given)}",
                              param=given[1][0])
        name, fields = given[0]
        try:
            return StructuredOutputsParams(**fields, source=name)
        except InvalidRequestError as e:
            raise bad_request(f"{name}: {e}", param=name) from None


def check_prompts(value: Any, limit: int = MAX_PROMPTS, noun: str = "prompt") -> list[str | list[int]]:
    """OpenAI's four prompt shapes (completions' prompt, embeddings' input) -> a list of prompts, each a string or
    a list of token ids."""
    def is_ids(v):
        return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(value, str):
        prompts = [value]
    elif is_ids(value) and value:
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) or (is_ids(p)) for p in value):
        prompts = list(value)
    else:
        raise ValueError("must be a non-empty string, a list of token ids, or a list of strings or of token-id lists")
    if len(prompts) > limit:
        raise ValueError(f"at most {limit} {noun}s per request, got {len(prompts)}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"{noun} {i} is empty")
    return prompts


class CompletionRequest(_SamplingFields):
    prompt: Any
    # 0 computes the prompt only: with echo and logprobs, how evaluators score a text.
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    """Return the prompt before the completion (with logprobs: the prompt tokens' logprobs first)."""
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """vLLM's extension: top-N logprobs per prompt token, as each choice's `prompt_logprobs`."""
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return check_prompts(v)

    def to_params(self) -> SamplingParams:
        self.check_common()
        if self.suffix:
            raise bad_request("suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported by this server", param="best_of")
        if len(self.prompt) * self.n > MAX_N:
            raise bad_request(
                f"n: {len(self.prompt)} prompts x n={self.n} is {len(self.prompt) * self.n} sequences; "
                f"at most {MAX_N} per request", param="n")
        params = self.sampling_params(self.max_tokens, self.logprobs)
        # echo with logprobs scores the prompt's tokens too: one top-N serves both uses.
        wanted = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        if wanted:
            params = dataclasses.replace(params, prompt_logprobs=max(wanted))
        return params


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    """A string, a list of content parts ({"type": "text", "text": ...}), or null."""
    name: str | None = None
    # Checked by hand in message_dicts, so a bad shape is named by its full path.
    tool_calls: Any = None
    """An assistant message's calls: [{"id", "type": "function", "function": {"name", "arguments"}}]."""
    tool_call_id: Any = None
    """A tool message's answer to which call."""

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        # Checked by hand: as a pydantic union its errors would name each alternative, not the field.
        if v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, dict) for x in v)):
            return v
        raise ValueError("must be a string, a list of content parts, or null")

    def text(self, where: str) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(
                    f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are supported, "
                    f"got type {part.get('type')!r}",
                    param=f"{where}.content[{j}]",
                )
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Checked by jisu.tools.plan_tools when the handler knows the chat template; errors name the field.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None

    def to_params(self) -> SamplingParams:
        self.check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
        # max_completion_tokens replaced max_tokens in OpenAI's API; None runs to the end of the context.
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs)

    def message_dicts(self) -> list[dict[str, Any]]:
        """The messages as chat templates take them (transformers' shape): assistant tool_calls with their
        arguments parsed, tool messages with their tool_call_id."""
        out = []
        for i, m in enumerate(self.messages):
            where = f"messages[{i}]"
            d: dict[str, Any] = {"role": m.role, "content": m.text(where)}
            if m.name is not None:
                d["name"] = m.name
            if m.tool_calls is not None:
                if m.role != "assistant":
                    raise bad_request(f"{where}.tool_calls: only assistant messages carry tool calls, this is a "
                                      f"{m.role!r} message", param=f"{where}.tool_calls")
                try:
                    d["tool_calls"] = template_tool_calls(m.tool_calls, where)
                except ToolError as e:
                    raise bad_request(str(e), param=e.param) from None
            if m.role == "tool":
                if not isinstance(m.tool_call_id, str) or not m.tool_call_id:
                    raise bad_request(f"{where}.tool_call_id: a tool message must say which call it answers "
                                      f"(a string), got {_short(m.tool_call_id)}", param=f"{where}.tool_call_id")
                d["tool_call_id"] = m.tool_call_id
            if d["content"] is None:
                if m.role != "assistant":
                    raise bad_request(f"{where}.content: a {m.role!r} message needs content (a string or text "
                                      f"parts); only an assistant message may have null", param=f"{where}.content")
                if not d.get("tool_calls"):
                    d["content"] = ""
            out.append(d)
        return out


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# ----------------------------------------------------------------------------- responses


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def timings(outputs: list[RequestOutput], handoff_s: float) -> dict:
    """The request's timings from its engine requests' final outputs (one per prompt).

    For a single sequence these are exactly the engine's figures; with n > 1 or several prompts the
    windows span all sequences (first scheduled, first token anywhere, last token anywhere).
    `handoff_s` is the time the request spent between the HTTP handler and the engine thread, which the
    engine's own clock starts after; it belongs to queueing, and so to the time to first token.
    Requests the server aborted have no engine metrics; their times are null, their counts still real.
    """
    seqs = [c for o in outputs for c in o.outputs]
    ms = [c.metrics for c in seqs if c.metrics is not None]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    generated = sum(len(c.token_ids) for c in seqs)
    cached = sum(max((c.metrics.cached_prompt_tokens for c in o.outputs if c.metrics), default=0) for o in outputs)
    queue = min((m.queue_time for m in ms if m.queue_time is not None), default=None)
    ttft = min((m.time_to_first_token for m in ms if m.time_to_first_token is not None), default=None)
    prefill = None if queue is None or ttft is None else ttft - queue
    if prefill is None:  # prompt-only requests (max_tokens 0: scoring, embeddings) have no first token
        prefill = max((m.prefill_time for m in ms if m.prefill_time is not None), default=None)
    ends = [m.time_to_first_token + m.decode_time for m in ms
            if m.time_to_first_token is not None and m.decode_time is not None]
    decode = max(ends) - ttft if ends and ttft is not None else None
    timed_tokens = sum(m.completion_tokens for m in ms)
    started = sum(1 for m in ms if m.completion_tokens > 0)
    return {
        "queue_ms": _ms(None if queue is None else queue + handoff_s),
        "prefill_ms": _ms(prefill),
        "time_to_first_token_ms": _ms(None if ttft is None else ttft + handoff_s),
        "decode_ms": _ms(decode),
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_per_second": prompt_tokens / prefill if prefill else None,
        "generated_tokens": generated,
        # Tokens after each sequence's first, over the window they were decoded in.
        "generation_tokens_per_second": (timed_tokens - started) / decode if decode else None,
        "cached_prompt_tokens": cached,
    }


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE (GPT-2 style) writes each byte as one printable character; this maps them back.
    Printable Latin-1 bytes stand for themselves, the other bytes take the characters from U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return table


_BYTE_LEVEL_CHARS = _byte_level_chars()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenText:
    """Token id -> its text and its exact bytes for logprobs, cached (the same ids come back often).

    The bytes matter because one token can hold part of a UTF-8 character, whose text alone is U+FFFD;
    clients join the bytes of consecutive tokens to rebuild the text.
    """

    def __init__(self, tokenizer):
        from tokenizers import decoders

        self._tok = tokenizer
        self._hf = tokenizer.spec.tokenizer
        self._byte_level = isinstance(self._hf.decoder, decoders.ByteLevel)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self._tok.decode([token_id], skip_special_tokens=False)
            hit = (text, self._bytes(token_id, text))
            if len(self._cache) > 65536:
                self._cache.clear()
            self._cache[token_id] = hit
        return hit

    def _bytes(self, token_id: int, text: str) -> list[int]:
        piece = self._hf.id_to_token(token_id)
        if piece is not None:
            m = _BYTE_FALLBACK.fullmatch(piece)  # SentencePiece's byte-fallback tokens
            if m:
                return [int(m.group(1), 16)]
            if self._byte_level and all(ch in _BYTE_LEVEL_CHARS for ch in piece):
                return [_BYTE_LEVEL_CHARS[ch] for ch in piece]
        return list(text.encode("utf-8"))


def completion_logprobs(token_text: TokenText, entries: list, text_offset: int) -> dict:
    """The legacy completions shape: parallel lists of tokens, their logprobs, top alternatives, offsets."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        text = token_text(e.token_id)[0]
        tokens.append(text)
        token_logprobs.append(e.logprob)
        alternatives: dict[str, float] = {}
        for tid, lp in e.top:
            alternatives.setdefault(token_text(tid)[0], lp)
        top.append(alternatives)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(token_text: TokenText, entries: list) -> dict:
    """The chat shape: one object per token with its top alternatives."""
    content = []
    for e in entries:
        text, raw = token_text(e.token_id)
        alternatives = []
        for tid, lp in e.top:
            t, b = token_text(tid)
            alternatives.append({"token": t, "logprob": lp, "bytes": b})
        content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": alternatives})
    return {"content": content}
