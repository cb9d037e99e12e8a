"""Engine outputs as OpenAI chat/completion stream chunks: what each choice has been sent, tool calls read from the
text, the closing usage and timings, and the SSE lines that carry them."""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator

from fastapi import Request

from jisu.server import protocol as p
from jisu.server.async_engine import OutputStream
from jisu.tools import ToolPlan, ToolStream

logger = logging.getLogger("jisu.server")


# ----------------------------------------------------------------------------- tool calls


def chat_message(c, plan: ToolPlan) -> tuple[dict, str | None]:
    """A choice's message and finish reason: with the tool calls read from its text, if any."""
    if plan.parser is None:
        return {"role": "assistant", "content": c.text}, c.finish_reason
    found = plan.parser.extract(c.text)
    if not found.calls:
        return {"role": "assistant", "content": c.text}, c.finish_reason
    calls = [call.to_openai() for call in found.calls]
    return {"role": "assistant", "content": found.content, "tool_calls": calls}, "tool_calls"


def tool_chunks(base: dict, d, c, lp, ts: ToolStream) -> list[dict]:
    """The chunks for one choice's new output when calls are read from it: content and delta.tool_calls."""
    finish = d.finish_reason
    deltas = ts.feed(c.text, final=finish is not None)
    if finish is not None and ts.called:
        finish = "tool_calls"
    if not deltas and (finish is not None or lp is not None):
        deltas = [{}]
    chunks = []
    for k, delta in enumerate(deltas):
        last = k == len(deltas) - 1
        chunks.append({**base, "choices": [{
            "index": d.index, "delta": delta, "logprobs": lp if k == 0 else None,
            "finish_reason": finish if last else None,
            "stop_reason": c.stop_reason if last and finish is not None else None}]})
    return chunks


# ----------------------------------------------------------------------------- streaming


class _Delta:
    __slots__ = ("index", "text", "tokens_from", "tokens_to", "finish_reason")


class Deltas:
    """What each choice has been sent so far, and what is new in its latest cumulative output."""

    def __init__(self):
        self.chars: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.done: set[int] = set()

    def advance(self, index: int, c) -> _Delta | None:
        if index in self.done:
            return None
        sent_chars, sent_tokens = self.chars.get(index, 0), self.tokens.get(index, 0)
        text = c.text[sent_chars:]
        if not text and len(c.token_ids) == sent_tokens and c.finish_reason is None:
            return None
        d = _Delta()
        d.index, d.text, d.finish_reason = index, text, c.finish_reason
        d.tokens_from, d.tokens_to = sent_tokens, len(c.token_ids)
        self.chars[index] = len(c.text)
        self.tokens[index] = len(c.token_ids)
        if c.finish_reason is not None:
            self.done.add(index)
        return d


def with_summary(chunks: list[dict], stream: OutputStream, finals: dict, base: dict, options) -> list[dict]:
    """Adds the request's timings (and usage, if asked) to the stream's last chunk once all have finished."""
    if not stream.finished:
        return chunks
    summary = usage_and_timings([finals[rid] for rid in stream.request_ids], stream)
    if options is not None and options.include_usage:
        return chunks + [{**base, "choices": [], **summary}]
    if chunks:
        chunks[-1]["timings"] = summary["timings"]
    else:
        chunks.append({**base, "choices": [], "timings": summary["timings"]})
    return chunks


async def sse_lines(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    except Exception as e:  # the status line is already out: the error goes in the stream
        logger.exception("stream failed")
        yield f"data: {json.dumps(p.error_body(str(e), 'server_error'))}\n\n"
    yield "data: [DONE]\n\n"


def usage_and_timings(outs: list, stream: OutputStream) -> dict:
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    completion_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    t = p.timings(outs, stream.handoff_s)
    return {"usage": p.usage(prompt_tokens, completion_tokens, t["cached_prompt_tokens"]), "timings": t}


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
