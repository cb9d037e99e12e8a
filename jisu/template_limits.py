"""The bounds a chat template runs under, and the meter that enforces them during one compile or render: limits,
the errors that name them, and estimates of an operation's result size made before it runs (chat_template.py
wires them into jinja2's sandbox)."""

from __future__ import annotations

import contextvars
import inspect
import time
from collections.abc import MappingView
from typing import Any

from jinja2.sandbox import SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import Namespace

from jisu.errors import JisuError

# Real templates are a few kB to a few tens of kB (a few thousand Jinja tokens). Parsing and compiling take
# time per token, about 2 s for 50,000 on a slow machine; the character cap only bounds reading the text.
MAX_TEMPLATE_CHARS = 1_000_000
MAX_TEMPLATE_TOKENS = 50_000
# Lexing, parsing and generating code check this deadline; Python's compile() of the result is bounded by
# the token cap.
COMPILE_SECONDS = 5.0
# A chat template renders in milliseconds; seconds means a loop bomb, and it blocks the request meanwhile.
RENDER_SECONDS = 2.0
# The rendered prompt: 1 MB of template text plus room for the messages it quotes (twice: e.g. raw and JSON).
MAX_OUTPUT_CHARS = 1_000_000
OUTPUT_CHARS_PER_INPUT_CHAR = 2
# Everything a render builds (strings, lists, output), summed over the render and never given back, in
# characters (a list element counts 8): bounds memory even when values are dropped and rebuilt.
WORK_PER_OUTPUT_CHAR = 16
# Loop iterations in one render, over all loops together; ranges longer than this are refused outright.
MAX_LOOP_ITERATIONS = 1_000_000
# Nested calls (macros calling macros, recursive loops); real templates nest a few levels for JSON schemas.
MAX_CALL_DEPTH = 50
# Nesting of lists and dicts a template may print or serialize.
MAX_NESTING = 100
# Integers from ** and *: 4096 bits is ~1200 digits; chat templates count messages, they do not need bignums.
MAX_INT_BITS = 4096
# indent/separators of tojson, and strftime_now formats: long ones only multiply the output.
MAX_FORMAT_ARG_CHARS = 64
# A Python object inside a list or dict: its pointer, or the ", " it prints as.
ELEMENT_CHARS = 8
# Error messages quote template-made text (raise_exception); keep them readable.
MAX_MESSAGE_CHARS = 500


class ChatTemplateError(JisuError):
    """The model's chat template failed to render or tried something the sandbox forbids."""


class ChatTemplateLimitError(ChatTemplateError):
    """The chat template went over one of this module's limits (the message names which)."""


METER: contextvars.ContextVar["Meter | None"] = contextvars.ContextVar("jisu_chat_template_meter", default=None)


class Meter:
    """Time, work and size accounting for one compile or render."""

    def __init__(self, seconds: float, max_chars: int, phase: str):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.max_chars = max_chars
        self.budget = max_chars * WORK_PER_OUTPUT_CHAR
        self.used = 0
        self.iterations = 0
        self.depth = 0
        self.phase = phase
        # Sizes of large containers already measured, keyed by id; the value keeps the object alive so the
        # id cannot be reused during the render. Containers the template sees cannot be mutated (immutable
        # sandbox), except namespaces, which are never cached.
        self._sizes: dict[int, tuple[Any, int]] = {}

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateLimitError(f"the chat template's {self.phase} took longer than {self.seconds:g} s")

    def check_chars(self, n: int, what: str) -> None:
        """Refuse before building something of about n characters that would be over a limit."""
        if n > self.max_chars:
            raise ChatTemplateLimitError(
                f"{what} would be {n:,} characters, over the chat template limit of {self.max_chars:,}"
            )
        if self.used + n > self.budget:
            self._over_budget(n)

    def check(self, value: Any, what: str) -> int:
        n = self.size(value)
        self.check_chars(n, what)
        return n

    def charge(self, n: int) -> None:
        self.used += n
        if self.used > self.budget:
            self._over_budget(0)

    def _over_budget(self, n: int) -> None:
        raise ChatTemplateLimitError(
            f"the chat template built more than {self.budget:,} characters of values in one {self.phase} "
            f"({self.used + n:,} so far)"
        )

    def count_iteration(self, weight: int) -> None:
        self.iterations += 1
        if self.iterations > MAX_LOOP_ITERATIONS:
            raise ChatTemplateLimitError(
                f"the chat template ran more than {MAX_LOOP_ITERATIONS:,} loop iterations in one {self.phase}"
            )
        self.tick()
        self.charge(weight)

    def size(self, value: Any) -> int:
        """About how many characters value prints as (and so, within a small factor, how much memory it holds).

        Shared references count once per reference, as printing or serializing repeats them. Stops counting
        past the budget, so measuring is never much more work than the work already charged.
        """
        return self._size(value, 0, self.budget + 1)

    def _size(self, value: Any, depth: int, cap: int) -> int:
        if isinstance(value, str):
            return len(value)
        if isinstance(value, (bytes, bytearray)):
            return 4 * len(value)  # repr writes \xNN
        if isinstance(value, bool) or value is None:
            return ELEMENT_CHARS
        if isinstance(value, int):
            return value.bit_length() // 3 + 2  # decimal digits, over-estimated
        if isinstance(value, float):
            return 24
        if isinstance(value, range):
            try:
                return ELEMENT_CHARS * (len(value) + 1)
            except OverflowError:
                return cap
        if isinstance(value, Namespace):  # mutable: measured afresh each time
            value, cacheable = object.__getattribute__(value, "_Namespace__attrs"), False
        elif isinstance(value, MappingView) and isinstance(getattr(value, "mapping", None), dict):
            value, cacheable = value.mapping, True  # d.items() prints every item
        elif isinstance(value, (list, tuple, dict, set, frozenset)):
            cacheable = True
        else:
            return 64  # anything else prints as a short repr
        if cacheable and (cached := self._sizes.get(id(value))) is not None:
            return cached[1]
        if depth >= MAX_NESTING:
            raise ChatTemplateLimitError(f"the chat template used values nested more than {MAX_NESTING} levels deep")
        total = ELEMENT_CHARS * (len(value) + 1)
        if isinstance(value, dict):
            parts: Any = (x for kv in value.items() for x in kv)
        else:
            parts = value
        for x in parts:
            total += ELEMENT_CHARS + self._size(x, depth + 1, cap)
            if total >= cap:
                total = cap
                break
        if cacheable and len(value) >= 16:
            self._sizes[id(value)] = (value, total)
        return total


def current_meter() -> Meter:
    meter = METER.get()
    if meter is None:  # guarded code reached outside ChatTemplate.render / compile
        raise ChatTemplateError("chat template code ran outside a metered render")
    return meter


def limit_message(e: BaseException) -> str:
    text = str(e)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


# ----------------------------------------------------------------------------- size estimates before work


def int_bits(x: Any) -> int:
    return abs(x).bit_length() if isinstance(x, int) else 0


def check_pow(m: Meter, base: Any, exp: Any) -> None:
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1:
        bits = base.bit_length() * exp if exp < MAX_INT_BITS + 1 else MAX_INT_BITS + 1
        if bits > MAX_INT_BITS:
            raise ChatTemplateLimitError(
                f"the chat template computed a power ({short_int(base)} ** {short_int(exp)}) over the "
                f"{MAX_INT_BITS}-bit integer limit"
            )


def short_int(x: int) -> str:
    return str(x) if x.bit_length() < 64 else f"<{x.bit_length()}-bit integer>"


def check_mul(m: Meter, left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int):
        if int_bits(left) + int_bits(right) > MAX_INT_BITS:
            raise ChatTemplateLimitError(f"the chat template multiplied integers past the {MAX_INT_BITS}-bit limit")
        return
    for seq, n in ((left, right), (right, left)):
        if isinstance(n, int) and isinstance(seq, (str, bytes, list, tuple)):
            if n > 0:
                m.check_chars(m.size(seq) * n, "a repeated string or list (*)")
            return


def check_add(m: Meter, left: Any, right: Any) -> None:
    if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
        m.check_chars(m.size(left) + m.size(right), "a concatenation (+)")


def printf_specs(fmt: str) -> list[tuple[str | None, int, int, str]]:
    """The conversions of a %-format string as (mapping key, width, precision, type), as Python parses them."""
    specs = []
    i, n = 0, len(fmt)
    while True:
        i = fmt.find("%", i)
        if i < 0 or i + 1 >= n:
            return specs
        i += 1
        key = None
        if fmt[i] == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                depth += {"(": 1, ")": -1}.get(fmt[j], 0)
                j += 1
            key, i = fmt[i + 1 : j - 1], j
        while i < n and fmt[i] in "#0- +":
            i += 1
        numbers = []
        for lead in ("", "."):
            if lead:
                if i >= n or fmt[i] != ".":
                    numbers.append(0)
                    continue
                i += 1
            if i < n and fmt[i] == "*":
                raise ChatTemplateLimitError("the chat template used a '*' width in % formatting, which is not allowed")
            j = i
            while j < n and fmt[j].isdigit():
                j += 1
            numbers.append(0 if j == i else int(fmt[i:j]) if j - i < 19 else 10**18)
            i = j
        while i < n and fmt[i] in "hlL":
            i += 1
        if i < n:
            specs.append((key, numbers[0], numbers[1], fmt[i]))
            i += 1


def check_printf(m: Meter, fmt: Any, args: Any) -> None:
    """Refuse a % formatting whose result would be over the limits, before Python builds it."""
    if not isinstance(fmt, str):
        return
    total = len(fmt)
    position = 0
    for key, width, precision, kind in printf_specs(fmt):
        if kind == "%":
            continue
        if key is not None:
            try:
                arg = args[key]
            except Exception:
                arg = None  # Python raises its own error for a missing key
        elif isinstance(args, tuple):
            arg = args[position] if position < len(args) else None
            position += 1
        else:
            arg = args
        arg_chars = m.size(arg) * (10 if kind in "ra" else 1)  # repr escapes
        total += width + precision + arg_chars + (320 if kind in "fF" else 0)  # %f of 1e308 has 309 digits
        m.check_chars(total, "a % formatted string")


def check_format_spec(m: Meter, value: Any, spec: str, so_far: int) -> int:
    """Size of str.format's result for one field, estimated from the spec's width and precision."""
    digits, numbers = "", []
    for c in spec + "\0":
        if c.isdigit():
            digits += c
        elif digits:
            numbers.append(int(digits) if len(digits) < 19 else 10**18)
            digits = ""
    est = so_far + sum(numbers) + m.size(value) + (320 if spec.endswith(("f", "F", "%")) else 0)
    m.check_chars(est, "a str.format result")
    return est


class BoundedFormatterMixin:
    """str.format in the sandbox (attribute lookups through it), with each field's size checked first."""

    _produced = 0

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._produced = len(format_string)
        return super().vformat(format_string, args, kwargs)  # type: ignore[misc]

    def format_field(self, value: Any, format_spec: str) -> Any:
        m = current_meter()
        m.tick()
        check_format_spec(m, value, format_spec, self._produced)
        out = super().format_field(value, format_spec)  # type: ignore[misc]
        self._produced += len(out)
        m.check_chars(self._produced, "a str.format result")
        return out


class BoundedFormatter(BoundedFormatterMixin, SandboxedFormatter):
    pass


class BoundedEscapeFormatter(BoundedFormatterMixin, SandboxedEscapeFormatter):
    pass


def str_method_args(method: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Checks a str/bytes/int method call that can build something far larger than its inputs.

    Returns the arguments to call it with (join's iterable is read here, metered, so a one-shot iterator is
    replaced by the list it produced).
    """
    owner = getattr(method, "__self__", None)
    name = getattr(method, "__name__", "")
    m = current_meter()
    if isinstance(owner, int) and not isinstance(owner, bool) and name == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        if isinstance(length, int):
            m.check_chars(4 * length, "int.to_bytes")
        return args, kwargs
    if not isinstance(owner, (str, bytes)):
        return args, kwargs
    n = len(owner)
    try:
        bound = inspect.signature(getattr(type(owner), name)).bind(owner, *args, **kwargs).arguments
    except (TypeError, ValueError):
        return args, kwargs  # a wrong call: Python raises its own error
    if name in ("center", "ljust", "rjust", "zfill"):
        width = bound.get("width")
        if isinstance(width, int):
            m.check_chars(max(n, width), f"str.{name}")
    elif name == "expandtabs":
        tabsize = bound.get("tabsize", 8)
        if isinstance(tabsize, int):
            tabs = owner.count("\t" if isinstance(owner, str) else b"\t")
            m.check_chars(n + tabs * max(tabsize, 0), "str.expandtabs")
    elif name == "replace":
        check_replace(m, owner, bound.get("old"), bound.get("new"), bound.get("count", -1))
    elif name == "translate":
        table = bound.get("table")
        longest = max((m.size(v) for v in table.values()), default=1) if isinstance(table, dict) else 1
        m.check_chars(n * max(longest, 1), "str.translate")
    elif name == "join":
        items = metered_list(m, bound.get("iterable", ()), "str.join")
        m.check_chars(sum(m.size(x) for x in items) + n * max(len(items) - 1, 0), "str.join")
        return (items,), {}
    return args, kwargs


def check_replace(m: Meter, s: Any, old: Any, new: Any, count: Any) -> None:
    if not (isinstance(s, (str, bytes)) and isinstance(old, type(s)) and isinstance(new, type(s))):
        return
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    m.check_chars(len(s) + hits * max(len(new) - len(old), 0), "a replace")


def metered_list(m: Meter, iterable: Any, what: str) -> list:
    """list(iterable), counting its items against the loop and size limits as they come."""
    out, total = [], 0
    for item in iterable:
        m.count_iteration(0)
        total += m.size(item) + ELEMENT_CHARS
        m.check_chars(total, what)
        out.append(item)
    return out
