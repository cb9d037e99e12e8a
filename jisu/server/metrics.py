"""Prometheus metrics, named and defined as vLLM's `vllm:` metrics with a `jisu:` prefix.

Each server has its own CollectorRegistry, so a process (the tests) can run several servers. Everything
here is recorded from the engine thread; prometheus-client's metrics are thread-safe, and /metrics only
renders them.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# Bucket edges in seconds, spanning a tiny model on a GPU to a large one on a laptop CPU.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The *_created series double the output and no dashboard reads them (vLLM turns them off too).
disable_created_metrics()


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        reg = self.registry

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=reg).labels(model_name)

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=reg).labels(model_name)

        self.time_to_first_token = histogram(
            "jisu:time_to_first_token_seconds", "Histogram of time to first token in seconds.", _LATENCY_BUCKETS
        )
        self.inter_token_latency = histogram(
            "jisu:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _TOKEN_GAP_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "jisu:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", _LATENCY_BUCKETS
        )
        self.request_queue_time = histogram(
            "jisu:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            _LATENCY_BUCKETS,
        )
        self.num_requests_running = gauge("jisu:num_requests_running", "Number of requests in model execution batches.")
        self.num_requests_waiting = gauge("jisu:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_cache_usage = gauge("jisu:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        # Not in vLLM: exact block counts, so a leak of a single block is visible (usage is a rounded fraction).
        self.kv_cache_used_blocks = gauge("jisu:kv_cache_used_blocks", "KV-cache blocks held by sequences.")
        self.kv_cache_total_blocks = gauge("jisu:kv_cache_total_blocks", "KV-cache blocks in the pool.")
        self.prefix_cache_queries = counter(
            "jisu:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_cache_hits = counter(
            "jisu:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.prompt_tokens = counter("jisu:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("jisu:generation_tokens", "Number of generation tokens processed.")
        self._success = Counter(
            "jisu:request_success",
            "Count of successfully processed requests.",
            labels + ["finished_reason"],
            registry=reg,
        )
        self._model_name = model_name
        # Not in vLLM: requests turned away with 503 (queue full, shutting down).
        self._rejected = Counter(
            "jisu:request_rejected", "Requests refused with 503.", labels + ["reason"], registry=reg
        )
        self._last_prefix = (0, 0)
        # Speculative decoding, as vLLM's spec_decode_* counters (they stay 0 unless the engine speculates).
        self.spec_decode_num_drafts = counter("jisu:spec_decode_num_drafts", "Number of spec decoding drafts.")
        self.spec_decode_num_draft_tokens = counter("jisu:spec_decode_num_draft_tokens", "Number of draft tokens.")
        self.spec_decode_num_accepted_tokens = counter(
            "jisu:spec_decode_num_accepted_tokens", "Number of accepted tokens."
        )
        self._spec_per_pos = Counter(
            "jisu:spec_decode_num_accepted_tokens_per_pos", "Accepted tokens per draft position.",
            labels + ["position"], registry=reg,
        )
        self._last_spec = (0, 0, 0, [])

    def request_finished(self, finished_reason: str) -> None:
        self._success.labels(self._model_name, finished_reason).inc()

    def request_rejected(self, reason: str) -> None:
        self._rejected.labels(self._model_name, reason).inc()

    def engine_state(self, engine, pending_sequences: int) -> None:
        """Copies the scheduler's and block pool's state into the gauges (engine thread only)."""
        scheduler, blocks = engine.scheduler, engine.blocks
        self.num_requests_running.set(len(scheduler.running))
        self.num_requests_waiting.set(len(scheduler.waiting) + pending_sequences)
        self.kv_cache_usage.set(blocks.usage)
        self.kv_cache_used_blocks.set(blocks.num_blocks - blocks.num_free_blocks)
        self.kv_cache_total_blocks.set(blocks.num_blocks)
        # The block manager keeps cumulative counts (once prefix caching lands); counters take the increase.
        queries = getattr(blocks, "prefix_cache_queries", 0)
        hits = getattr(blocks, "prefix_cache_hits", 0)
        last_q, last_h = self._last_prefix
        if queries > last_q:
            self.prefix_cache_queries.inc(queries - last_q)
        if hits > last_h:
            self.prefix_cache_hits.inc(hits - last_h)
        self._last_prefix = (max(queries, last_q), max(hits, last_h))
        speculator = getattr(engine, "speculator", None)
        if speculator is not None:
            self._spec_state(speculator.stats)

    def _spec_state(self, stats) -> None:
        """The speculator's cumulative counts into the counters (by their increase since the last call)."""
        drafts, tokens, accepted, per_pos = self._last_spec
        self.spec_decode_num_drafts.inc(stats.num_drafts - drafts)
        self.spec_decode_num_draft_tokens.inc(stats.num_draft_tokens - tokens)
        self.spec_decode_num_accepted_tokens.inc(stats.num_accepted_tokens - accepted)
        for pos, count in enumerate(stats.accepted_per_pos):
            before = per_pos[pos] if pos < len(per_pos) else 0
            if count > before or pos >= len(per_pos):
                self._spec_per_pos.labels(self._model_name, str(pos)).inc(count - before)
        self._last_spec = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens,
                           list(stats.accepted_per_pos))

    def render(self) -> bytes:
        return generate_latest(self.registry)
