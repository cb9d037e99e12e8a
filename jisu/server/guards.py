"""Checks on a request before a handler sees it: the Host it names (DNS rebinding), a JSON body type (a web
page's form or text/plain post is a CSRF "simple request"), and the byte length past which a prompt cannot fit
the context (refused before tokenizing megabytes)."""

from __future__ import annotations

import json
import re
from typing import Sequence

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from jisu.server import protocol as p

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


_HOST = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]*)(?::(?P<port>\d{1,5}))?")


class HostCheck:
    """Answers only requests whose Host header names an allowed host (any port). A page on evil.example whose
    name the attacker re-points at 127.0.0.1 (DNS rebinding) reaches the server as same-origin, but its
    requests still say Host: evil.example. Entries may be "*.example.com" (any subdomain)."""

    def __init__(self, app, allowed_hosts: Sequence[str]):
        self.app = app
        self.exact = {h.lower().rstrip(".") for h in allowed_hosts if not h.startswith("*.")}
        self.suffixes = tuple(h.lower()[1:] for h in allowed_hosts if h.startswith("*."))
        self.listed = ", ".join(allowed_hosts)

    def allows(self, header: str | None) -> bool:
        m = _HOST.fullmatch(header or "")
        if m is None or not m["host"]:
            return False
        host = m["host"].lower().rstrip(".")
        return host in self.exact or host.endswith(self.suffixes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = Headers(scope=scope).get("host")
        if self.allows(header):
            return await self.app(scope, receive, send)
        what = "no Host header" if header is None else f"Host {header[:100]!r}"
        message = (f"{what} is not served here: this server answers to {self.listed}; start it with "
                   f"--allowed-hosts to allow more (a browser page may be trying DNS rebinding)")
        response = JSONResponse(p.error_body(message, "invalid_request_error", "host", "invalid_host"),
                                status_code=421)
        await response(scope, receive, send)


_JSON_MEDIA_TYPE = re.compile(r"application/([a-z0-9.!#$&^_-]+\+)?json", re.IGNORECASE)


def is_json(content_type: str | None) -> bool:
    """application/json or application/<anything>+json, with or without parameters (charset)."""
    if content_type is None:
        return False
    return _JSON_MEDIA_TYPE.fullmatch(content_type.split(";", 1)[0].strip()) is not None


# Normalizers and pre-tokenizers that never drop text nor shrink it into fewer bytes than the tokens give back.
_KEEPS_TEXT = {"ByteLevel", "Metaspace", "Digits", "Prepend"}


def max_token_bytes(tokenizer) -> int | None:
    """The most bytes of text one token of `tokenizer` can stand for (plus one for a leading space a decoder
    drops), or None when text length bounds nothing: a step of the pipeline may delete or shrink text
    (whitespace splitting, lowercasing, Unicode normalization) or a fused unknown token may swallow a run."""
    hf = tokenizer.spec.tokenizer
    parts = []
    for step in (hf.normalizer, hf.pre_tokenizer):
        if step is not None:
            parts.append(json.loads(step.__getstate__()))
    while parts:
        part = parts.pop()
        kind = part.get("type")
        if kind == "Sequence":
            parts.extend(part.get("normalizers") or part.get("pretokenizers") or [])
        elif kind == "Replace":
            pattern = part.get("pattern", {}).get("String")
            if pattern is None or len(part.get("content", "").encode()) < len(pattern.encode()):
                return None
        elif kind in ("Split", "Punctuation"):
            if part.get("behavior") == "Removed":
                return None
        elif kind not in _KEEPS_TEXT:
            return None
    model = hf.model
    if type(model).__name__ != "BPE" or (getattr(model, "unk_token", None) and getattr(model, "fuse_unk", False)
                                        and not getattr(model, "byte_fallback", False)):
        return None
    pieces = hf.decode_batch([[i] for i in range(tokenizer.vocab_size)], skip_special_tokens=False)
    return max(len(piece.encode("utf-8", "surrogatepass")) for piece in pieces) + 1
