"""Perplexity of a text file with llama.cpp's `llama-perplexity` method, so the figures compare.

The whole text is tokenized once without BOS and cut into non-overlapping chunks of `ctx` tokens; each
chunk is evaluated from an empty cache and only its second half is scored: tokens ctx/2 .. ctx-1, each
predicted by the logits one position earlier, so every scored token sees at least ctx/2 - 1 tokens of
context and a chunk scores ctx/2 tokens. This is the counting that reproduces llama-perplexity's figure
on this machine (29.2308 over 20 chunks of wikitext-2, ../shared/docs/BASELINES.md, 5,120 tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from jisu.errors import InvalidRequestError
from jisu.eval.scoring import score_chunks

Progress = Callable[[int, int], None]


@dataclass
class Chunking:
    chunks: list[list[int]]
    available: int
    """Whole chunks the text holds."""
    note: str | None = None
    """Set when fewer chunks were used than asked for."""


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"text file not found: {p}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"text file {p} is not UTF-8: {e}") from None


def tokenize(tokenizer, text: str) -> list[int]:
    # llama-perplexity's figures on these models are taken without BOS; we match them.
    if not text:
        raise InvalidRequestError("the text is empty")
    return tokenizer.encode(text, add_special_tokens=False)


def check_ctx(ctx: int) -> None:
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 4:
        raise InvalidRequestError(f"--ctx must be an integer >= 4, got {ctx!r}")


def check_ctx_fits(engine, ctx: int) -> None:
    check_ctx(ctx)
    # The engine's window may be set above what the model was trained on; chunks must not be.
    limit = min(engine.max_model_len, engine.model_config.max_position_embeddings)
    if ctx > limit:
        raise InvalidRequestError(f"--ctx {ctx} exceeds the model's context window of {limit} tokens")


def make_chunks(tokens: list[int], ctx: int, chunks: int | None = None) -> Chunking:
    """The first `chunks` whole chunks of `ctx` tokens (all of them if None); a partial tail is dropped."""
    check_ctx(ctx)
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
        raise InvalidRequestError(f"--chunks must be an integer >= 1, got {chunks!r}")
    available = len(tokens) // ctx
    if available == 0:
        raise InvalidRequestError(
            f"the text has {len(tokens)} tokens, fewer than one chunk of --ctx {ctx}; give a longer text or a smaller --ctx"
        )
    use = available if chunks is None else min(chunks, available)
    note = None
    if chunks is not None and chunks > available:
        note = f"asked for {chunks} chunks but the text holds only {available} of {ctx} tokens; using {available}"
    return Chunking([tokens[i * ctx : (i + 1) * ctx] for i in range(use)], available, note)


def scored_rows(ctx: int) -> slice:
    """Positions whose logits are scored: each predicts the token after it, ctx/2 .. ctx-1."""
    return slice(ctx // 2 - 1, ctx - 1)


def scored_nll(logits: torch.Tensor, chunk: list[int]) -> torch.Tensor:
    """Negative log-likelihoods (float64) of the second half of one chunk, given its logits [ctx, vocab]."""
    rows = scored_rows(len(chunk))
    logp = torch.log_softmax(logits[rows].double(), dim=-1)
    targets = torch.tensor(chunk[rows.start + 1 :], dtype=torch.long)
    return -logp.gather(1, targets[:, None])[:, 0]


def ppl_and_stderr(nll: torch.Tensor) -> tuple[float, float]:
    """exp(mean NLL) and its standard error, propagated as llama-perplexity does: ppl * stderr(mean NLL)."""
    n = nll.numel()
    mean = nll.mean().item()
    ppl = math.exp(mean)
    if n < 2:
        return ppl, float("nan")
    var = (nll.pow(2).mean() - mean * mean).item()
    return ppl, ppl * math.sqrt(max(var, 0.0) / (n - 1))


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float
    ctx: int
    chunks: int
    chunks_available: int
    tokens_scored: int
    running_ppl: list[float] = field(default_factory=list)
    """The estimate after each chunk, as llama-perplexity prints it."""
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(
    engine, text: str, ctx: int = 512, chunks: int | None = None, progress: Progress | None = None
) -> PerplexityResult:
    """Perplexity of `text` under `engine` (an LLMEngine) with llama.cpp's chunking."""
    check_ctx_fits(engine, ctx)
    plan = make_chunks(tokenize(engine.tokenizer, text), ctx, chunks)
    nlls: list[torch.Tensor] = []
    running: list[float] = []
    total = len(plan.chunks)
    for i, (chunk, logits) in enumerate(zip(plan.chunks, score_chunks(engine, plan.chunks, batch_tokens=ctx))):
        nlls.append(scored_nll(logits, chunk))
        running.append(math.exp(torch.cat(nlls).mean().item()))
        if progress:
            progress(i + 1, total)
    nll = torch.cat(nlls)
    ppl, err = ppl_and_stderr(nll)
    return PerplexityResult(ppl, err, ctx, total, plan.available, nll.numel(), running, plan.note)
