"""Chrome / Perfetto trace of a run: engine steps with their phases, and one track per request.

Trace Event Format (the JSON that chrome://tracing and ui.perfetto.dev open): complete events ("X") with
microsecond timestamps and durations, instant events ("i") for tokens and preemptions, counter events
("C") for the batch, and metadata events ("M") naming processes and threads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from jisu.profile.timeline import PHASES, StepRecord
from jisu.request import RequestTimes

ENGINE_PID, REQUESTS_PID = 1, 2


def build_trace(steps: Iterable[StepRecord], requests: Iterable[tuple[str, RequestTimes]]) -> dict:
    steps = list(steps)
    requests = list(requests)
    starts = [s.start for s in steps] + [t.arrival for _, t in requests]
    origin = min(starts) if starts else 0.0

    def us(t: float) -> float:
        return round((t - origin) * 1e6, 3)

    events: list[dict] = [
        _meta("process_name", ENGINE_PID, 0, "engine"),
        _meta("thread_name", ENGINE_PID, 1, "steps"),
        _meta("process_name", REQUESTS_PID, 0, "requests"),
    ]
    for s in steps:
        args = {"index": s.index, "sequences": s.num_seqs, "tokens": s.num_tokens,
                "prefill_tokens": s.num_prefill_tokens, "decodes": s.num_decodes, "preempted": s.num_preempted}
        if s.forward_device is not None:
            args["forward_device_ms"] = s.forward_device * 1e3
        events.append(_complete(f"step {s.index}", ENGINE_PID, 1, us(s.start), s.total * 1e6, args))
        t = s.start
        for phase in PHASES:
            dur = getattr(s, phase)
            events.append(_complete(phase, ENGINE_PID, 1, us(t), dur * 1e6, {}))
            t += dur
        events.append({"name": "batch", "ph": "C", "pid": ENGINE_PID, "tid": 1, "ts": us(s.start),
                       "args": {"sequences": s.num_seqs, "tokens": s.num_tokens}})
    for tid, (rid, t) in enumerate(requests, start=1):
        events.append(_meta("thread_name", REQUESTS_PID, tid, f"request {rid}"))
        if t.first_scheduled is not None:
            events.append(_complete("queued", REQUESTS_PID, tid, us(t.arrival), (t.first_scheduled - t.arrival) * 1e6, {}))
        for kind, start, end, tokens in t.events:
            if kind == "prefill":
                events.append(_complete("prefill", REQUESTS_PID, tid, us(start), (end - start) * 1e6, {"tokens": tokens}))
            elif kind == "preempted":
                events.append(_instant("preempted", REQUESTS_PID, tid, us(start)))
        if t.first_token is not None and t.last_token is not None and t.last_token > t.first_token:
            events.append(_complete("decode", REQUESTS_PID, tid, us(t.first_token), (t.last_token - t.first_token) * 1e6,
                                    {"tokens": len(t.token_times) - 1}))
        for i, tt in enumerate(t.token_times):
            events.append(_instant("token", REQUESTS_PID, tid, us(tt), {"index": i}))
        if t.finished is not None:
            events.append(_instant("finished", REQUESTS_PID, tid, us(t.finished)))
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(path: str | Path, steps, requests) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_trace(steps, requests)))
    return path


def _meta(name: str, pid: int, tid: int, value: str) -> dict:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": {"name": value}}


def _complete(name: str, pid: int, tid: int, ts: float, dur: float, args: dict) -> dict:
    return {"name": name, "ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": round(max(dur, 0.0), 3), "args": args}


def _instant(name: str, pid: int, tid: int, ts: float, args: dict | None = None) -> dict:
    return {"name": name, "ph": "i", "s": "t", "pid": pid, "tid": tid, "ts": ts, "args": args or {}}
