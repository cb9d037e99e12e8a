"""A sequence as the scheduler and engine see it, and what the caller gets back."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from jisu.sampling_params import SamplingParams
from jisu.spec_decode.stats import SpecDecodeStats

if TYPE_CHECKING:
    from jisu.pooling import PoolingParams
    from jisu.sampling import TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"


@dataclass
class RequestTimes:
    """Wall-clock instants (time.perf_counter) of one sequence's life."""

    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    num_preemptions: int = 0
    token_times: list[float] = field(default_factory=list)
    """When each output token was produced."""
    events: list[tuple[str, float, float, int]] = field(default_factory=list)
    """(kind, start, end, tokens) for 'scheduled', 'prefill' (one per chunk), 'preempted', and with speculative
    decoding 'draft' (tokens proposed) and 'verify' (drafts accepted, in the step's forward and sampling)."""

    def to_dict(self) -> dict:
        return {
            "arrival": self.arrival, "first_scheduled": self.first_scheduled, "first_token": self.first_token,
            "last_token": self.last_token, "finished": self.finished, "num_preemptions": self.num_preemptions,
            "token_times": list(self.token_times),
            "events": [{"kind": k, "start": a, "end": b, "tokens": n} for k, a, b, n in self.events],
        }


class Request:
    """One sequence: a prompt and its growing output. A request with n > 1 becomes n of these."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        max_model_len: int | None = None,
        generator: torch.Generator | None = None,
        parent_id: str | None = None,
        index: int = 0,
        pooling: PoolingParams | None = None,
    ):
        self.request_id = request_id
        self.parent_id = parent_id or request_id
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[TokenLogprobs | None] = []
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.generator = generator
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        """The stop string or stop token id that ended the sequence, if one did."""
        self.num_computed_tokens = 0
        """Tokens whose K/V are in the cache. The scheduler catches this up to len(all_token_ids)."""
        self.num_cached_tokens = 0
        """Prompt tokens whose K/V were found in the prefix cache when the sequence was first scheduled."""
        self.times = RequestTimes()
        self.grammar = None
        """The sequence's structured-output matcher (jisu.structured.grammar.GrammarMatcher), if it has one."""
        # Prompt rows kept beyond sampling (only the first of n sequences computes them; the prompt is shared).
        self.prompt_logprobs_k: int | None = params.prompt_logprobs if index == 0 else None
        """Top-N per prompt token to keep (0: only the token's own logprob); None keeps no logprob rows."""
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            None if self.prompt_logprobs_k is None else [None] * len(self.prompt_token_ids)
        )
        """By position (a recompute after preemption overwrites); entry 0 stays None: nothing predicts it."""
        self.pooling = pooling if index == 0 else None
        self.pooled_sum: torch.Tensor | None = None
        """Pooling: float64 sum (mean) or the row (last) of the final hidden states computed so far."""
        self.pooled_upto = 0
        """Pooling: the prompt positions [0, pooled_upto) that pooled_sum holds."""
        self.spec_token_ids: list[int] = []
        """Speculative decoding: draft tokens to verify in the next step (positions num_tokens, num_tokens + 1, ...).
        The scheduler schedules them after the last real token; rejected ones are never counted as computed."""
        self.spec_probs = None
        """float64 numpy [len(spec_token_ids), vocab]: the draft distributions a sampled draft-model proposal drew
        from; None for one-hot proposals (prompt lookup, greedy drafts)."""
        self.spec_stats = SpecDecodeStats()
        """This sequence's drafts verified and accepted (vLLM's spec_decode_* meanings)."""

    @property
    def needs_prompt_rows(self) -> bool:
        """Its prompt rows must be computed here, so the prefix cache is not looked up for it (as vLLM does)."""
        return self.prompt_logprobs is not None or self.pooling is not None

    def keep_prompt_logprobs(self, pos: int, entries: list[TokenLogprobs]) -> None:
        """Logprobs of prompt tokens pos + 1, pos + 2, ... (computed from the rows at pos, pos + 1, ...)."""
        self.prompt_logprobs[pos + 1 : pos + 1 + len(entries)] = entries

    def keep_hidden(self, pos: int, rows: torch.Tensor) -> None:
        """Final hidden states of prompt positions pos.. (in order; a recompute starts again from 0)."""
        if pos == 0:
            self.pooled_sum, self.pooled_upto = None, 0
        if pos != self.pooled_upto and self.pooling.kind == "mean":
            raise RuntimeError(f"{self.request_id}: hidden rows from {pos} arrived after {self.pooled_upto}")
        if self.pooling.kind == "last":
            self.pooled_sum = rows[-1].double()
        else:
            # One running sum in position order (cumsum is sequential), so chunking cannot change the mean.
            start = rows.new_zeros(1, rows.shape[1], dtype=torch.float64) if pos == 0 else self.pooled_sum[None]
            self.pooled_sum = torch.cat([start, rows.double()]).cumsum(0)[-1]
        self.pooled_upto = pos + rows.shape[0]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None, now: float) -> None:
        self.output_token_ids.append(token_id)
        self.output_logprobs.append(logprobs)
        self.times.token_times.append(now)
        if self.times.first_token is None:
            self.times.first_token = now
        self.times.last_token = now

    def check_token_stop(self) -> None:
        """Finishes the sequence if its last token is EOS / a stop id or a length limit is reached."""
        token = self.output_token_ids[-1]
        if not self.params.ignore_eos and token in self.eos_token_ids:
            self.finish(FinishReason.STOP)
        elif token in (self.params.stop_token_ids or ()):
            self.finish(FinishReason.STOP, stop_reason=token)
        elif self.params.max_tokens is not None and len(self.output_token_ids) >= self.params.max_tokens:
            self.finish(FinishReason.LENGTH)
        elif self.max_model_len is not None and self.num_tokens >= self.max_model_len:
            self.finish(FinishReason.LENGTH)

    def finish(self, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        if self.status is RequestStatus.FINISHED:
            return
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.times.finished = time.perf_counter()


@dataclass
class RequestMetrics:
    """Per-request figures; times in seconds, rates in tokens per second."""

    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    e2e_time: float
    queue_time: float | None
    """Arrival to first scheduled."""
    prefill_time: float | None = None
    """First scheduled to first token."""
    decode_time: float | None = None
    """First token to last token."""
    tpot: float | None = None
    """Time per output token after the first: (e2e - ttft) / (completion_tokens - 1), as vllm bench serve."""
    inter_token_latencies: list[float] = field(default_factory=list)
    """Gap before each output token after the first."""
    cached_prompt_tokens: int = 0
    num_preemptions: int = 0
    spec_num_drafts: int = 0
    """Speculative decoding: steps that verified drafts for this sequence (vLLM's spec_decode_num_drafts)."""
    spec_num_draft_tokens: int = 0
    """Draft tokens verified."""
    spec_num_accepted_tokens: int = 0
    """Draft tokens accepted (the token drawn after them is not counted)."""
    spec_accepted_per_pos: list[int] = field(default_factory=list)
    """Accepted drafts by position in the draft (0 = first)."""

    @classmethod
    def from_request(cls, req: Request) -> "RequestMetrics":
        t = req.times
        end = t.finished or time.perf_counter()
        ttft = None if t.first_token is None else t.first_token - t.arrival
        # A request of max_tokens 0 (scoring, embeddings) is all prefill: it ends when its prompt is computed.
        prefill_end = t.first_token
        if prefill_end is None and req.params.max_tokens == 0 and req.finish_reason is FinishReason.LENGTH:
            prefill_end = t.finished
        prefill_rate = None
        if prefill_end is not None and t.first_scheduled is not None and prefill_end > t.first_scheduled:
            prefill_rate = len(req.prompt_token_ids) / (prefill_end - t.first_scheduled)
        n = len(req.output_token_ids)
        decode_rate = None
        if n > 1 and t.last_token is not None and t.first_token is not None and t.last_token > t.first_token:
            decode_rate = (n - 1) / (t.last_token - t.first_token)
        return cls(
            prompt_tokens=len(req.prompt_token_ids),
            completion_tokens=n,
            time_to_first_token=ttft,
            prefill_tokens_per_s=prefill_rate,
            decode_tokens_per_s=decode_rate,
            e2e_time=end - t.arrival,
            queue_time=None if t.first_scheduled is None else t.first_scheduled - t.arrival,
            prefill_time=None if prefill_end is None or t.first_scheduled is None else prefill_end - t.first_scheduled,
            decode_time=None if t.first_token is None or t.last_token is None else t.last_token - t.first_token,
            cached_prompt_tokens=req.num_cached_tokens,
            num_preemptions=t.num_preemptions,
            tpot=(end - t.arrival - ttft) / (n - 1) if n > 1 and ttft is not None else None,
            inter_token_latencies=[b - a for a, b in zip(t.token_times, t.token_times[1:])],
            spec_num_drafts=req.spec_stats.num_drafts,
            spec_num_draft_tokens=req.spec_stats.num_draft_tokens,
            spec_num_accepted_tokens=req.spec_stats.num_accepted_tokens,
            spec_accepted_per_pos=list(req.spec_stats.accepted_per_pos),
        )

    def to_dict(self) -> dict:
        return {**self.__dict__, "inter_token_latencies": list(self.inter_token_latencies),
                "spec_accepted_per_pos": list(self.spec_accepted_per_pos)}


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs | None] | None = None
    metrics: RequestMetrics | None = None
    timeline: RequestTimes | None = None
    """The sequence's events: arrival, scheduling, prefill chunks, each token, preemptions, finish."""


@dataclass
class RequestOutput:
    """What generate() returns per prompt, and what a stream yields (with `finished` False until the end)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """Per prompt token when SamplingParams.prompt_logprobs asked (vLLM's shape: the first entry is None)."""
    embedding: list[float] | None = None
    """The pooled final hidden state of a pooling request (PoolingParams)."""

    # Convenience for the common n == 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
