"""jisu serve --replicas on a real local Ray cluster (issue 26): 2 replicas x 1 CPU of the tiny test model.

One `jisu serve --replicas 2` process serves every test of the module (starting Ray and two replicas takes
~20-30 s); the last test stops it with SIGTERM. Marked `ray`; skipped when Ray Serve is not installed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

pytestmark = pytest.mark.ray

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'jisu[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'jisu[ray]')")
httpx = pytest.importorskip("httpx")

REPLICA_HEADER = "x-jisu-replica"
API_KEY = "ray-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# The tiny model's context is 256 tokens; the cluster runs with --affinity-min-prefix 64.
LONG_PREFIX = "You are a careful assistant. Answer briefly, quoting the context. " * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("ray-serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "JISU_API_KEY": API_KEY,
           "RAY_SERVE_LOG_TO_STDERR": "0"}
    cmd = [sys.executable, "-m", "jisu.cli", "serve", "--model", str(tiny_llama_dir), "--port", str(port),
           "--replicas", "2", "--threads-per-replica", "1", "--max-num-seqs", "8", "--shutdown-timeout", "20",
           "--affinity-min-prefix", "64", "--log-level", "warning"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jisu serve --replicas exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                r = httpx.get(f"{base}/health", timeout=2)
                if r.status_code == 200 and len(r.json()["replicas"]) == 2:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no healthy replicas after 150 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"base": base, "proc": proc, "log": log}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _complete(base: str, prompt: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                       "temperature": 0}, timeout=60, headers=AUTH)


def test_openai_client_streams_through_the_cluster(cluster):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=cluster["base"] + "/v1", api_key=API_KEY, max_retries=0)
    model = client.models.list().data[0].id
    chunks = list(client.completions.create(model=model, prompt="Hello there", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    # How many events carry the text depends on timing: a stream sends the newest output when the client side
    # wakes, and on a fast CPU all 8 tokens can be done by then (seen: one event). What it must send is all of the
    # text, then the usage.
    streamed = "".join(choice.text for c in chunks for choice in c.choices)
    whole = client.completions.create(model=model, prompt="Hello there", max_tokens=8, temperature=0)
    assert [c for c in chunks if c.choices] and streamed == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    # Errors are the single-process server's own.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    r = httpx.post(cluster["base"] + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(cluster["base"] + "/v1/completions", json={"prompt": "x", "max_tokens": -3}, timeout=30,
                   headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert r.headers[REPLICA_HEADER]
    body = httpx.post(cluster["base"] + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                      timeout=30, headers=AUTH).json()
    assert "timings" in body and body["usage"]["completion_tokens"] == 3


def test_requests_spread_over_both_replicas(cluster):
    import concurrent.futures

    prompts = [f"Unrelated prompt number {i}: {'abc' * i}" for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: _complete(cluster["base"], p, 16), prompts))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    served = Counter(r.headers[REPLICA_HEADER] for r in replies)
    assert len(served) == 2, served


def test_shared_prefix_conversation_sticks_to_one_replica(cluster):
    turns = [LONG_PREFIX + "\nUser: first question?\nAssistant:"]
    served = []
    for i in range(6):
        r = _complete(cluster["base"], turns[-1], 2)
        assert r.status_code == 200, r.text
        served.append(r.headers[REPLICA_HEADER])
        turns.append(turns[-1] + r.json()["choices"][0]["text"] + f"\nQ{i}?\nA:")
    assert len(set(served)) == 1, served


def test_metrics_aggregate_replicas_and_health(cluster):
    time.sleep(1.5)  # replicas report every 0.5 s
    r = httpx.get(cluster["base"] + "/metrics", timeout=10)
    assert r.status_code == 200
    lines = [x for x in r.text.splitlines() if x.startswith("jisu:generation_tokens_total")]
    replicas = {x.split('replica="')[1].split('"')[0] for x in lines}
    assert len(replicas) == 2, lines
    assert r.text.count("# TYPE jisu:generation_tokens counter") == 1
    assert sum(float(x.rsplit(" ", 1)[1]) for x in lines) > 0
    hits = [x for x in r.text.splitlines() if x.startswith("jisu:prefix_cache_hits_total")]
    assert sum(float(x.rsplit(" ", 1)[1]) for x in hits) > 0  # the sticky conversation hit its prefix
    health = httpx.get(cluster["base"] + "/health", timeout=10).json()
    assert health["status"] == "ok" and all(r["healthy"] for r in health["replicas"])


def _metric_sum(base: str, prefix: str, having: str = "") -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(prefix) and having in x)


def test_a_client_hanging_up_aborts_its_request_on_the_replica(cluster):
    base = cluster["base"]
    aborted = ("jisu:request_success_total", 'finished_reason="abort"')
    before = _metric_sum(base, *aborted)
    with httpx.stream("POST", base + "/v1/completions", timeout=60, headers=AUTH,
                      json={"prompt": "hang up", "max_tokens": 240, "stream": True, "ignore_eos": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break
    deadline = time.monotonic() + 15
    while _metric_sum(base, *aborted) <= before:
        assert time.monotonic() < deadline, "the replica never aborted the request"
        time.sleep(0.3)


def test_killing_a_replica_mid_stream_fails_only_its_requests(cluster):
    base = cluster["base"]
    health = httpx.get(base + "/health", timeout=10).json()
    pids = {r["replica"]: r["pid"] for r in health["replicas"]}
    results: dict[int, tuple] = {}
    started: dict[int, str] = {}

    def stream(i: int) -> None:
        events, replica = [], None
        try:
            with httpx.stream("POST", base + "/v1/completions", timeout=60, headers=AUTH,
                              json={"prompt": f"Stream {i}", "max_tokens": 240, "stream": True,
                                    "ignore_eos": True}) as r:
                replica = started[i] = r.headers.get(REPLICA_HEADER)
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
            results[i] = (replica, events, None)
        except Exception as e:  # noqa: BLE001
            results[i] = (replica, events, e)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(started) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(set(started.values())) == 2, started  # the streams are under way on both replicas
    victim = started[0]
    os.kill(pids[victim], signal.SIGKILL)
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a stream hung after its replica died"
    assert len(results) == 6
    for i, (replica, events, error) in results.items():
        assert error is None, (i, error)
        if replica == victim:
            assert '"replica_failed"' in events[-1], (i, events[-3:])
        else:
            assert events[-1] == "[DONE]", (i, events[-3:])
    # New requests go to the survivor at once, and Ray brings a second replica back.
    for _ in range(4):
        r = _complete(base, "after the crash", 2)
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] != victim
    deadline = time.monotonic() + 90
    while True:
        replicas = httpx.get(base + "/health", timeout=10).json()["replicas"]
        if len(replicas) == 2 and victim not in {r["replica"] for r in replicas}:
            break
        assert time.monotonic() < deadline, replicas
        time.sleep(0.5)


def test_sigterm_drains_in_flight_streams(cluster):
    base, proc = cluster["base"], cluster["proc"]
    out = {}

    def stream() -> None:
        with httpx.stream("POST", base + "/v1/completions", timeout=60, headers=AUTH,
                          json={"prompt": "drain me", "max_tokens": 120, "stream": True, "ignore_eos": True}) as r:
            out["events"] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert out["events"][-1] == "[DONE]", out["events"][-3:]
    assert proc.wait(60) == 0, cluster["log"].read_text()[-3000:]


# ----------------------------------------------------------------------------- the router and metrics, no cluster


class _Rid:
    def __init__(self, name: str):
        self.name = name

    def to_full_id_str(self) -> str:
        return self.name


class _Replica:
    def __init__(self, name: str):
        self.replica_id = _Rid(name)
        self.max_ongoing_requests = 100


class _Pending:
    def __init__(self, text: str):
        self.args = [{"route_text": text}]


def _router(lens: dict, **kwargs):
    import asyncio

    from jisu.server.ray_serve import PrefixAffinityRouter

    router = object.__new__(PrefixAffinityRouter)
    router.initialize_state(**kwargs)

    async def queue_lens(replicas):
        return {r.replica_id: lens[r.replica_id.name] for r in replicas}

    router._queue_lens = queue_lens
    return router, lambda replicas, text: asyncio.run(router.choose_replicas(replicas, _Pending(text)))


def test_router_prefers_least_loaded_then_the_prefix_owner_unless_much_busier():
    a, b = _Replica("a"), _Replica("b")
    lens = {"a": 3, "b": 0}
    router, choose = _router(lens, min_match_chars=128, imbalance=4)
    first = choose([a, b], "x" * 300)
    assert first[0][0] is b  # least loaded
    router.on_request_routed(_Pending("x" * 300), b.replica_id, None)
    lens.update(a=0, b=3)
    assert choose([a, b], "x" * 300 + " more")[0][0] is b  # shared prefix: stays, 3 more is not much busier
    assert choose([a, b], "y" * 300)[0][0] is a  # no shared prefix: least loaded
    assert choose([a, b], "x" * 100)[0][0] is a  # shares less than min_match_chars
    lens.update(b=9)
    assert choose([a, b], "x" * 300)[0][0] is a  # the owner is much busier
    lens.update(b=0)
    off, choose_off = _router(lens, affinity=False)
    off.on_request_routed(_Pending("x" * 300), a.replica_id, None)
    assert not off._owner


def test_route_text_and_merged_metrics():
    from prometheus_client.parser import text_string_to_metric_families

    from jisu.server.ray_serve import merge_metrics, prefix_blocks, route_text

    assert route_text(b'{"prompt": "abc"}') == "abc"
    chat = route_text(b'{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}')
    assert chat.startswith("system\x1fS") and "user\x1fU" in chat
    assert route_text(b"not json") is None and route_text(b"[1]") is None
    assert prefix_blocks("a" * 130)[:2] == prefix_blocks("a" * 128 + "zz")[:2] and len(prefix_blocks("a" * 127)) == 1
    text = ('# HELP jisu:generation_tokens_total Number of generation tokens processed.\n'
            '# TYPE jisu:generation_tokens_total counter\n'
            'jisu:generation_tokens_total{model_name="m"} 5.0\n')
    merged = merge_metrics({"r1": text, "r2": text.replace("5.0", "7.0")})
    fams = list(text_string_to_metric_families(merged))
    samples = [(s.labels["replica"], s.value) for f in fams for s in f.samples]
    assert samples == [("r1", 5.0), ("r2", 7.0)] and merged.count("# TYPE") == 1
