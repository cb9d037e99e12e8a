"""The engine behind the HTTP server: one thread owns the LLMEngine, handlers talk to it by message.

LLMEngine is not thread-safe, so only the engine thread ever calls it. Handlers put commands (add, abort)
on a thread-safe queue; the thread applies them between steps, runs steps while anything is unfinished,
and hands each request's outputs to its asyncio queue with call_soon_threadsafe. The event loop thus
never waits on a forward pass, and a step never waits on a slow client.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from jisu.pooling import PoolingParams
from jisu.request import CompletionOutput, RequestOutput
from jisu.sampling_params import SamplingParams

logger = logging.getLogger("jisu.server")


class QueueFullError(Exception):
    """More requests are waiting than the server queues; the client should retry later."""


class NotAcceptingError(Exception):
    """The server is shutting down (or its engine thread stopped) and takes no new requests."""


class OutputStream:
    """The outputs of one HTTP request's engine requests (one per prompt), as the engine thread sends them.

    Outputs are cumulative, so the stream keeps only the newest per request: a client that reads slowly
    costs one output's memory, not one per step, and the event loop gets at most one wake-up pending.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, request_ids: list[str]):
        self.loop = loop
        self.request_ids = request_ids
        self.handoff_s = 0.0
        """Seconds between the handler's submit and the engine thread's add_request."""
        self._lock = threading.Lock()
        self._latest: dict[str, RequestOutput] = {}
        self._error: BaseException | None = None
        self._wake_pending = False
        self._ready = asyncio.Event()
        self._finished: set[str] = set()

    @property
    def finished(self) -> bool:
        return len(self._finished) == len(self.request_ids)

    def push(self, item: RequestOutput | BaseException) -> None:
        """Engine thread side."""
        with self._lock:
            if isinstance(item, BaseException):
                self._error = item
            else:
                self._latest[item.request_id] = item
            wake, self._wake_pending = not self._wake_pending, True
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    async def updates(self) -> AsyncIterator[list[RequestOutput]]:
        """Yields, each time something changed, the newest output of every request that changed, until all
        have finished."""
        while not self.finished:
            await self._ready.wait()
            with self._lock:
                self._ready.clear()
                self._wake_pending = False
                latest, self._latest = self._latest, {}
                error = self._error
            if error is not None:
                raise error
            if not latest:  # a wake-up for outputs already taken
                continue
            for out in latest.values():
                if out.finished:
                    self._finished.add(out.request_id)
            yield list(latest.values())

    async def final(self) -> dict[str, RequestOutput]:
        last: dict[str, RequestOutput] = {}
        async for outs in self.updates():
            for out in outs:
                last[out.request_id] = out
        return last


@dataclass
class _Add:
    stream: OutputStream
    prompts: list[list[int]]
    params: SamplingParams
    submitted: float
    done: asyncio.Future
    pooling: PoolingParams | None = None


@dataclass
class _Abort:
    request_ids: list[str]


_WAKE = object()
_STOP = object()


@dataclass
class _Live:
    """Engine-thread bookkeeping of one engine request."""

    stream: OutputStream
    prompt_ids: list[int]
    n: int
    submitted: float
    last: RequestOutput | None = None
    seen: list[int] = field(default_factory=list)
    last_token_at: list[float | None] = field(default_factory=list)
    reported: set[int] = field(default_factory=set)
    """Sequences whose finish has been counted in the metrics."""


class AsyncEngine:
    def __init__(self, engine, metrics, max_queue: int):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet added by the engine thread
        self._waiting = 0  # added, not yet scheduled (published by the engine thread)
        self._free_slots = engine.scheduler.config.max_num_seqs  # run slots unused (published likewise)
        self._live_count = 0  # engine requests in flight (published likewise)
        self._pending_seqs = 0
        self._accepting = True
        self._drain_deadline: float | None = None
        self._live: dict[str, _Live] = {}  # engine thread only
        self._thread: threading.Thread | None = None

    # ---- handler side (event loop thread) ---------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="jisu-engine", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    async def submit(self, prompts: list[list[int]], params: SamplingParams, request_id: str,
                     pooling: PoolingParams | None = None) -> OutputStream:
        """Queues the prompts as engine requests (embedding requests with `pooling`); raises QueueFullError,
        NotAcceptingError, or the engine's InvalidRequestError (e.g. prompt + max_tokens beyond the context)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self.healthy:
                raise NotAcceptingError("the server is shutting down and takes no new requests")
            # Only what will wait counts against the queue: requests the free run slots take start at once.
            waiting = max(0, self._pending + self._waiting - self._free_slots)
            if self._pending + self._waiting + len(prompts) > self.max_queue + self._free_slots:
                self.metrics.request_rejected("queue_full")
                raise QueueFullError(
                    f"the server is at capacity: {waiting} requests are waiting "
                    f"and at most {self.max_queue} may wait; retry later"
                )
            self._pending += len(prompts)
            self._pending_seqs += len(prompts) * params.n
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        stream = OutputStream(loop, ids)
        done = loop.create_future()
        self._commands.put(_Add(stream, prompts, params, time.perf_counter(), done, pooling))
        try:
            await done
        except asyncio.CancelledError:
            self.abort(stream)
            raise
        return stream

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished (as of the engine thread's last report)."""
        with self._lock:
            return self._pending + self._live_count

    def abort(self, stream: OutputStream) -> None:
        """Stops the stream's unfinished requests and frees their KV blocks (the caller is gone)."""
        if not stream.finished:
            self._commands.put(_Abort(stream.request_ids))

    def begin_drain(self, grace_s: float) -> None:
        """Stops taking requests; those in flight may finish for `grace_s` seconds, then are aborted."""
        with self._lock:
            self._accepting = False
            deadline = time.perf_counter() + grace_s
            if self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_deadline = deadline
        self._commands.put(_WAKE)

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Aborts whatever is left and stops the engine thread."""
        with self._lock:
            self._accepting = False
        self._commands.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)

    # ---- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._apply_commands(block=not self.engine.has_unfinished_requests()):
                if self._drain_deadline is not None and time.perf_counter() >= self._drain_deadline:
                    self._abort_all("the server shut down before the request finished")
                if self.engine.has_unfinished_requests():
                    self._step()
                    if not self.engine.has_unfinished_requests():
                        release_free_memory()
                self._publish()
        except BaseException:
            logger.exception("the engine thread stopped on an unexpected error")
            with self._lock:
                self._accepting = False
            self._fail_all(RuntimeError("the engine stopped on an internal error"))
            raise
        self._abort_all("the server shut down before the request finished")
        self._refuse_queued()
        self._publish()

    def _refuse_queued(self) -> None:
        """Answers adds that arrived after the stop, so no handler waits on them forever."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                with self._lock:
                    self._pending -= len(cmd.prompts)
                    self._pending_seqs -= len(cmd.prompts) * cmd.params.n
                _settle(cmd.stream.loop, cmd.done, NotAcceptingError("the server is shutting down"))

    def _apply_commands(self, block: bool) -> bool:
        """Applies queued commands (waiting for one if `block`); False once asked to stop."""
        try:
            cmd = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd is _STOP:
                return False
            if isinstance(cmd, _Add):
                self._add(cmd)
            elif isinstance(cmd, _Abort):
                self._abort(cmd.request_ids)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, cmd: _Add) -> None:
        added: list[str] = []
        error: BaseException | None = None
        try:
            for rid, prompt in zip(cmd.stream.request_ids, cmd.prompts):
                self.engine.add_request(prompt, cmd.params, request_id=rid, pooling=cmd.pooling)
                added.append(rid)
        except Exception as e:  # InvalidRequestError, mostly; the handler turns it into a 4xx
            error = e
            for rid in added:
                self.engine.abort(rid)
        else:
            cmd.stream.handoff_s = time.perf_counter() - cmd.submitted
            for rid, prompt in zip(added, cmd.prompts):
                n = cmd.params.n
                self._live[rid] = _Live(cmd.stream, prompt, n, cmd.submitted, None, [0] * n, [None] * n)
        with self._lock:
            self._pending -= len(cmd.prompts)
            self._pending_seqs -= len(cmd.prompts) * cmd.params.n
        self._publish()
        _settle(cmd.stream.loop, cmd.done, error)

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            live = self._live.pop(rid, None)
            if live is not None:
                self.engine.abort(rid)
                self._count_unfinished(live)

    def _abort_all(self, why: str) -> None:
        """Ends every request, telling each client it was aborted (finish_reason "abort")."""
        for rid, live in list(self._live.items()):
            self.engine.abort(rid)
            self._count_unfinished(live)
            live.stream.push(_aborted(rid, live))
        if self._live:
            logger.warning("aborted %d request(s): %s", len(self._live), why)
        self._live.clear()

    def _fail_all(self, error: BaseException) -> None:
        for rid, live in list(self._live.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # the engine may be in any state after an internal error
                pass
            live.stream.push(error)
        self._live.clear()

    def _count_unfinished(self, live: _Live) -> None:
        for i in range(live.n):
            if i not in live.reported:
                live.reported.add(i)
                self.metrics.request_finished("abort")

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            # The request state after a failed step is unknown; end them all rather than loop on the error.
            logger.exception("engine step failed; aborting the requests in flight")
            self._fail_all(RuntimeError("the engine failed while generating; the request was aborted"))
            return
        now = time.perf_counter()
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            live.last = out
            self._record(live, out, now)
            live.stream.push(out)
            if out.finished:
                del self._live[out.request_id]

    def _record(self, live: _Live, out: RequestOutput, now: float) -> None:
        m = self.metrics
        for c in out.outputs:
            i = c.index
            new = len(c.token_ids) - live.seen[i]
            if new > 0:
                if not any(live.seen):
                    m.time_to_first_token.observe(now - live.submitted)
                    m.prompt_tokens.inc(len(live.prompt_ids))
                previous = live.last_token_at[i]
                if previous is not None:
                    for _ in range(new):
                        m.inter_token_latency.observe((now - previous) / new)
                m.generation_tokens.inc(new)
                live.seen[i] = len(c.token_ids)
                live.last_token_at[i] = now
            if c.finish_reason is not None and i not in live.reported:
                live.reported.add(i)
                m.request_finished(c.finish_reason)
        if out.finished:
            if not any(live.seen):  # max_tokens 0 (scoring, embeddings): its prompt was computed all the same
                m.prompt_tokens.inc(len(live.prompt_ids))
            m.e2e_request_latency.observe(now - live.submitted)
            if out.metrics is not None and out.metrics.queue_time is not None:
                m.request_queue_time.observe(out.metrics.queue_time + live.stream.handoff_s)

    def _publish(self) -> None:
        scheduler = self.engine.scheduler
        waiting = len({r.parent_id for r in scheduler.waiting})
        free_slots = max(0, scheduler.config.max_num_seqs - len(scheduler.running))
        with self._lock:
            self._waiting = waiting
            self._free_slots = free_slots
            self._live_count = len(self._live)
            pending_seqs = self._pending_seqs
        self.metrics.engine_state(self.engine, pending_seqs)


def _settle(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, error: BaseException | None) -> None:
    def settle():
        if fut.done():  # the handler was cancelled; its abort command follows
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass


def _aborted(request_id: str, live: _Live) -> RequestOutput:
    """The final output of a request the server ended: what it had, with finish_reason "abort"."""
    if live.last is not None:
        outputs = [replace(c, finish_reason=c.finish_reason or "abort") for c in live.last.outputs]
    else:
        outputs = [CompletionOutput(index=i, text="", token_ids=[], finish_reason="abort") for i in range(live.n)]
    return RequestOutput(request_id, None, live.prompt_ids, outputs, finished=True, metrics=None)


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def release_free_memory() -> None:
    """Returns freed heap pages to the OS (glibc's malloc_trim), called when the engine goes idle.

    NOTE: the engine's, torch's and OpenMP's threads free their buffers into per-thread malloc arenas that glibc
    rarely shrinks. Soaks of the default model grew the server's RSS by 246 MiB in 2 minutes without this (99 MiB
    with MALLOC_ARENA_MAX=2) and by 112 MiB in 4 minutes with it (benchmarks/soak.py); what remains is not yet
    explained. A trim when the last request finishes costs ~10 ms; without glibc it does nothing.
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)
