"""What a request constrains its output to: a JSON schema, any JSON object, a regex, a choice or a grammar.

Field names follow vLLM's StructuredOutputsParams, so its extension fields map onto it one to one. Checked once
when the request arrives; the grammar itself is compiled (and refused, with the library's reason) by
jisu.structured.grammar when the engine takes the request.
"""

from __future__ import annotations

import json as json_module
from dataclasses import dataclass
from typing import Any

from jisu.errors import InvalidRequestError

# Bounds what one request can make the grammar compiler chew on (schemas and grammars come from clients).
MAX_SPEC_CHARS = 256 * 1024
MAX_CHOICES = 4096


@dataclass
class StructuredOutputsParams:
    json: dict | str | None = None
    """A JSON schema (a dict, or its JSON text): the output is one JSON value valid against it."""
    json_object: bool = False
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
    regex: str | None = None
    """The whole output matches this regular expression (Rust regex syntax, as llguidance reads it)."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A context-free grammar: Lark (llguidance's dialect) or GBNF (llama.cpp's)."""
    source: str = "structured_outputs"
    """The request field the constraint came from (response_format, guided_json, ...): errors name it."""

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if not isinstance(self.json_object, bool):
            raise InvalidRequestError(f"structured_outputs.json_object must be true or false, got {self.json_object!r}")
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise InvalidRequestError(
                "structured_outputs takes exactly one of json, json_object, regex, choice, grammar; "
                f"got {', '.join(given) if given else 'none'}"
            )
        if self.json is not None:
            self.json = _schema(self.json)
        if self.regex is not None:
            self.regex = _text("regex", self.regex)
        if self.grammar is not None:
            self.grammar = _text("grammar", self.grammar)
        if self.choice is not None:
            self.choice = _choices(self.choice)

    @property
    def kind(self) -> str:
        """Which constraint this is: json, json_object, regex, choice or grammar."""
        if self.json_object:
            return "json_object"
        return next(name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None)


def _schema(value: Any) -> dict:
    if isinstance(value, str):
        if len(value) > MAX_SPEC_CHARS:
            raise InvalidRequestError(f"structured_outputs.json is {len(value)} characters; at most {MAX_SPEC_CHARS}")
        try:
            value = json_module.loads(value)
        except ValueError as e:
            raise InvalidRequestError(f"structured_outputs.json is not valid JSON: {e}") from None
    if isinstance(value, bool):  # JSON Schema allows true/false as schemas: anything / nothing
        value = {} if value else {"not": {}}
    if not isinstance(value, dict):
        raise InvalidRequestError(
            f"structured_outputs.json must be a JSON schema (an object), got {type(value).__name__}"
        )
    if len(json_module.dumps(value)) > MAX_SPEC_CHARS:
        raise InvalidRequestError(f"structured_outputs.json is larger than {MAX_SPEC_CHARS} characters")
    return value


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"structured_outputs.{field} must be a non-empty string, got {value!r}")
    if len(value) > MAX_SPEC_CHARS:
        raise InvalidRequestError(f"structured_outputs.{field} is {len(value)} characters; at most {MAX_SPEC_CHARS}")
    return value


def _choices(value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidRequestError(f"structured_outputs.choice must be a non-empty list of strings, got {value!r}")
    if len(value) > MAX_CHOICES:
        raise InvalidRequestError(f"structured_outputs.choice has {len(value)} entries; at most {MAX_CHOICES}")
    for i, c in enumerate(value):
        if not isinstance(c, str) or not c:
            raise InvalidRequestError(f"structured_outputs.choice[{i}] must be a non-empty string, got {c!r}")
    if sum(len(c) for c in value) > MAX_SPEC_CHARS:
        raise InvalidRequestError(f"structured_outputs.choice holds more than {MAX_SPEC_CHARS} characters")
    return list(value)


_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def strict_schema(schema: Any) -> Any:
    """OpenAI's strict mode: an object schema that does not say otherwise takes no properties beyond its own (so
    a small model cannot pad an object with keys it saw elsewhere in the schema). Walks only the keywords that hold
    schemas, so a property that happens to be named "properties" stays data."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(x) for x in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_schema(x) for name, x in out[key].items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out
