"""Structured output: constraining what a request may generate (JSON schema, regex, choice, grammar)."""

from jisu.structured.params import StructuredOutputsParams, strict_schema

__all__ = ["StructuredOutputsParams", "strict_schema"]
