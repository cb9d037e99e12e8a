"""Rejection sampling of draft tokens against the target model's rows (Leviathan et al. 2023; vLLM's rule).

A sequence that proposed k drafts d_1..d_k gets k + 1 target rows: row i is the target's distribution p_i of the
token after d_1..d_i (row 0: after the sequence's real tokens). Draft d_{i+1} is accepted with probability
min(1, p_i(d) / q_i(d)), q_i being the proposer's distribution (one-hot for prompt lookup, so p_i(d)); at the
first rejection the token is drawn from the residual max(0, p_i - q_i) (normalised), and after k acceptances
a bonus token is drawn from p_k. Every emitted token is then distributed exactly as p, as if sampled without
speculation. Greedy rows accept while the draft equals the row's argmax and then take the argmax, so the text
is the one plain decoding gives, token for token (the rows' logits are the plain decode's: runner's NOTE).

p_i is what the Sampler would draw from: logit bias, penalties over the output including d_1..d_i, temperature,
min-p, top-k, top-p (Sampler.processed_logits). Uniforms come from the sequence's own generator when it has a
seed, so a seeded request is reproducible whatever shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jisu.sampling import Sampler, SamplingRow


@dataclass
class Verified:
    tokens: list[int]
    """The accepted drafts, then the token drawn at the first rejection (or the bonus token)."""
    num_accepted: int
    """Drafts accepted (len(tokens) - 1)."""


def _uniform(sampler: Sampler, generator: torch.Generator | None) -> float:
    if generator is not None:
        return torch.rand((), dtype=torch.float64, generator=generator, device=generator.device).item()
    g = sampler.generator
    return torch.rand((), dtype=torch.float64, generator=g, device=g.device if g is not None else "cpu").item()


def softmax_row(x: np.ndarray) -> np.ndarray:
    """float64 probabilities of one row of logits (-inf -> 0)."""
    w = np.exp(x - x.max())
    return w / w.sum()


def draw(weights: np.ndarray, u: float) -> int:
    """The first token whose cumulative weight exceeds u (in [0, 1)) times the total: token i with probability
    weights[i] / sum(weights); zero-weight tokens are never drawn."""
    cum = np.cumsum(weights)
    return int(min(np.searchsorted(cum, u * cum[-1], side="right"), len(weights) - 1))


def verify(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], drafts: list[list[int]],
           draft_probs: list[np.ndarray | None]) -> list[Verified]:
    """logits: [sum(len(d) + 1), vocab], each sequence's k + 1 rows in order; rows: one SamplingRow per logits row
    (its output tokens extended by the drafts before it). draft_probs: per sequence [k, vocab] float64 q, or None
    for one-hot proposals.
    NOTE: the per-row work runs in numpy on the rows it needs (up to the first rejection): torch's softmax on a
    few rows costs milliseconds of thread-pool dispatch on a busy 2-core machine."""
    if all(r.params.greedy and not r.params.rewrites_logits and r.grammar is None for r in rows):
        x = logits  # nothing changes a greedy row's argmax: skip the [rows, vocab] copy
    else:
        x = sampler.processed_logits(logits, rows)
    results = []
    r = 0
    for draft, q in zip(drafts, draft_probs):
        k = len(draft)
        params = rows[r].params
        xs = x[r : r + k + 1]
        gen = rows[r].generator
        r += k + 1
        if params.greedy:
            best = xs.argmax(dim=1).tolist() if xs.device.type != "cpu" else xs.numpy().argmax(axis=1).tolist()
            a = 0
            while a < k and draft[a] == best[a]:
                a += 1
            results.append(Verified(draft[:a] + [best[a]], a))
            continue
        xn = xs.to(device="cpu", dtype=torch.float64).numpy()
        tokens: list[int] = []
        final = None
        for i, d in enumerate(draft):
            p = softmax_row(xn[i])
            q_d = 1.0 if q is None else float(q[i, d])
            if q_d > 0 and _uniform(sampler, gen) < min(1.0, p[d] / q_d):
                tokens.append(d)
                continue
            if q is None:
                residual = p.copy()
                residual[d] = 0.0
            else:
                residual = np.maximum(p - q[i], 0.0)
            if not residual.sum() > 0:  # p == q: nothing left to prefer, p itself is the answer
                residual = p
            final = draw(residual, _uniform(sampler, gen))
            break
        if final is None:  # every draft accepted: the bonus token, from the row after the last draft
            final = draw(softmax_row(xn[k]), _uniform(sampler, gen))
        results.append(Verified(tokens + [final], len(tokens)))
    return results
