"""Server-sent event responses that stream an engine request and abort it however the response ends."""

from __future__ import annotations

from typing import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class AbortingEventStream(StreamingResponse):
    """`lines` as text/event-stream; `abort` runs when the response ends: finished (then a no-op), client gone
    (starlette cancels the response), or cancelled before the first event was even produced."""

    def __init__(self, lines: AsyncIterator[str], abort: Callable[[], None]):
        super().__init__(lines, media_type="text/event-stream", headers=SSE_HEADERS)
        self._abort = abort

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._abort()
