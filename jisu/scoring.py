"""Log-likelihood scoring and classification, as evaluation harnesses ask for it, through the engine.

A (context, continuation) pair becomes one request of max_tokens 0 with prompt_logprobs: the engine computes
the logprob of every prompt token in the same forward as the prefill (jisu/runner/runner.py keeps those rows),
so pairs batch, chunk and preempt like any request, and the numbers equal what the server's echo returns.

Pairs are tokenised as lm-evaluation-harness does for causal models (TemplateLM._encode_pair): trailing spaces
of the context move to the continuation, context + continuation is tokenised whole and split at the length of
the context's own tokenisation, so a word is scored as the tokens the model would see, not as a separately
tokenised piece. An empty context is replaced by the BOS token (EOS where there is none), as lm-eval does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from jisu.errors import InvalidRequestError

NORMALIZATIONS = (None, "tokens", "chars")


@dataclass
class ScoreOutput:
    """One continuation's log-likelihood given its context."""

    logprob: float
    """Sum of the continuation tokens' log-probabilities (natural log)."""
    token_logprobs: list[float]
    token_ids: list[int]
    """The continuation's tokens, as split from the whole pair's tokenisation."""
    is_greedy: bool
    """Every continuation token is the model's most likely next token (lm-eval's `is_greedy`)."""
    context_length: int
    """Tokens of the context (what the continuation is conditioned on)."""


@dataclass
class ClassifyOutput:
    label: str
    """The label with the highest (normalised) score."""
    scores: dict[str, float] = field(default_factory=dict)
    """Per label: the log-likelihood of its continuation, divided by its length if normalised."""
    probs: dict[str, float] = field(default_factory=dict)
    """softmax over the labels' scores: the model's choice among exactly these labels."""


def encode_pair(tokenizer, context: str | Sequence[int], continuation: str | Sequence[int],
                add_special_tokens: bool = False) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits a loglikelihood request. Token-id lists
    are taken as they are; text and ids may not be mixed in one pair."""
    if isinstance(context, str) != isinstance(continuation, str):
        raise InvalidRequestError("context and continuation must both be text or both be token-id lists")
    if not isinstance(context, str):
        ctx, cont = list(context), list(continuation)
        if not ctx:
            raise InvalidRequestError("context token ids are empty; give at least one token (e.g. BOS)")
    elif not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_ids[0]
        ctx, cont = [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    else:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = tokenizer.encode(context + continuation, add_special_tokens=add_special_tokens)
        ctx = tokenizer.encode(context, add_special_tokens=add_special_tokens)
        cont = whole[len(ctx):]
    if not cont:
        raise InvalidRequestError(f"continuation {continuation!r} has no tokens after its context; nothing to score")
    return ctx, cont


def score_output(prompt_logprobs: list, context_length: int) -> ScoreOutput:
    """The continuation's part of a request's prompt logprobs (entries context_length.. of the prompt)."""
    entries = prompt_logprobs[context_length:]
    values = [e.logprob for e in entries]
    return ScoreOutput(
        logprob=math.fsum(values),
        token_logprobs=values,
        token_ids=[e.token_id for e in entries],
        is_greedy=all(e.rank == 1 for e in entries),
        context_length=context_length,
    )


def classify_output(labels: Sequence[str], scored: Sequence[ScoreOutput], normalize: str | None) -> ClassifyOutput:
    """Picks the label whose continuation scores highest (the first on ties)."""
    scores = {}
    for label, s in zip(labels, scored):
        if normalize == "tokens":
            scores[label] = s.logprob / len(s.token_ids)
        elif normalize == "chars":
            scores[label] = s.logprob / max(1, len(label))
        else:
            scores[label] = s.logprob
    best = max(scores.values())
    total = math.fsum(math.exp(v - best) for v in scores.values())
    probs = {k: math.exp(v - best) / total for k, v in scores.items()}
    return ClassifyOutput(label=max(scores, key=scores.get), scores=scores, probs=probs)


def check_normalize(normalize: str | None) -> None:
    if normalize not in NORMALIZATIONS:
        raise InvalidRequestError(f"normalize must be one of None, 'tokens', 'chars', got {normalize!r}")
