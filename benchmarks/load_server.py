"""Load test of `jisu serve`: many concurrent streaming clients, some hanging up mid-answer.

    python benchmarks/load_server.py                       # starts `jisu serve` on the default model, 2 minutes
    python benchmarks/load_server.py --duration 30 --model path/to/model.gguf
    python benchmarks/load_server.py --url http://127.0.0.1:8000   # an already running server (loopback only)

64 clients (--clients) stream chat and text completions back to back; a fifth of them (--disconnect-fraction)
hang up each answer at a random point. The run stops starting requests after --duration seconds or
--max-requests requests, lets the ones in flight end, waits for the server to go idle, and reads /metrics.

Reports throughput (server-counted generated tokens per second, requests per second), client-side time to
first token, status codes, and the KV blocks still held once idle. Exits 1 on any 5xx, any error event in
a stream, any transport error, or any leaked KV block.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "Explain why the sky is blue in a few sentences.",
    "Write a short poem about a fox and a lazy dog.",
    "List three uses of a paged KV cache.",
    "What is continuous batching?",
    "Translate 'good morning' into French, Spanish and German.",
    "Summarise the plot of a detective story you make up.",
    "Give me a Python function that reverses a string.",
    "Why do inference servers stream tokens?",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Stats:
    started: int = 0
    completed: int = 0
    disconnected: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    stream_errors: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)

    def status(self, code: int) -> None:
        self.statuses[code] = self.statuses.get(code, 0) + 1


async def one_request(http: httpx.AsyncClient, rng: random.Random, hang_up: bool, max_tokens: int, stats: Stats):
    chat = rng.random() < 0.5
    n_tokens = rng.randint(8, max_tokens)
    body: dict = {"max_tokens": n_tokens, "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}}
    prompt = rng.choice(PROMPTS)
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    # A hanging-up client leaves after a random number of events (0: before the first token).
    leave_after = rng.randint(0, n_tokens) if hang_up else None
    stats.started += 1
    t0 = time.perf_counter()
    try:
        async with http.stream("POST", path, json=body) as r:
            stats.status(r.status_code)
            if r.status_code != 200:
                await r.aread()
                return
            events = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    stats.completed += 1
                    return
                event = json.loads(data)
                if "error" in event:
                    stats.stream_errors.append(event["error"].get("message", data))
                    return
                if events == 0 and event.get("choices"):
                    stats.ttft.append(time.perf_counter() - t0)
                events += 1
                if leave_after is not None and events >= leave_after:
                    stats.disconnected += 1
                    return  # leaving the block closes the connection mid-stream
            stats.transport_errors.append(f"{path}: stream ended without [DONE]")
    except httpx.HTTPError as e:
        stats.transport_errors.append(f"{path}: {type(e).__name__}: {e}")


async def client_loop(i: int, base_url: str, args, stats: Stats, stop_at: float, budget: list[int]):
    rng = random.Random(args.seed * 1000 + i)
    hang_up = i < round(args.clients * args.disconnect_fraction)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(300, connect=10)) as http:
        while time.monotonic() < stop_at and budget[0] > 0:
            budget[0] -= 1
            await one_request(http, rng, hang_up, args.max_tokens, stats)


def read_metrics(base_url: str) -> dict[str, float]:
    """Each series of /metrics (name with labels) -> value, plus each name -> the sum of its series."""
    out: dict[str, float] = {}
    for line in httpx.get(base_url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name = re.split(r"[{ ]", series, maxsplit=1)[0]
            out[series] = float(value)
            if name != series:
                out[name] = out.get(name, 0.0) + float(value)
    return out


def by_reason(m: dict[str, float]) -> dict[str, float]:
    out = {}
    for series, value in m.items():
        hit = re.match(r'jisu:request_success_total\{.*finished_reason="(\w+)"', series)
        if hit:
            out[hit.group(1)] = value
    return out


def wait_idle(base_url: str, timeout: float) -> tuple[dict[str, float], bool]:
    """The metrics once nothing runs or waits (True), or after `timeout` seconds (False)."""
    deadline = time.monotonic() + timeout
    while True:
        m = read_metrics(base_url)
        if m.get("jisu:num_requests_running", 0) == 0 and m.get("jisu:num_requests_waiting", 0) == 0:
            return m, True
        if time.monotonic() > deadline:
            return m, False
        time.sleep(0.2)


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "jisu.cli", "serve", "--port", "0", "--max-num-seqs", str(args.clients),
           "--max-queue", str(4 * args.clients), "--log-level", "warning", *args.serve_args.split()]
    if args.model:
        cmd += ["--model", args.model]
    print("starting:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"ready on (http://\S+)", line)
    if not m:
        proc.kill()
        sys.exit(f"the server did not start: {line!r}")
    return proc, m.group(1)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server on this machine (default: start one)")
    ap.add_argument("--model", default=None, help="model for the server this script starts (default: jisu's default)")
    ap.add_argument("--serve-args", default="", help="extra `jisu serve` arguments, e.g. '--num-kv-blocks 4096'")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--disconnect-fraction", type=float, default=0.2)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of starting new requests (default 120)")
    ap.add_argument("--max-requests", type=int, default=20000, help="stop after this many requests")
    ap.add_argument("--max-tokens", type=int, default=64, help="each request asks for 8..this many tokens")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.clients < 1 or args.duration <= 0 or args.max_requests < 1 or args.max_tokens < 8:
        ap.error("--clients, --duration, --max-requests must be positive and --max-tokens >= 8")

    proc = None
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            ap.error("--url must be a loopback address (127.0.0.1, localhost, ::1): this is a local load test")
        base_url = args.url.rstrip("/")
    else:
        proc, base_url = start_server(args)
    try:
        return run(args, base_url)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            print(f"server exit status after SIGTERM: {code}")


def run(args, base_url: str) -> int:
    before = read_metrics(base_url)
    stats = Stats()
    budget = [args.max_requests]
    t0 = time.monotonic()

    async def all_clients():
        stop_at = time.monotonic() + args.duration
        await asyncio.gather(*(client_loop(i, base_url, args, stats, stop_at, budget) for i in range(args.clients)))

    asyncio.run(all_clients())
    elapsed = time.monotonic() - t0
    after, idle = wait_idle(base_url, timeout=60)
    idle_after = time.monotonic() - t0 - elapsed

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    generated = delta("jisu:generation_tokens_total")
    leaked = int(after.get("jisu:kv_cache_used_blocks", -1))
    five_xx = sum(n for code, n in stats.statuses.items() if code >= 500)
    ttft_p50, ttft_p95 = percentile(stats.ttft, 50), percentile(stats.ttft, 95)

    print(f"run: {elapsed:.1f} s, {args.clients} clients ({round(args.clients * args.disconnect_fraction)} hang up "
          f"mid-stream); server idle {idle_after:.1f} s after the last client finished")
    print(f"requests: {stats.started} started, {stats.completed} completed, {stats.disconnected} hung up by the client")
    print(f"status codes: {dict(sorted(stats.statuses.items()))}")
    reasons_before = by_reason(before)
    reasons = {k: int(v - reasons_before.get(k, 0)) for k, v in sorted(by_reason(after).items())}
    print(f"server: {int(delta('jisu:prompt_tokens_total'))} prompt tokens, {int(generated)} generated tokens; "
          f"sequences finished by reason: {reasons}")
    print(f"throughput: {generated / elapsed:.1f} generated tokens/s, "
          f"{stats.completed / elapsed:.2f} completed requests/s")
    if ttft_p50 is not None:
        print(f"client time to first token: p50 {ttft_p50 * 1000:.0f} ms, p95 {ttft_p95 * 1000:.0f} ms")
    print(f"5xx responses: {five_xx}; error events in streams: {len(stats.stream_errors)}; "
          f"transport errors: {len(stats.transport_errors)}")
    if not idle:
        print("the server was still busy 60 s after the last client stopped")
    print(f"KV blocks held once idle: {leaked} of {int(after.get('jisu:kv_cache_total_blocks', 0))}")
    for e in (stats.stream_errors + stats.transport_errors)[:5]:
        print("  error:", e)
    failed = five_xx > 0 or stats.stream_errors or stats.transport_errors or leaked != 0 or not idle
    print("RESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
