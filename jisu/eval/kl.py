"""How far a run's next-token distributions move from a reference run of the same model in higher
precision (llama-perplexity --kl-divergence style): KL(P_ref || P_test) per scored position, and how
often both put the same token on top. Same text, chunks and scored positions as perplexity.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from jisu.errors import InvalidRequestError
from jisu.eval.perplexity import (
    check_ctx_fits,
    make_chunks,
    ppl_and_stderr,
    scored_nll,
    scored_rows,
    tokenize,
)
from jisu.eval.scoring import score_batch


def position_kl(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_test) in nats for each row of [n, vocab] logits, computed in float64."""
    log_p = torch.log_softmax(ref_logits.double(), dim=-1)
    log_q = torch.log_softmax(test_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@dataclass
class KLResult:
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    """Fraction of scored positions where both runs' most likely token is the same."""
    ppl: float
    ppl_stderr: float
    reference_ppl: float
    reference_ppl_stderr: float
    ctx: int
    chunks: int
    chunks_available: int
    tokens_scored: int
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def kl_divergence(
    engine, reference, text: str, ctx: int = 512, chunks: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> KLResult:
    """Compares `engine` (the run under test) with `reference` (LLMEngines of the same model)."""
    if engine.model_config.vocab_size != reference.model_config.vocab_size:
        raise InvalidRequestError("the run and its reference have different vocabularies; use the same model")
    for e in (engine, reference):
        check_ctx_fits(e, ctx)
    tokens = tokenize(reference.tokenizer, text)
    if tokenize(engine.tokenizer, text) != tokens:
        raise InvalidRequestError("the run and its reference tokenize the text differently; use the same model")
    plan = make_chunks(tokens, ctx, chunks)
    kls, agree, nll, ref_nll = [], [], [], []
    for i, chunk in enumerate(plan.chunks):
        (ref,) = score_batch(reference, [chunk])
        (test,) = score_batch(engine, [chunk])
        rows = scored_rows(ctx)
        kls.append(position_kl(ref[rows], test[rows]))
        agree.append(ref[rows].argmax(-1) == test[rows].argmax(-1))
        nll.append(scored_nll(test, chunk))
        ref_nll.append(scored_nll(ref, chunk))
        if progress:
            progress(i + 1, len(plan.chunks))
    kl = torch.cat(kls)
    ppl, err = ppl_and_stderr(torch.cat(nll))
    rppl, rerr = ppl_and_stderr(torch.cat(ref_nll))
    return KLResult(
        kl_mean=kl.mean().item(), kl_median=kl.median().item(), kl_p99=torch.quantile(kl, 0.99).item(),
        kl_max=kl.max().item(), top1_agreement=torch.cat(agree).double().mean().item(), ppl=ppl, ppl_stderr=err,
        reference_ppl=rppl, reference_ppl_stderr=rerr, ctx=ctx, chunks=len(plan.chunks),
        chunks_available=plan.available, tokens_scored=kl.numel(), note=plan.note,
    )


