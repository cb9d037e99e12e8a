"""Chat templates from model files, compiled and rendered in a sandbox that bounds time, memory and output.

A chat template is Jinja code written by whoever published the model, so it is treated as hostile: it runs in
jinja2's immutable sandbox (no Python internals, no mutation of the values passed in), and every place where
template code can make work or memory grow without bound checks a per-render meter. Python threads cannot be
killed, so the render must stop itself: the meter holds a deadline, a loop-iteration count, a call depth and a
budget of characters the template may build, and each guarded operation checks them before (where the size is
known in advance) or right after it runs. Going over raises ChatTemplateLimitError naming the limit.

Where the checks sit:
  - operators: all of + - * / // % ** go through SandboxedEnvironment.call_binop (intercepting them also stops
    jinja folding constants such as ``10 ** 5000`` while compiling); the ``~`` operator, for-loops and ``in``
    tests are rewritten in the parsed template to call the meter (jinja's EnvironmentAttribute nodes);
  - calls (macros, methods, globals), filters, item slicing, ``{{ }}`` output (finalize) and every buffered
    block of output (environment.concat) check sizes and charge what they produce;
  - compile: the source length is capped and compile-time evaluation of template expressions is off.
"""

from __future__ import annotations

import functools
import inspect
import json
import types
from collections.abc import Iterator
from datetime import datetime
from string import Formatter
from typing import Any

import jinja2
import jinja2.filters
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension
from jinja2.exceptions import SecurityError
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_context
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from jisu.template_limits import (
    BoundedEscapeFormatter,
    BoundedFormatter,
    COMPILE_SECONDS,
    ChatTemplateError,
    ChatTemplateLimitError,
    ELEMENT_CHARS,
    MAX_CALL_DEPTH,
    MAX_FORMAT_ARG_CHARS,
    MAX_LOOP_ITERATIONS,
    MAX_OUTPUT_CHARS,
    MAX_TEMPLATE_CHARS,
    MAX_TEMPLATE_TOKENS,
    METER,
    Meter,
    OUTPUT_CHARS_PER_INPUT_CHAR,
    RENDER_SECONDS,
    check_add,
    check_mul,
    check_pow,
    check_printf,
    check_replace,
    current_meter,
    limit_message,
    metered_list,
    str_method_args,
)

# ----------------------------------------------------------------------------- filters


def _check_filter_args(name: str, m: Meter, bound: dict[str, Any]) -> None:
    """Filters whose output size is set by an argument rather than by their input."""
    if name == "center":
        width = bound.get("width", 80)
        if isinstance(width, int):
            m.check_chars(max(m.size(bound.get("value")), width), "the center filter's output")
    elif name == "indent":
        s, width = bound.get("s"), bound.get("width", 4)
        pad_len = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        lines = s.count("\n") + 1 if isinstance(s, str) else 1
        m.check_chars(m.size(s) + lines * max(pad_len, 0), "the indent filter's output")
    elif name == "wordwrap":
        s, width, wrap = bound.get("s"), bound.get("width", 79), bound.get("wrapstring")
        if isinstance(s, str) and isinstance(width, int) and width > 0:
            breaks = len(s) // width + sum(s.count(c) for c in " \t\n-") + 1
            m.check_chars(len(s) + breaks * (len(wrap) if isinstance(wrap, str) else 1), "the wordwrap filter's output")
    elif name == "replace":
        check_replace(m, bound.get("s"), bound.get("old"), bound.get("new"), bound.get("count"))
    elif name == "format":
        args, kwargs = bound.get("args", ()), bound.get("kwargs", {})
        check_printf(m, bound.get("value"), kwargs or args)
    elif name in ("batch", "slice"):
        n = bound.get("linecount" if name == "batch" else "slices")
        if isinstance(n, int):
            m.check_chars(n * ELEMENT_CHARS, f"the {name} filter's output")
    elif name == "join":
        value, sep = bound.get("value"), bound.get("d", "")
        if isinstance(sep, str) and hasattr(value, "__len__"):
            m.check_chars(m.size(value) + len(sep) * len(value), "the join filter's output")
    elif name == "truncate":
        m.check_chars(m.size(bound.get("s")) + m.size(bound.get("end", "...")), "the truncate filter's output")


def _guard_filter(name: str, func: Any) -> Any:
    """The filter with a deadline check, its inputs within the size limit, and its output charged."""
    passes_first = hasattr(func, "jinja_pass_arg")
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        m = current_meter()
        m.tick()
        # A lazy input (map, select, a generator) is read here, each item counted as it comes.
        args = tuple(metered_list(m, a, f"the {name} filter's input") if _is_lazy(a) else a for a in args)
        kwargs = {k: metered_list(m, v, f"the {name} filter's input") if _is_lazy(v) else v for k, v in kwargs.items()}
        for a in args[1 if passes_first else 0 :]:
            m.check(a, f"the {name} filter's input")
        if signature is not None:
            # jinja's async-capable filters take an eval context their signature does not show.
            for call_args in (args, args[1:]) if passes_first else (args,):
                try:
                    bound = signature.bind(*call_args, **kwargs)
                except TypeError:
                    continue
                _check_filter_args(name, m, dict(bound.arguments))
                break
        result = func(*args, **kwargs)
        if isinstance(result, Iterator) and not isinstance(result, (str, list, tuple, dict)):
            return _MeteredIterator(result, ELEMENT_CHARS, charge_items=True)
        m.charge(m.size(result))
        return result

    return guarded


def _is_lazy(value: Any) -> bool:
    return isinstance(value, Iterator) and not isinstance(value, LoopContext)


class _MeteredIterator:
    """An iterator that counts each item as a loop iteration (and charges weight, or the item's size)."""

    __slots__ = ("_source", "_it", "weight", "_charge_items", "_meter")

    def __init__(self, iterable: Any, weight: int, charge_items: bool = False):
        self._source = iterable
        self._it = iter(iterable)
        self.weight = weight
        self._charge_items = charge_items
        self._meter = current_meter()

    def __iter__(self) -> "_MeteredIterator":
        return self

    def __next__(self) -> Any:
        item = next(self._it)
        m = self._meter
        m.count_iteration(self.weight)
        if self._charge_items:
            m.charge(m.size(item))
        return item

    def __len__(self) -> int:
        return len(self._source)  # TypeError for iterators, which LoopContext handles by reading them


def _sum_filter(environment: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    # jinja's sum is Python's sum(), which adds lists in quadratic time; add through the metered +.
    getter = jinja2.filters.make_attrgetter(environment, attribute) if attribute is not None else None
    total = start
    for item in _MeteredIterator(iterable, ELEMENT_CHARS):
        total = environment.call_binop(None, "+", total, getter(item) if getter else item)
    return total


_sum_filter = jinja2.pass_environment(_sum_filter)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters, which changes prompts; templates expect plain JSON.
    m = current_meter()
    for what, arg in (("indent", indent), ("separators", separators)):
        too_wide = isinstance(arg, int) and not isinstance(arg, bool) and arg > MAX_FORMAT_ARG_CHARS
        if too_wide or m.size(arg) > MAX_FORMAT_ARG_CHARS:
            raise ChatTemplateLimitError(
                f"the chat template passed tojson an {what} over {MAX_FORMAT_ARG_CHARS} characters"
            )
    # JSON escapes one character into at most 12 (an emoji as \ud83d\ude00 under ensure_ascii) or, without
    # ensure_ascii, 6 (a control character as \u001f).
    m.check_chars(m.size(value) * (12 if ensure_ascii else 6), "a tojson result")
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    if indent is None:
        return encoder.encode(value)
    # Indentation grows with depth: stream the chunks and stop once the output is too long.
    chunks, total = [], 0
    for chunk in encoder.iterencode(value):
        total += len(chunk)
        m.check_chars(total, "a tojson result")
        chunks.append(chunk)
    return "".join(chunks)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > MAX_FORMAT_ARG_CHARS:
        raise ChatTemplateLimitError(f"strftime_now takes a format string of at most {MAX_FORMAT_ARG_CHARS} characters")
    return datetime.now().strftime(fmt)


def _range(*args: Any) -> range:
    rng = range(*args)
    try:
        n = len(rng)
    except OverflowError:
        n = MAX_LOOP_ITERATIONS + 1
    if n > MAX_LOOP_ITERATIONS:
        raise ChatTemplateLimitError(
            f"the chat template asked for a range of {'more than ' if n > MAX_LOOP_ITERATIONS else ''}"
            f"{min(n, MAX_LOOP_ITERATIONS):,} items; at most {MAX_LOOP_ITERATIONS:,} loop iterations are allowed"
        )
    return rng


# ----------------------------------------------------------------------------- the environment


class _CountTokens(Extension):
    """Caps the template's tokens and checks the compile deadline while jinja lexes and parses."""

    def filter_stream(self, stream: Any) -> Any:
        m = current_meter()
        for count, token in enumerate(stream, 1):
            if count > MAX_TEMPLATE_TOKENS:
                raise ChatTemplateLimitError(
                    f"the model's chat template has more than {MAX_TEMPLATE_TOKENS:,} Jinja tokens"
                )
            if count % 64 == 0:
                m.tick()
            yield token


class _MeteredCodeGenerator(CodeGenerator):
    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        current_meter().tick()
        return super().visit(node, *args, **kwargs)


_INTERNAL = "_jisu_internal"


def _internal(func: Any) -> Any:
    setattr(func, _INTERNAL, True)
    return func


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, strict about attributes and with every growth of time or memory metered."""

    intercepted_binops = frozenset(ImmutableSandboxedEnvironment.default_binop_table)
    code_generator_class = _MeteredCodeGenerator

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=["jinja2.ext.loopcontrols", _CountTokens],
            # No compile-time evaluation of template expressions (constant folding would run filters and
            # arithmetic while loading the model, outside any render's limits).
            optimized=False,
            finalize=self._finalize,
        )
        self.concat = self._concat  # every buffered block of output: macros, {% set %} blocks, filter blocks
        self.globals["range"] = _range
        self.globals.pop("lipsum", None)  # lorem ipsum of any length; no chat template needs it
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.filters["tojson"] = _tojson
        self.filters["sum"] = _sum_filter
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}

    # -- attributes

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # Functions, classes and modules are the way out of a sandbox (__globals__, __init__, mro); no chat
        # template needs an attribute of one.
        if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type, types.ModuleType)):
            return False
        return super().is_safe_attribute(obj, attr, value)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Refuse loudly, rather than jinja's default of rendering an empty value.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")

    def wrap_str_format(self, value: Any) -> Any:
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or value.__name__ not in (
            "format",
            "format_map",
        ):
            return None
        owner = value.__self__
        if not isinstance(owner, str):
            return None
        is_map = value.__name__ == "format_map"
        if isinstance(owner, Markup):
            formatter: Formatter = BoundedEscapeFormatter(self, escape=owner.escape)
        else:
            formatter = BoundedFormatter(self)

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                args, kwargs = (), args[0]
            return type(owner)(formatter.vformat(owner, args, kwargs))

        return bounded_format

    # -- operators and calls

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        m = current_meter()
        m.tick()
        if operator == "**":
            check_pow(m, left, right)
        elif operator == "*":
            check_mul(m, left, right)
        elif operator == "+":
            check_add(m, left, right)
        elif operator == "%":
            check_printf(m, left, right)
        result = self.binop_table[operator](left, right)
        if isinstance(result, (str, bytes, list, tuple)):
            m.charge(m.size(result))
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        # Calls inside loops and blocks carry jinja's scope variables; keep them out of the checks below.
        scope = {k: kwargs.pop(k) for k in ("_loop_vars", "_block_vars") if k in kwargs}
        if getattr(__obj, _INTERNAL, False):
            return __obj(*args, **kwargs)
        m = current_meter()
        m.tick()
        if not __self.is_safe_callable(__obj):
            raise SecurityError(f"{__obj!r} is not safely callable")
        for a in (*args, *kwargs.values()):
            m.check(a, "a call's argument")
        if isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive for-loop
            weight = getattr(__obj._iterable, "weight", ELEMENT_CHARS)
            args = (_MeteredIterator(args[0], weight), *args[1:])
        else:
            args, kwargs = str_method_args(__obj, args, kwargs)
        if m.depth >= MAX_CALL_DEPTH:
            raise ChatTemplateLimitError(f"the chat template nested calls more than {MAX_CALL_DEPTH} deep")
        m.depth += 1
        try:
            result = __context.call(__obj, *args, **kwargs, **scope)
        finally:
            m.depth -= 1
        if not isinstance(result, range):  # a range is a few numbers until something lists it
            m.charge(m.size(result))
        return result

    # -- hooks the rewritten template calls (see _Guards)

    @_internal
    def _jisu_loop(self, iterable: Any, weight: int) -> _MeteredIterator:
        return _MeteredIterator(iterable, weight)

    @_internal
    def _jisu_tilde(self, *pieces: Any) -> str:
        m = current_meter()
        m.tick()
        m.check_chars(sum(m.size(p) for p in pieces), "a concatenation (~)")
        text = "".join(map(str, pieces))
        m.charge(len(text))
        return text

    @_internal
    def _jisu_tick(self, value: Any) -> Any:
        current_meter().tick()
        return value

    @_internal
    def _jisu_sliced(self, value: Any) -> Any:
        m = current_meter()
        m.tick()
        m.charge(m.size(value))
        return value

    # -- output

    @pass_context
    def _finalize(self, context: Any, value: Any) -> Any:
        # Each {{ }}: its printed size is checked before str() builds it. pass_context also keeps jinja from
        # finalizing constants at compile time.
        m = current_meter()
        m.tick()
        m.charge(m.check(value, "a printed value"))
        return value

    def _concat(self, pieces: Any) -> str:
        m = current_meter()
        m.tick()
        pieces = list(pieces)
        total = sum(len(p) for p in pieces)
        m.check_chars(total, "a block of template output")
        m.charge(total)
        return "".join(pieces)


class _Guards(NodeTransformer):
    """Rewrites the parsed template so loops, ~, slices and `in` tests call the meter."""

    def __init__(self, environment: jinja2.Environment):
        self.environment = environment

    def _hook(self, name: str, args: list[nodes.Expr], like: nodes.Node) -> nodes.Expr:
        call = nodes.Call(nodes.EnvironmentAttribute(name), args, [], None, None, lineno=like.lineno)
        call.set_environment(self.environment)
        return call

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        # Each iteration may append every piece of literal text in its body to an output buffer; charge that.
        pieces = sum(1 for stmt in node.body for _ in stmt.find_all(nodes.TemplateData))
        weight = ELEMENT_CHARS * (1 + pieces)
        node.iter = self._hook("_jisu_loop", [node.iter, nodes.Const(weight, lineno=node.lineno)], node)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return self._hook("_jisu_tilde", list(node.nodes), node)

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Node:
        node = self.generic_visit(node)
        if isinstance(node.arg, nodes.Slice) and node.ctx == "load":  # jinja slices without environment.getitem
            return self._hook("_jisu_sliced", [node], node)
        return node

    def visit_Compare(self, node: nodes.Compare) -> nodes.Node:
        node = self.generic_visit(node)
        if any(op.op in ("in", "notin") for op in node.ops):  # a substring search can be slow; tick after each
            return self._hook("_jisu_tick", [node], node)
        return node


class ChatTemplate:
    """A model's chat template, compiled once and rendered with bounded time, memory and output."""

    def __init__(self, source: str):
        if not isinstance(source, str):
            raise ChatTemplateError(f"the model's chat template is a {type(source).__name__}, not text")
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateLimitError(
                f"the model's chat template is {len(source):,} characters, over the {MAX_TEMPLATE_CHARS:,} limit"
            )
        self.source = source
        self._env = _Sandbox()
        meter = Meter(COMPILE_SECONDS, MAX_OUTPUT_CHARS, "compile")
        token = METER.set(meter)
        try:
            tree = self._env.parse(source)
            tree = _Guards(self._env).visit(tree)
            self._template = self._env.from_string(tree)
        except ChatTemplateError:
            raise
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the model's chat template does not parse: {limit_message(e)}") from None
        except RecursionError:
            raise ChatTemplateLimitError("the model's chat template is nested too deeply to compile") from None
        except Exception as e:  # the template compiler on text it was not built for
            raise ChatTemplateError(
                f"the model's chat template does not compile: {type(e).__name__}: {limit_message(e)}"
            ) from None
        finally:
            METER.reset(token)

    def render(self, variables: dict[str, Any], input_chars: int = 0) -> str:
        """The template's output for these variables; input_chars (the messages' text) widens the size limits."""
        meter = Meter(RENDER_SECONDS, MAX_OUTPUT_CHARS + OUTPUT_CHARS_PER_INPUT_CHAR * input_chars, "render")
        token = METER.set(meter)
        stream = None
        try:
            stream = self._template.generate(**variables)
            chunks, total = [], 0
            for chunk in stream:  # top-level output, counted as it streams
                total += len(chunk)
                meter.check_chars(total, "the rendered prompt")
                meter.tick()
                chunks.append(chunk)
            return "".join(chunks)
        except ChatTemplateError as e:
            raise type(e)(limit_message(e)) from None
        except SecurityError as e:
            raise ChatTemplateError(
                f"the model's chat template was refused by the sandbox: {limit_message(e)}"
            ) from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the model's chat template failed: {limit_message(e)}") from None
        except RecursionError:
            raise ChatTemplateLimitError("the model's chat template recursed too deeply") from None
        except MemoryError:
            raise ChatTemplateLimitError("the model's chat template ran out of memory") from None
        except Exception as e:  # a template doing arithmetic on what the messages lack, e.g. None + str
            raise ChatTemplateError(
                f"the model's chat template failed on these messages: {type(e).__name__}: {limit_message(e)}"
            ) from None
        finally:
            if stream is not None:
                stream.close()
            METER.reset(token)
