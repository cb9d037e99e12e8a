"""Tool calls read from a model's output, whole or as it streams.

Formats, picked from the chat template's text as vLLM picks its tool parsers:
  - hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen 2.5 / 3), after
    optional text, which becomes the message's content;
  - llama3 / generic JSON: the output is a JSON call `{"name": ..., "parameters" | "arguments": {...}}`
    (after Llama 3's `<|python_tag|>` if it shows as text; several separated by ';'), or a JSON list of them
    (Mistral's [TOOL_CALLS] list, and a required call's constrained output);
  - named: a named call's constrained output, which is the arguments object alone.

A call's `arguments` is the JSON text of its arguments object exactly as the model wrote it, so the pieces
streamed add up to what a non-streamed answer returns. Calls must name one of the request's tools; output
that does not hold a valid call is content.

While streaming, `partial` says what is certain so far: content that no later text can turn into a call
(text that may be the start of one is held back), and calls whose name is known, with the part of the
arguments written so far. `ToolStream` turns the changes into OpenAI's delta.tool_calls chunks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import json
import re
import uuid
from dataclasses import dataclass, field

_WS = " \t\n\r"
_PRIMITIVE = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
ARGUMENT_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex}"


@dataclass
class ToolCall:
    name: str
    arguments: str
    """The arguments object as JSON text."""
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ExtractedCalls:
    content: str | None
    """The text besides the calls (with calls: the text before them, None if only whitespace)."""
    calls: list[ToolCall]


@dataclass
class PartialCall:
    name: str
    arguments: str
    """As much of the arguments' JSON text as is certain; grows as the model writes."""


@dataclass
class PartialOutput:
    content: str
    calls: list[PartialCall]


# ----------------------------------------------------------------------------- JSON scanning


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _string_end(s: str, i: int) -> int | None:
    j = i + 1
    while j < len(s):
        if s[j] == "\\":
            j += 2
        elif s[j] == '"':
            return j + 1
        else:
            j += 1
    return None


def _value_end(s: str, i: int) -> int | None:
    """Where the JSON value starting at s[i] ends; None if the text ends inside it; ValueError if not JSON."""
    c = s[i]
    if c == '"':
        return _string_end(s, i)
    if c in "{[":
        closers, j = [], i
        while j < len(s):
            ch = s[j]
            if ch == '"':
                end = _string_end(s, j)
                if end is None:
                    return None
                j = end
                continue
            if ch in "{[":
                closers.append("}" if ch == "{" else "]")
            elif ch in "}]":
                if not closers or closers.pop() != ch:
                    raise ValueError("mismatched bracket")
                if not closers:
                    return j + 1
            j += 1
        return None
    m = _PRIMITIVE.match(s, i)
    if m and m.end() < len(s):
        return m.end()
    rest = s[i:]
    if m or any(w.startswith(rest) for w in ("true", "false", "null")):
        return None  # a number or literal the next text may continue
    raise ValueError("not a JSON value")


def _scan_object(s: str, i: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The object starting at s[i] == '{': each key's value span (end None: unfinished) and the object's end."""
    fields: dict[str, tuple[int, int | None]] = {}
    j = i + 1
    while True:
        j = _skip_ws(s, j)
        if j >= len(s):
            return fields, None
        if s[j] == "}":
            return fields, j + 1
        if s[j] != '"':
            raise ValueError("expected a key")
        end = _string_end(s, j)
        if end is None:
            return fields, None
        key = json.loads(s[j:end])
        j = _skip_ws(s, end)
        if j >= len(s):
            return fields, None
        if s[j] != ":":
            raise ValueError("expected ':'")
        j = _skip_ws(s, j + 1)
        if j >= len(s):
            return fields, None
        value_end = _value_end(s, j)
        fields[key] = (j, value_end)
        if value_end is None:
            return fields, None
        j = _skip_ws(s, value_end)
        if j >= len(s):
            return fields, None
        if s[j] == ",":
            j += 1
        elif s[j] == "}":
            return fields, j + 1
        else:
            raise ValueError("expected ',' or '}'")


def _partial_call(s: str, i: int, names: frozenset[str]) -> tuple[PartialCall | None, int | None]:
    """The call object at s[i] as far as it is written (None until its name is), and where it ends."""
    fields, end = _scan_object(s, i)
    span = fields.get("name")
    if span is None or span[1] is None:
        return None, end
    name = json.loads(s[span[0]:span[1]])
    if name not in names:
        return None, end
    key = next((k for k in ARGUMENT_KEYS if k in fields), None)
    arguments = ""
    if key is not None:
        a, b = fields[key]
        if s[a] == "{":  # an object streams as written; a JSON string holding one waits until it is whole
            arguments = s[a:b] if b is not None else s[a:]
    return PartialCall(name, arguments), end


def _final_call(s: str, i: int, names: frozenset[str]) -> ToolCall | None:
    """The call object at s[i], or None if it is not a valid call of one of the tools. An object the output
    broke off after its arguments (max_tokens, a stop string) still counts: its name and arguments are whole."""
    try:
        fields, end = _scan_object(s, i)
        if end is not None and not isinstance(json.loads(s[i:end]), dict):
            return None
    except ValueError:
        return None
    span = fields.get("name")
    if span is None or span[1] is None:
        return None
    name = json.loads(s[span[0]:span[1]])
    if name not in names:
        return None
    key = next((k for k in ARGUMENT_KEYS if k in fields), None)
    if key is None:
        return ToolCall(name, "{}") if end is not None else None
    a, b = fields[key]
    if b is None:
        return None
    try:
        value = json.loads(s[a:b])
        if isinstance(value, dict):
            return ToolCall(name, s[a:b])
        if isinstance(value, str) and isinstance(json.loads(value), dict):  # a JSON string, as OpenAI writes them
            return ToolCall(name, value)
    except ValueError:
        pass
    return None


def _call_objects(s: str, i: int) -> list[tuple[int, int | None]]:
    """Spans of the call objects at s[i]: one object, objects separated by ';', or a JSON list of objects.
    The last end is None if the text ends inside it; ValueError if the text is not of that shape."""
    spans: list[tuple[int, int | None]] = []
    in_list = s[i] == "["
    j = _skip_ws(s, i + 1) if in_list else i
    while j < len(s):
        if in_list and s[j] == "]":
            break
        if s[j] != "{":
            raise ValueError("expected an object")
        end = _scan_object(s, j)[1]
        spans.append((j, end))
        if end is None:
            break
        j = _skip_ws(s, end)
        if j < len(s) and s[j] == (","  if in_list else ";"):
            j = _skip_ws(s, j + 1)
        else:
            break
    return spans


# ----------------------------------------------------------------------------- parsers


class ToolParser(ABC):
    """Reads calls of the given tools out of a model's output; each call format is a subclass."""

    name = "base"
    args_key = "arguments"
    """The key a required call's constrained items name the arguments by."""

    def __init__(self, names, parallel: bool = True):
        self.names = frozenset(names)
        self.parallel = parallel

    @abstractmethod
    def extract(self, text: str) -> ExtractedCalls:
        """The calls in a finished output, and the text around them."""

    @abstractmethod
    def partial(self, text: str) -> PartialOutput:
        """What a still-growing output shows so far: calls begun, and text that can be sent."""

    def constrained(self) -> "ToolParser":
        """The parser for a required call's grammar-constrained output (a JSON list of calls)."""
        return JsonCallParser(self.names, self.parallel, self.args_key)

    def _limit(self, calls: list) -> list:
        return calls if self.parallel else calls[:1]


def _held_back(text: str, marker: str) -> int:
    """Where text stops being sure not to start `marker`: before its longest suffix that begins the marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return len(text) - k
    return len(text)


def _certain(calls: list[PartialCall | None]) -> list[PartialCall]:
    out = []
    for c in calls:
        if c is None:  # a call whose name is not known yet; the ones after it wait for it
            break
        out.append(c)
    return out


class HermesParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, as Hermes and Qwen templates ask."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def _bodies(self, text: str, first: int, final: bool = True) -> list[tuple[int, int]]:
        """Each call block's body; an unclosed one runs to the end (while streaming: to where the text may
        start its closing tag)."""
        bodies, k = [], first
        while k >= 0:
            start = k + len(self.OPEN)
            close = text.find(self.CLOSE, start)
            end = len(text) if final else max(start, _held_back(text, self.CLOSE))
            bodies.append((start, end if close < 0 else close))
            if close < 0:
                break
            k = text.find(self.OPEN, close + len(self.CLOSE))
        return bodies

    def extract(self, text: str) -> ExtractedCalls:
        first = text.find(self.OPEN)
        if first < 0:
            return ExtractedCalls(text, [])
        calls = []
        for start, stop in self._bodies(text, first):
            body = text[:stop]
            i = _skip_ws(body, start)
            if i >= len(body) or body[i] != "{":
                continue
            call = _final_call(body, i, self.names)
            if call is not None:
                calls.append(call)
        if not calls:
            return ExtractedCalls(text, [])
        return ExtractedCalls(text[:first].rstrip() or None, self._limit(calls))

    def partial(self, text: str) -> PartialOutput:
        first = text.find(self.OPEN)
        if first < 0:
            return PartialOutput(text[:_held_back(text, self.OPEN)].rstrip(), [])
        calls: list[PartialCall | None] = []
        for start, stop in self._bodies(text, first, final=False):
            body = text[:stop]
            i = _skip_ws(body, start)
            if i >= len(body) or body[i] != "{":
                calls.append(None)
                break
            try:
                calls.append(_partial_call(body, i, self.names)[0])
            except ValueError:
                calls.append(None)
                break
        return PartialOutput(text[:first].rstrip(), self._limit(_certain(calls)))


class JsonCallParser(ToolParser):
    """The output is a JSON call, calls separated by ';', or a JSON list of calls (Llama 3, Mistral, generic)."""

    name = "json"
    PREFIXES = ("<|python_tag|>", "[TOOL_CALLS]", "```json", "```")

    def __init__(self, names, parallel: bool = True, args_key: str = "arguments"):
        super().__init__(names, parallel)
        self.args_key = args_key
        self.name = "llama3" if args_key == "parameters" else "json"

    def _start(self, text: str) -> tuple[int | None, bool]:
        """Where the JSON starts (None: the output is text) and whether that is still undecided."""
        i = _skip_ws(text, 0)
        for prefix in self.PREFIXES:
            rest = text[i:]
            if rest.startswith(prefix):
                i = _skip_ws(text, i + len(prefix))
                break
            if prefix.startswith(rest):
                return None, True
        if i >= len(text):
            return None, True
        return (i, False) if text[i] in "{[" else (None, False)

    def extract(self, text: str) -> ExtractedCalls:
        i, _ = self._start(text)
        if i is None:
            return ExtractedCalls(text, [])
        try:
            spans = _call_objects(text, i)
        except ValueError:
            return ExtractedCalls(text, [])
        calls = [_final_call(text, a, self.names) for a, _ in spans]
        if not calls or None in calls:
            return ExtractedCalls(text, [])
        return ExtractedCalls(None, self._limit(calls))

    def partial(self, text: str) -> PartialOutput:
        i, undecided = self._start(text)
        if undecided:
            return PartialOutput("", [])
        if i is None:
            return PartialOutput(text.rstrip(), [])
        calls: list[PartialCall | None] = []
        try:
            for a, _ in _call_objects(text, i):
                calls.append(_partial_call(text, a, self.names)[0])
        except ValueError:
            calls.append(None)
        return PartialOutput("", self._limit(_certain(calls)))


class NamedCallParser(ToolParser):
    """A named call's constrained output: the function's arguments object alone."""

    name = "named"

    def __init__(self, function: str):
        super().__init__([function], parallel=False)
        self.function = function

    def _span(self, text: str) -> tuple[int, int | None]:
        i = _skip_ws(text, 0)
        if i >= len(text) or text[i] != "{":
            return i, None
        try:
            return i, _value_end(text, i)
        except ValueError:
            return i, None

    def extract(self, text: str) -> ExtractedCalls:
        i, end = self._span(text)
        try:
            ok = end is not None and isinstance(json.loads(text[i:end]), dict)
        except ValueError:
            ok = False
        if not ok:
            return ExtractedCalls(text, [])
        return ExtractedCalls(None, [ToolCall(self.function, text[i:end])])

    def partial(self, text: str) -> PartialOutput:
        i, end = self._span(text)
        arguments = text[i:end] if i < len(text) and text[i] == "{" else ""
        return PartialOutput("", [PartialCall(self.function, arguments)])


def parser_for_template(template: str | None, names, parallel: bool = True) -> ToolParser:
    """The parser for the call format a chat template asks its model for (generic JSON if it names none)."""
    source = template or ""
    if "<tool_call>" in source:
        return HermesParser(names, parallel)
    if "<|python_tag|>" in source or "ipython" in source:
        return JsonCallParser(names, parallel, args_key="parameters")
    return JsonCallParser(names, parallel, args_key="arguments")


# ----------------------------------------------------------------------------- streaming


class ToolStream:
    """One choice's stream: feed it the whole text so far; it returns the OpenAI deltas for what is new."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.content = ""
        self.sent: list[list] = []  # per call: [name, arguments sent]

    @property
    def called(self) -> bool:
        return bool(self.sent)

    def feed(self, text: str, final: bool = False) -> list[dict]:
        if final:
            done = self.parser.extract(text)
            content = (done.content or "") if done.calls else text
            if not done.calls and self.sent:
                # Started as a call but did not end as one (cut short, say): it was sent as a call, not content.
                content = self.content
            calls = [(c.name, c.arguments) for c in done.calls]
        else:
            now = self.parser.partial(text)
            content, calls = now.content, [(c.name, c.arguments) for c in now.calls]
        deltas: list[dict] = []
        if len(content) > len(self.content) and content.startswith(self.content):
            deltas.append({"content": content[len(self.content):]})
            self.content = content
        for index, (name, arguments) in enumerate(calls):
            if index == len(self.sent):
                deltas.append({"tool_calls": [{"index": index, "id": new_call_id(), "type": "function",
                                               "function": {"name": name, "arguments": arguments}}]})
                self.sent.append([name, arguments])
                continue
            sent_name, sent_arguments = self.sent[index]
            if sent_name == name and len(arguments) > len(sent_arguments) and arguments.startswith(sent_arguments):
                deltas.append({"tool_calls": [{"index": index,
                                               "function": {"arguments": arguments[len(sent_arguments):]}}]})
                self.sent[index][1] = arguments
        return deltas
