"""SpeculativeConfig: vLLM's `speculative_config` (dict or JSON), validated so a bad value names its field."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from jisu.errors import InvalidRequestError

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16
"""Drafts per sequence and step: a verify of 1 + k rows stays one fused call (MAX_FUSED_SEQS rows)."""


@dataclass
class SpeculativeConfig:
    method: str
    """ngram (prompt lookup: the tokens that followed the last occurrence of the sequence's final n-gram) or
    draft_model (a smaller model with the same tokenizer proposes)."""
    num_speculative_tokens: int
    """Draft tokens proposed per sequence and step (k); a verify computes 1 + k rows."""
    prompt_lookup_max: int | None = None
    """ngram: longest n-gram matched (vLLM: defaults to prompt_lookup_min, or 5 when neither is given)."""
    prompt_lookup_min: int | None = None
    """ngram: shortest n-gram matched (defaults to prompt_lookup_max)."""
    model: str | None = None
    """draft_model: the draft model (path, short name or Hub id), sharing the target's tokenizer."""
    draft_checkpoint: object | None = None
    """draft_model: an already loaded Checkpoint of the draft (tests, callers that load it themselves)."""

    def __post_init__(self):
        def bad(name, value, want):
            raise InvalidRequestError(f"speculative_config.{name} must be {want}, got {value!r}")

        if self.method not in METHODS:
            bad("method", self.method, f"one of {', '.join(METHODS)}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            bad("num_speculative_tokens", k, f"an integer in [1, {MAX_SPECULATIVE_TOKENS}]")
        if self.method == "ngram":
            if self.model is not None or self.draft_checkpoint is not None:
                bad("model", self.model, "unset for method ngram (prompt lookup uses no model)")
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            for name, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    bad(name, v, "an integer >= 1")
            if lo is None and hi is None:
                lo = hi = 5
            lo = hi if lo is None else lo
            hi = lo if hi is None else hi
            if lo > hi:
                bad("prompt_lookup_min", lo, f"<= prompt_lookup_max ({hi})")
            self.prompt_lookup_min, self.prompt_lookup_max = lo, hi
        else:
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                if getattr(self, name) is not None:
                    bad(name, getattr(self, name), "unset for method draft_model")
            if self.draft_checkpoint is None and (not isinstance(self.model, str) or not self.model):
                bad("model", self.model, "the draft model (a path, short name or Hub id) for method draft_model")

    @classmethod
    def parse(cls, value) -> SpeculativeConfig | None:
        """None, a SpeculativeConfig, a dict of vLLM's keys, or that dict as JSON text (the command line's)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise InvalidRequestError(f"speculative_config must be a dict (or its JSON), got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidRequestError(
                f"speculative_config: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})"
            )
        value = dict(value)
        if "method" not in value:
            # As vLLM: a model alone means a draft model.
            if "model" in value or "draft_checkpoint" in value:
                value["method"] = "draft_model"
            else:
                raise InvalidRequestError(f"speculative_config.method is required: one of {', '.join(METHODS)}")
        if "num_speculative_tokens" not in value:
            raise InvalidRequestError("speculative_config.num_speculative_tokens is required (draft tokens per step)")
        return cls(**value)
