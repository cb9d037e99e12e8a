"""What a request asks the sampler to do, checked once when the request arrives.

Field names and defaults follow vLLM's SamplingParams so OpenAI-style requests map onto it field for field.
Every bad value raises InvalidRequestError naming the field, the value and what is allowed, so the API layer
can pass the message straight back to the user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable

from jisu.errors import InvalidRequestError
from jisu.structured.params import StructuredOutputsParams

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
"""OpenAI's bound on a logit_bias value: -100 bans a token, 100 all but forces it."""
MAX_LOGIT_BIAS_ENTRIES = 1024

# Temperatures below this count as greedy: dividing logits by them can overflow float32 to inf,
# and the distribution is a point mass on the argmax to float precision anyway (vLLM uses the same cut-off).
GREEDY_TEMPERATURE = 1e-5


def _reject(field: str, value: Any, allowed: str) -> InvalidRequestError:
    return InvalidRequestError(f"{field} must be {allowed}, got {value!r}")


def _integer(field: str, value: Any, allowed: str, ok: Callable[[int], bool]) -> int:
    # bool is an int subclass in Python; True as n or top_k is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, Integral) or not ok(int(value)):
        raise _reject(field, value, allowed)
    return int(value)


def _number(field: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _reject(field, value, allowed)
    if not math.isfinite(value) or not ok(float(value)):
        raise _reject(field, value, allowed)
    return float(value)


def _stop_strings(value: Any) -> list[str]:
    allowed = "a non-empty string or a list of non-empty strings"
    if value is None:
        return []
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise _reject("stop", value, allowed)
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise _reject(f"stop[{i}]", item, "a non-empty string")
    return items


def _logit_bias(value: Any) -> dict[int, float] | None:
    """{token id: bias}; keys may be ids or their decimal text (JSON object keys are strings)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _reject("logit_bias", value, "an object mapping token ids to numbers in [-100, 100]")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(f"logit_bias has {len(value)} entries; at most {MAX_LOGIT_BIAS_ENTRIES}")
    out = {}
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        token = _integer(f"logit_bias key {key!r}", token, "a token id (an integer >= 0)", lambda v: v >= 0)
        out[token] = _number(f"logit_bias[{key!r}]", bias, "a number in [-100, 100]",
                             lambda v: -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS)
    return out


def _stop_token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise _reject("stop_token_ids", value, "a list of token ids (integers >= 0)")
    return [
        _integer(f"stop_token_ids[{i}]", t, "a token id (an integer >= 0)", lambda v: v >= 0)
        for i, t in enumerate(value)
    ]


@dataclass
class SamplingParams:
    n: int = 1
    """Number of independent completions for the prompt."""
    temperature: float = 1.0
    """0 means greedy (so does anything below GREEDY_TEMPERATURE)."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 disables top-k."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """HF semantics over prompt and output tokens: > 1 discourages repeats."""
    presence_penalty: float = 0.0
    """OpenAI semantics over output tokens only."""
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    """None generates until the context window is full; 0 only computes the prompt (for prompt_logprobs)."""
    stop: str | list[str] | None = None
    """Normalised to a list of non-empty strings."""
    stop_token_ids: list[int] | None = None
    """Normalised to a list of token ids."""
    ignore_eos: bool = False
    logprobs: int | None = None
    """Top logprobs returned per sampled token; 0 returns only the sampled token's logprob."""
    prompt_logprobs: int | None = None
    """Top logprobs returned per prompt token (the first has none); 0 returns only the prompt token's own."""
    logit_bias: dict[int, float] | None = None
    """Added to the token's logit before sampling (OpenAI semantics; -100 bans it)."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrains the output to a JSON schema, regex, choice or grammar."""

    def __post_init__(self) -> None:
        self.n = _integer("n", self.n, "an integer >= 1", lambda v: v >= 1)
        self.temperature = _number("temperature", self.temperature, "a number >= 0 (0 means greedy)", lambda v: v >= 0)
        self.top_p = _number("top_p", self.top_p, "a number in (0, 1]", lambda v: 0 < v <= 1)
        self.top_k = _integer("top_k", self.top_k, "0 or -1 (disabled) or an integer >= 1", lambda v: v >= -1)
        self.min_p = _number("min_p", self.min_p, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        self.repetition_penalty = _number(
            "repetition_penalty", self.repetition_penalty, "a number > 0", lambda v: v > 0
        )
        self.presence_penalty = _number(
            "presence_penalty", self.presence_penalty, "a number in [-2, 2]", lambda v: -2 <= v <= 2
        )
        self.frequency_penalty = _number(
            "frequency_penalty", self.frequency_penalty, "a number in [-2, 2]", lambda v: -2 <= v <= 2
        )
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, "an integer or null", lambda v: True)
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens, "an integer >= 0 or null", lambda v: v >= 0)
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _stop_token_ids(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            raise _reject("ignore_eos", self.ignore_eos, "true or false")
        if self.logprobs is not None:
            self.logprobs = _integer(
                "logprobs", self.logprobs, f"an integer in [0, {MAX_LOGPROBS}] or null", lambda v: 0 <= v <= MAX_LOGPROBS
            )
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _integer(
                "prompt_logprobs", self.prompt_logprobs, f"an integer in [0, {MAX_LOGPROBS}] or null",
                lambda v: 0 <= v <= MAX_LOGPROBS,
            )
        self.logit_bias = _logit_bias(self.logit_bias) or None
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise _reject("structured_outputs", self.structured_outputs, "a StructuredOutputsParams or null")

    @property
    def greedy(self) -> bool:
        """The sampler takes the argmax instead of drawing."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k >= 1

    @property
    def rewrites_logits(self) -> bool:
        """Something other than the draw's settings changes this row's logits: penalties or a logit bias."""
        return self.needs_penalties or self.logit_bias is not None

    @property
    def needs_penalties(self) -> bool:
        """Any of the repetition / presence / frequency penalties changes the logits."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
