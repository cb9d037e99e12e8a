"""Per-sequence output text: streaming decode, stop strings, and how much text is safe to show so far."""

from __future__ import annotations

from jisu.request import FinishReason, Request
from jisu.tokenizer import StreamDecoder, Tokenizer


class OutputText:
    """Grows a sequence's text token by token and ends it at a stop string, which is never shown.

    NOTE: text that could be the start of a stop string is held back until it is known not to be one, so a
    streamed delta is never taken back.
    """

    def __init__(self, tokenizer: Tokenizer, request: Request):
        self.decoder: StreamDecoder = tokenizer.stream_decoder(request.prompt_token_ids)
        self.stops = request.params.stop or []
        self.hold_back = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""

    def add_token(self, request: Request, token_id: int) -> None:
        """Decodes the token; finishes the request if a stop string appeared."""
        before = len(self.decoder.text)
        self.decoder.step(token_id)
        full = self.decoder.text
        # Only a stop string that ends inside the new piece can be new; take the earliest one.
        hits = [(at, stop) for stop in self.stops if (at := full.find(stop, max(0, before - len(stop) + 1))) != -1]
        if hits:
            at, stop = min(hits)
            self.text = full[:at]
            request.finish(FinishReason.STOP, stop_reason=stop)
            return
        self.text = full

    def visible(self, finished: bool) -> str:
        if finished or not self.hold_back:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold_back)]
