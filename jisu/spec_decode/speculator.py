"""Speculator: what the engine asks of speculative decoding each step.

After a step's tokens are appended, propose() gives each running sequence that will decode next its draft tokens
(Request.spec_token_ids); the scheduler then schedules 1 + k tokens for it, the runner returns a logits row for
each, and verify() keeps the accepted prefix plus one token (rejection.py). Counters follow vLLM's spec_decode_*
metrics: drafts (sequences x steps that verified drafts), draft tokens, accepted tokens, accepted per position.
"""

from __future__ import annotations

import time

import torch

from jisu.request import Request, RequestStatus
from jisu.sampling import Sampler, SamplingRow
from jisu.spec_decode.config import SpeculativeConfig
from jisu.spec_decode.ngram import ngram_propose
from jisu.spec_decode.rejection import Verified, verify
from jisu.spec_decode.stats import SpecDecodeStats


class Speculator:
    def __init__(self, config: SpeculativeConfig, sampler: Sampler, max_model_len: int, draft_run=None):
        self.config = config
        self.sampler = sampler
        self.max_model_len = max_model_len
        self.k = config.num_speculative_tokens
        self.stats = SpecDecodeStats(self.k)
        self.draft = None
        if config.method == "draft_model":
            from jisu.spec_decode.draft_model import DraftModelProposer

            self.draft = DraftModelProposer(draft_run, sampler)

    def budget(self, req: Request) -> int:
        """Drafts worth proposing for a sequence about to decode: none for grammar-constrained sequences (their
        matcher advances token by token; NOTE: they simply do not speculate) or prompt-only ones; never past
        max_tokens or the context window (a verify emits up to k + 1 tokens)."""
        if (req.is_finished or req.status is not RequestStatus.RUNNING or req.grammar is not None
                or req.pooling is not None or req.num_computed_tokens != req.num_tokens - 1):
            return 0
        params = req.params
        room = self.max_model_len - req.num_tokens - 1
        if params.max_tokens is not None:
            room = min(room, params.max_tokens - len(req.output_token_ids) - 1)
        return max(0, min(self.k, room))

    def propose(self, running: list[Request]) -> None:
        """Sets spec_token_ids (and spec_probs for sampled draft-model proposals) on the running sequences."""
        start = time.perf_counter()
        wanted = []
        for req in running:
            req.spec_token_ids, req.spec_probs = [], None
            k = self.budget(req)
            if k:
                wanted.append((req, k))
        if not wanted:
            return
        if self.draft is None:
            cfg = self.config
            for req, k in wanted:
                req.spec_token_ids = ngram_propose(req.all_token_ids, cfg.prompt_lookup_min, cfg.prompt_lookup_max, k)
        else:
            proposals = self.draft.propose([r for r, _ in wanted], [k for _, k in wanted])
            for (req, _), (tokens, probs) in zip(wanted, proposals):
                req.spec_token_ids, req.spec_probs = tokens, probs
        end = time.perf_counter()
        for req, _ in wanted:
            if req.spec_token_ids:
                req.times.events.append(("draft", start, end, len(req.spec_token_ids)))

    def verify(self, logits: torch.Tensor, reqs: list[Request], drafts: list[list[int]],
               probs: list) -> list[Verified]:
        """logits: each sequence's len(draft) + 1 rows, in order. Counts the drafts and acceptances."""
        rows = []
        for req, draft in zip(reqs, drafts):
            for i in range(len(draft) + 1):
                out = req.output_token_ids if i == 0 else [*req.output_token_ids, *draft[:i]]
                rows.append(SamplingRow(req.params, req.prompt_token_ids, out, req.generator, req.grammar))
        results = verify(self.sampler, logits, rows, drafts, probs)
        for req, draft, res in zip(reqs, drafts, results):
            self.stats.add(len(draft), res.num_accepted)
            req.spec_stats.add(len(draft), res.num_accepted)
        return results

    def release_finished(self) -> None:
        if self.draft is not None:
            self.draft.release_finished()

    def release(self, request_id: str) -> None:
        if self.draft is not None:
            self.draft.release(request_id)
