"""Batched token sampling, outside the model.

One call turns a [rows, vocab] logits batch into one token per row. The transforms run in a fixed order:
logit bias -> structured-output mask -> repetition penalty -> presence/frequency penalties -> (greedy rows take
the argmax here) -> temperature -> min-p -> top-k -> top-p -> draw. Each is one tensor op over the rows that need it, and is skipped
entirely when no row does, so an all-defaults batch costs only the draw.

The draw inverts each row's CDF with one uniform number u: the token is the first whose cumulative weight
exp(logit - max) exceeds u times the row's total, so token i comes with probability softmax(logits)_i. It
runs in two levels (blocks of _DRAW_BLOCK tokens, then the chosen block), cumulative sums in float64. A seeded
row takes its u from its own generator, so its tokens do not depend on which other rows share the batch or
where the row sits.
NOTE: this replaced the exponential race, argmax(logits - log(-log(U))) with a uniform U per token: on CPU,
filling U for a 49k vocabulary (torch's generator) and its two logs is slow. Measured side by side (SmolLM2's
vocabulary, 2 threads, benchmarks/bench_sampler.py): 1 row 0.62 vs 0.34 ms, 16 rows 8.0 vs 1.2 ms, 128 rows
64 vs 10.5 ms; 16 sampled sequences decoding 128 tokens went from 184 to 215 tok/s.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from jisu.sampling_params import SamplingParams
from jisu.structured.grammar import GrammarMatcher, StructuredOutputs

# Top-p looks for the nucleus among this many most likely tokens first and widens by _TOP_P_GROWTH only for
# rows whose nucleus does not fit: a partial top-k is far cheaper than sorting a 50k-260k vocab, and cheaper
# the fewer it keeps (49k vocab, 16 rows, 2 threads: k = 64 1.2 ms, 256 1.9 ms, 1024 4.3 ms, a full sort 36 ms).
# Nucleus sizes on the default model (6 prompts x 96 tokens): temperature 0.7 / top-p 0.9 median 2 tokens, 99th
# percentile 86; temperature 1 / top-p 0.95 median 94, 90th percentile 1076. Whole sampler step over the default
# model's own logits, 16 rows, first candidates 64 / 256 / 1024: T 0.7, p 0.9: 8.2 / 8.1 / 12.2 ms; T 1, p 0.95:
# 13.6 / 12.6 / 13.5 ms (1 row: 1.56 / 1.42 / 1.71 and 2.15 / 2.09 / 2.00 ms; medians of 3 rounds, one run).
_TOP_P_FIRST_CANDIDATES = 256
_TOP_P_GROWTH = 8

_NEG_INF = float("-inf")

_DRAW_BLOCK = 256
"""Tokens per block of the two-level draw: block sums are one vectorised reduction, and only the chosen
block's (few hundred) weights need a cumulative sum."""


@dataclass
class SamplingRow:
    """One row of the logits batch."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    """Tokens generated so far for this sequence."""
    generator: torch.Generator | None
    """Per-sequence CPU RNG when the request gave a seed, else None (the shared RNG)."""
    grammar: GrammarMatcher | None = None
    """The sequence's structured-output state: only the tokens it allows next can be drawn."""


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int
    """1 = most likely under the model."""
    top: list[tuple[int, float]]
    """Top-N (token_id, logprob) in descending order, N = params.logprobs."""


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    """None for rows that did not ask for logprobs."""


def make_generator(seed: int, sequence_index: int = 0) -> torch.Generator:
    """A CPU generator for one sequence of a seeded request.

    Hashing (seed, index) gives each of the n sequences its own stream, the same on every run and machine;
    seeding with seed + index instead would make sequence 1 of seed s replay sequence 0 of seed s + 1.
    """
    digest = hashlib.blake2b(f"{seed}:{sequence_index}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little"))
    return generator


def _token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device):
    """Distinct (row, token) pairs over the lists, and how often each occurs, as three 1-D tensors.

    Penalties touch only these pairs, so their cost follows the token count, not rows x vocab.
    """
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    ids = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=int(lengths.sum()))
    rows = np.repeat(np.arange(len(token_lists), dtype=np.int64), lengths)
    # Ids past the logits' width (a tokenizer larger than the model's head) cannot be penalised; skip them.
    valid = (ids >= 0) & (ids < vocab_size)
    keys, counts = np.unique(rows[valid] * vocab_size + ids[valid], return_counts=True)
    return (
        torch.from_numpy(keys // vocab_size).to(device),
        torch.from_numpy(keys % vocab_size).to(device),
        torch.from_numpy(counts).to(device),
    )


def apply_repetition_penalty(
    logits: torch.Tensor, token_ids: Sequence[Sequence[int]], penalties: torch.Tensor
) -> torch.Tensor:
    """In place. HF/vLLM semantics: a token seen in token_ids[i] has a positive logit divided by penalties[i]
    and a negative one multiplied, so a penalty > 1 always makes a seen token less likely."""
    rows, ids, _ = _token_counts(token_ids, logits.shape[1], logits.device)
    values = logits[rows, ids]
    p = penalties.to(logits)[rows]
    logits[rows, ids] = torch.where(values > 0, values / p, values * p)
    return logits


def apply_presence_frequency_penalties(
    logits: torch.Tensor, output_token_ids: Sequence[Sequence[int]], presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """In place. OpenAI semantics over generated tokens only: logit -= frequency * count + presence * (count > 0)."""
    rows, ids, counts = _token_counts(output_token_ids, logits.shape[1], logits.device)
    logits[rows, ids] -= frequency.to(logits)[rows] * counts.to(logits) + presence.to(logits)[rows]
    return logits


def apply_temperature(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """In place."""
    return logits.div_(temperatures.to(logits).unsqueeze(1))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """In place. Drop tokens whose probability is below min_p times the most likely token's.

    Compared in log space, p_i < min_p * p_max <=> logit_i < logit_max + log(min_p), which needs no softmax;
    min_p = 0 gives log 0 = -inf and keeps everything.
    """
    threshold = logits.amax(dim=1, keepdim=True) + torch.log(min_p.to(logits)).unsqueeze(1)
    return logits.masked_fill_(logits < threshold, _NEG_INF)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """In place. Keep exactly top_k[i] most likely tokens of row i (each 1..vocab); one partial sort for the batch."""
    k_max = int(top_k.max())
    order = logits.topk(k_max, dim=1).indices
    beyond_k = torch.arange(k_max, device=logits.device).unsqueeze(0) >= top_k.to(logits.device).unsqueeze(1)
    # Dropping by sorted position keeps exactly k even when logits tie at the boundary.
    drop = torch.ones(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, order, beyond_k)
    return logits.masked_fill_(drop, _NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """In place. Keep the smallest set of most likely tokens whose probability mass reaches top_p[i]
    (at least one token).

    The nucleus is searched among the top candidates, widening the candidate set only for rows whose
    nucleus does not fit yet, so each row's result depends on that row alone and a full sort is rare.
    """
    n, vocab = logits.shape
    top_p = top_p.to(logits)
    log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
    pending = torch.arange(n, device=logits.device)
    k = min(vocab, _TOP_P_FIRST_CANDIDATES)
    while pending.numel():
        # Rows are written only once done, so while every row is pending the logits are read in place (a
        # gather of all rows copies the whole batch).
        values, ids = (logits if pending.numel() == n else logits[pending]).topk(k, dim=1)
        probs = (values - log_norm[pending]).exp_()
        mass = probs.cumsum(dim=1)
        p = top_p[pending].unsqueeze(1)
        # The nucleus is complete once the candidates' mass reaches p or they include every possible token.
        fits = (mass[:, -1:] >= p).squeeze(1) | torch.isneginf(values[:, -1])
        if k == vocab:
            fits[:] = True
        # Token j stays while the mass before it is still short of p; the first token always stays.
        values.masked_fill_(mass - probs >= p, _NEG_INF)
        done = pending[fits]
        if done.numel() == n:  # every row at once, the usual case: no gather/scatter of whole rows
            logits.fill_(_NEG_INF).scatter_(1, ids, values)
        elif done.numel():
            rows_out = torch.full((done.numel(), vocab), _NEG_INF, device=logits.device)
            logits[done] = rows_out.scatter_(1, ids[fits], values[fits])
        pending = pending[~fits]
        k = min(vocab, k * _TOP_P_GROWTH)
    return logits


def _argmax_rows(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the first one on ties; a NaN counts as the largest, as in torch)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        # numpy's argmax over a 49k vocabulary: ~5 us against torch's 40-80 us here (2 threads).
        return logits.numpy().argmax(axis=1).tolist()
    return logits.argmax(dim=1).tolist()


def _rows_selector(indices: list[int], n: int, device: torch.device) -> slice | torch.Tensor:
    # A slice avoids a gather/scatter copy when every row is selected, the usual case.
    return slice(None) if len(indices) == n else torch.tensor(indices, dtype=torch.long, device=device)


def _on_rows(x: torch.Tensor, indices: list[int], fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Apply the in-place transform fn to rows `indices` of x."""
    if len(indices) == x.shape[0]:
        fn(x)
    elif indices:
        sel = _rows_selector(indices, x.shape[0], x.device)
        x[sel] = fn(x[sel])


class Sampler:
    """Picks one token per logits row.

    generator: the shared RNG for unseeded rows (one number per row and step); None uses torch's default CPU
    RNG, so torch.manual_seed makes whole runs reproducible. structured: computes the token masks of rows with a
    grammar (needed once any row has one).
    """

    def __init__(self, generator: torch.Generator | None = None, structured: StructuredOutputs | None = None) -> None:
        self.generator = generator
        self.structured = structured

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow], overwrite: bool = False) -> SamplerOutput:
        """overwrite: the caller is done with `logits`, so the transforms may write into them unless a row's
        logprobs need them raw (skips a [rows, vocab] copy)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
        n, vocab = logits.shape
        if n == 0:
            return SamplerOutput(token_ids=[], logprobs=[])
        device = logits.device
        params = [row.params for row in rows]
        masked = [i for i, row in enumerate(rows) if row.grammar is not None]
        if not masked and all(p.greedy and not p.rewrites_logits and p.logprobs is None for p in params):
            # Nothing rewrites the logits and nothing else is asked: the argmax is all (the usual greedy step).
            return SamplerOutput(token_ids=_argmax_rows(logits), logprobs=[None] * n)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]

        # Transforms work in place on a float32 copy, so the caller's logits stay intact (the logprobs need
        # them raw). The copy is skipped when no transform writes into x itself (truncating only some rows
        # works on a gathered copy anyway): vocab-wide copies are a large part of a CPU sampling step.
        x = logits.to(torch.float32)
        writes_all = bool(masked) or any(p.rewrites_logits for p in params) or (
            len(sampled) == n and any(_truncates(p) for p in params)
        )
        keep_raw = not overwrite or any(p.logprobs is not None for p in params)
        if writes_all and keep_raw and x.data_ptr() == logits.data_ptr():
            x = x.clone()

        self._apply_logit_bias(x, params)
        if masked:
            if self.structured is None:
                raise ValueError("rows with a grammar need a Sampler built with structured=StructuredOutputs(...)")
            self.structured.apply_masks(x, masked, [rows[i].grammar for i in masked])
        self._apply_penalties(x, rows)

        tokens = torch.empty(n, dtype=torch.long, device=device)
        if greedy:
            sel = _rows_selector(greedy, n, device)
            tokens[sel] = torch.tensor(_argmax_rows(x[sel]), dtype=torch.long, device=device)
        if sampled:
            sel = _rows_selector(sampled, n, device)
            xs = x[sel]
            self._truncate(xs, [params[i] for i in sampled])
            tokens[sel] = torch.tensor(self._draw(xs, [rows[i].generator for i in sampled]), device=device)

        token_list = tokens.tolist()
        return SamplerOutput(token_ids=token_list, logprobs=self._logprobs(logits, tokens, token_list, params))

    def processed_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """A float32 copy of `logits` as the draw sees them: bias, grammar mask and penalties on every row,
        temperature / min-p / top-k / top-p on the non-greedy ones (greedy rows: their argmax is __call__'s token).
        Speculative decoding's rejection sampler reads its target distributions from here."""
        x = logits.to(torch.float32, copy=True)
        params = [r.params for r in rows]
        self._apply_logit_bias(x, params)
        masked = [i for i, r in enumerate(rows) if r.grammar is not None]
        if masked:
            self.structured.apply_masks(x, masked, [rows[i].grammar for i in masked])
        self._apply_penalties(x, rows)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            sel = _rows_selector(sampled, x.shape[0], x.device)
            xs = x[sel]
            self._truncate(xs, [params[i] for i in sampled])
            x[sel] = xs
        return x

    @staticmethod
    def _apply_logit_bias(x: torch.Tensor, params: list[SamplingParams]) -> None:
        """In place: each row's bias added to its tokens' logits (the token ids were checked against the vocabulary)."""
        rows, ids, values = [], [], []
        for i, p in enumerate(params):
            if p.logit_bias:
                rows.extend([i] * len(p.logit_bias))
                ids.extend(p.logit_bias)
                values.extend(p.logit_bias.values())
        if rows:
            rows_t = torch.tensor(rows, device=x.device)
            ids_t = torch.tensor(ids, device=x.device)
            x[rows_t, ids_t] += torch.tensor(values, dtype=x.dtype, device=x.device)

    def _apply_penalties(self, x: torch.Tensor, rows: list[SamplingRow]) -> None:
        """Penalties in place on all rows at once; rows without them pass no tokens and so are untouched."""
        params = [r.params for r in rows]
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = [
                [*r.prompt_token_ids, *r.output_token_ids] if r.params.repetition_penalty != 1.0 else ()
                for r in rows
            ]
            apply_repetition_penalty(x, seen, torch.tensor([p.repetition_penalty for p in params]))
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
            apply_presence_frequency_penalties(
                x,
                [r.output_token_ids for r in rows],
                torch.tensor([p.presence_penalty for p in params]),
                torch.tensor([p.frequency_penalty for p in params]),
            )

    def _truncate(self, x: torch.Tensor, params: list[SamplingParams]) -> None:
        """Temperature, min-p, top-k, top-p on the non-greedy rows, in place."""
        vocab = x.shape[1]
        # Temperature and min-p are elementwise and their neutral values (1, 0) are exact no-ops, so they
        # run over all rows once any row needs them instead of paying a gather/scatter.
        if any(p.temperature != 1.0 for p in params):
            apply_temperature(x, torch.tensor([p.temperature for p in params]))
        if any(p.min_p > 0.0 for p in params):
            apply_min_p(x, torch.tensor([p.min_p for p in params]))
        # Top-k and top-p cost a partial sort, so only the rows asking for them pay it.
        top_k = [i for i, p in enumerate(params) if 1 <= p.top_k < vocab]
        _on_rows(x, top_k, lambda sub: apply_top_k(sub, torch.tensor([params[i].top_k for i in top_k])))
        top_p = [i for i, p in enumerate(params) if p.top_p < 1.0]
        _on_rows(x, top_p, lambda sub: apply_top_p(sub, torch.tensor([params[i].top_p for i in top_p])))

    def _draw(self, x: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
        """One token per row of the (already truncated) logits, drawn from their softmax."""
        u = np.empty(x.shape[0])
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            device = self.generator.device if self.generator is not None else "cpu"
            u[unseeded] = torch.rand(len(unseeded), dtype=torch.float64, generator=self.generator,
                                     device=device).cpu().numpy()
        for i, g in enumerate(generators):
            if g is not None:  # the row's own generator alone decides its draw
                u[i] = torch.rand((), dtype=torch.float64, generator=g, device=g.device).item()
        return draw_from_softmax(x, u)

    def _logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, token_list: list[int], params: list[SamplingParams]
    ) -> list[TokenLogprobs | None]:
        """The model's raw log-softmax (before penalties and temperature) for rows that asked, as vLLM does."""
        n, vocab = logits.shape
        out: list[TokenLogprobs | None] = [None] * n
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not wanted:
            return out
        sel = _rows_selector(wanted, n, logits.device)
        lp = torch.log_softmax(logits[sel].to(torch.float32), dim=1)
        chosen = lp.gather(1, tokens[sel].unsqueeze(1))
        ranks = ((lp > chosen).sum(dim=1) + 1).tolist()
        chosen = chosen.squeeze(1).tolist()
        n_top = min(vocab, max(params[i].logprobs for i in wanted))
        top_values, top_ids = lp.topk(n_top, dim=1) if n_top else (lp[:, :0], lp[:, :0].long())
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for j, i in enumerate(wanted):
            k = params[i].logprobs
            out[i] = TokenLogprobs(
                token_id=token_list[i],
                logprob=chosen[j],
                rank=ranks[j],
                top=list(zip(top_ids[j][:k], top_values[j][:k])),
            )
        return out


def draw_from_softmax(x: torch.Tensor, u: np.ndarray) -> list[int]:
    """Row r's token: the first index whose cumulative softmax(x[r]) weight exceeds u[r] (in [0, 1)) times the
    row's total. Tokens at -inf have no weight and are never drawn. x: [n, vocab] float, any device; u: [n].

    The vocabulary-wide work (max, exp, block sums) runs in torch where x is; the searches over the block sums
    and inside the chosen block, a few hundred numbers a row, run in numpy on the CPU: as ~20 small torch ops
    they cost more than the exp itself (one row of 49k: the whole draw took 0.35 ms that way, 0.19 ms so)."""
    n, vocab = x.shape
    # Weights relative to the row's largest logit: at most 1, so no overflow; -inf -> 0.
    w = (x - x.amax(dim=1, keepdim=True)).exp_()
    pad = -vocab % _DRAW_BLOCK
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    blocks = w.view(n, -1, _DRAW_BLOCK)
    # Cumulative weight after each block, summed in float64 over float32 block sums.
    ends = blocks.sum(dim=2).cpu().numpy().cumsum(axis=1, dtype=np.float64)
    total = ends[:, -1]
    # Strictly below the total, so the target falls in a block that has weight.
    target = np.minimum(np.asarray(u, dtype=np.float64) * total, np.nextafter(total, 0.0))
    last = ends.shape[1] - 1
    block = np.minimum((ends <= target[:, None]).sum(axis=1), last)  # the first block ending above the target
    rows = np.arange(n)
    before = np.where(block > 0, ends[rows, block - 1], 0.0)
    if x.device.type == "cpu":  # numpy's gather skips torch's indexing dispatch (~30 us)
        chosen = blocks.numpy()[rows, block]
    else:
        chosen = blocks[torch.from_numpy(rows).to(x.device), torch.from_numpy(block).to(x.device)].cpu().numpy()
    inside = chosen.cumsum(axis=1, dtype=np.float64)
    # The block's own running sum may differ from `ends` in the last bits: keep the remainder strictly inside it.
    rest = np.minimum(target - before, np.nextafter(inside[:, -1], 0.0))
    offset = np.minimum((inside <= rest[:, None]).sum(axis=1), _DRAW_BLOCK - 1)
    # The minimums change nothing for finite rows; a row with NaN gets some token instead of an index error.
    return np.minimum(block * _DRAW_BLOCK + offset, vocab - 1).tolist()


def _truncates(p: SamplingParams) -> bool:
    """The params change a sampled row's logits before the draw."""
    return p.temperature != 1.0 or p.min_p > 0.0 or p.top_k_enabled or p.top_p < 1.0
