"""Continuous batching with a per-step token budget.

NOTE: the scheduler thinks in token counts, not phases (vLLM v1's rule). Every sequence has
`num_computed_tokens` (K/V in the cache) and `num_tokens` (prompt + output); each step gives sequences
budget to catch up. A long prompt is cut into chunks, a decoding sequence needs one token, and a sequence
preempted for lack of KV blocks simply restarts from zero computed tokens and is recomputed later.
A decoding sequence with k draft tokens (speculative decoding, Request.spec_token_ids) needs 1 + k: the drafts'
K/V are written, but only the accepted ones are counted as computed (accept()), so a rejected draft's slot is
overwritten by the next step and never reaches the prefix cache.

NOTE: decode latency beside new prompts. Decodes are scheduled first and prompts fill the rest of the budget, so a
step that admits prompts while others decode is as long as its prompt tokens make it, and every decoding sequence
waits for it: on CPU, where a row costs about the same whether it is a decode or a prompt token (deterministic steps
run both as decode rows, 128 a fused call), 16 streams of 256-token prompts and 64-token answers put ~4 prompt rows
beside each decode row. SchedulerConfig.max_prefill_tokens_with_decodes caps the prompt tokens of such steps (and
so the steps decodes wait for); the prompts then take more steps (higher TTFT, fewer sequences decoding at once).
Tokens do not change with it in deterministic mode (chunking does not matter there).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from jisu.config import SchedulerConfig
from jisu.request import FinishReason, Request, RequestStatus
from jisu.scheduler.blocks import BlockManager


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    samples: bool = False
    """This step reaches the end of the sequence's known tokens, so its next token is sampled."""
    num_spec: int = 0
    """Of num_new_tokens, the draft tokens (the last ones) to verify: the step samples 1 + num_spec rows."""

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> "ScheduledRequest":
        # A request of max_tokens 0 (prompt logprobs, embeddings) computes its prompt and never samples.
        end = request.num_computed_tokens + num_new_tokens
        reaches_end = end >= request.num_tokens
        return cls(request, num_new_tokens, reaches_end and request.params.max_tokens != 0,
                   max(0, end - request.num_tokens))


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.total_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # Prompt (and recompute) tokens this step may take: capped while sequences decode (see the NOTE).
        prefill_budget = budget
        cap = self.config.max_prefill_tokens_with_decodes
        if cap is not None and any(r.num_tokens - r.num_computed_tokens == 1 for r in self.running):
            prefill_budget = min(budget, cap)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            decoding = req.num_tokens - req.num_computed_tokens == 1
            if not decoding and prefill_budget <= 0:
                i += 1  # a prompt mid-chunking waits for a later step
                continue
            if req.spec_token_ids and not decoding:
                _drop_drafts(req, 0)  # drafts follow the last real token only
            n = min(req.num_tokens + len(req.spec_token_ids) - req.num_computed_tokens, budget)
            if not decoding:
                n = min(n, prefill_budget)
            if req.spec_token_ids:  # the budget may cut the drafts short
                _drop_drafts(req, max(0, req.num_computed_tokens + n - req.num_tokens))
            if self._allocate_or_preempt(req, n, out):
                out.scheduled.append(ScheduledRequest.of(req, n))
                budget -= n
                if not decoding:
                    prefill_budget -= n
                i += 1
        # New sequences join only when nothing had to be preempted: admitting one would just evict another.
        while (self.waiting and budget > 0 and prefill_budget > 0 and not out.preempted
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            _drop_drafts(req, 0)
            first_time = req.times.first_scheduled is None
            # A request that keeps its prompt rows (prompt logprobs, pooling) must compute them, so no cache hit.
            if req.num_computed_tokens == 0 and not req.needs_prompt_rows:
                req.num_computed_tokens = self.blocks.match_prefix(req.request_id, req.all_token_ids)
            n = min(req.num_tokens - req.num_computed_tokens, budget, prefill_budget)
            if not self.blocks.allocate(req.request_id, req.num_computed_tokens + n):
                self.blocks.free(req.request_id)  # give back any prefix hit; it is looked up again next time
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            now = time.perf_counter()
            req.times.events.append(("scheduled", now, now, req.num_computed_tokens))
            if first_time:
                req.times.first_scheduled = now
                req.num_cached_tokens = req.num_computed_tokens
            self.running.append(req)
            out.scheduled.append(ScheduledRequest.of(req, n))
            budget -= n
            prefill_budget -= n
        return out

    def _allocate_or_preempt(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Finds blocks for `n` more tokens of a running sequence, preempting the newest sequences if needed.
        Returns False if `req` itself had to be preempted."""
        while not self.blocks.allocate(req.request_id, req.num_computed_tokens + n):
            victim = self.running.pop()
            self._preempt(victim, out)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.blocks.free(req.request_id)
        req.num_computed_tokens = 0
        _drop_drafts(req, 0)
        req.status = RequestStatus.PREEMPTED
        req.times.num_preemptions += 1
        now = time.perf_counter()
        req.times.events.append(("preempted", now, now, 0))
        self.total_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req.request_id)

    def update(self, out: SchedulerOutput) -> None:
        """Records that the scheduled tokens' K/V are now in the cache (draft tokens only once accepted)."""
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens - s.num_spec
            self.blocks.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)

    def accept(self, req: Request, num_accepted: int) -> None:
        """Counts a sequence's `num_accepted` verified drafts as computed: their K/V were written at the positions
        the accepted tokens now hold (call after appending them). The slots of rejected drafts stay uncounted."""
        if req.is_finished or num_accepted <= 0:
            return
        req.num_computed_tokens += num_accepted
        self.blocks.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)

    def finish(self, req: Request, reason: FinishReason | None = None) -> None:
        """Removes a finished (or aborted) sequence and returns its blocks."""
        if reason is not None:
            req.finish(reason)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req.request_id)


def _drop_drafts(req: Request, keep: int) -> None:
    """Keeps the first `keep` draft tokens of `req` (and their draft distributions)."""
    if len(req.spec_token_ids) > keep:
        req.spec_token_ids = req.spec_token_ids[:keep]
        req.spec_probs = None if req.spec_probs is None or keep == 0 else req.spec_probs[:keep]
