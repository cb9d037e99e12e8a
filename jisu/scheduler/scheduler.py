"""Continuous batching with a per-step token budget.

NOTE: the scheduler thinks in token counts, not phases (vLLM v1's rule). Every sequence has
`num_computed_tokens` (K/V in the cache) and `num_tokens` (prompt + output); each step gives sequences
budget to catch up. A long prompt is cut into chunks, a decoding sequence needs one token, and a sequence
preempted for lack of KV blocks simply restarts from zero computed tokens and is recomputed later.
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

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> "ScheduledRequest":
        # A request of max_tokens 0 (prompt logprobs, embeddings) computes its prompt and never samples.
        reaches_end = request.num_computed_tokens + num_new_tokens == request.num_tokens
        return cls(request, num_new_tokens, reaches_end and request.params.max_tokens != 0)


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
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self._allocate_or_preempt(req, n, out):
                out.scheduled.append(ScheduledRequest.of(req, n))
                budget -= n
                i += 1
        # New sequences join only when nothing had to be preempted: admitting one would just evict another.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            first_time = req.times.first_scheduled is None
            # A request that keeps its prompt rows (prompt logprobs, pooling) must compute them, so no cache hit.
            if req.num_computed_tokens == 0 and not req.needs_prompt_rows:
                req.num_computed_tokens = self.blocks.match_prefix(req.request_id, req.all_token_ids)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
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
        req.status = RequestStatus.PREEMPTED
        req.times.num_preemptions += 1
        now = time.perf_counter()
        req.times.events.append(("preempted", now, now, 0))
        self.total_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req.request_id)

    def update(self, out: SchedulerOutput) -> None:
        """Records that the scheduled tokens' K/V are now in the cache."""
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
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
