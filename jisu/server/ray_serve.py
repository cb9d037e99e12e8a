"""jisu replicas behind one endpoint on Ray Serve (issue 26): `jisu serve --replicas N`, or in Python

    from jisu.server.ray_serve import build_app, ReplicaSettings
    serve.run(build_app(ReplicaSettings(model="smollm2-135m"), replicas=2, threads=1))

or `serve run jisu.server.ray_serve:app` (settings from JISU_RAY_* environment variables, see `app_from_env`).

Three deployments:
- `JisuReplica` (num_cpus = threads each): loads the model and runs the very app `jisu serve` runs (create_app), fed
  one HTTP request at a time as an ASGI call; its answer streams back as (start, body chunk, ...) messages. Routes,
  errors, the API key, Host checks and timings are therefore the single-process server's own.
- `JisuIngress` (FastAPI, no CPU reserved): forwards every request to a replica through a handle whose router is
  `PrefixAffinityRouter`, answers /health and /metrics from what the replicas report, and ends a stream whose
  replica died with an error event.
- `JisuMetricsHub` (no CPU reserved): the replicas push their Prometheus text and health here every
  REPORT_PERIOD_S; a replica silent for STALE_AFTER_S is gone.

Ray is imported only by this module; `import jisu.server` never needs it.
"""


import asyncio
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from fastapi import Request

from ray import serve
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

logger = logging.getLogger("jisu.server.ray")

ENGINE_DEPLOYMENT = "JisuReplica"
REPORT_PERIOD_S = 0.5
STALE_AFTER_S = 3.0
# Prefix affinity works on the prompt's text in blocks of this many characters (about 16-32 tokens).
BLOCK_CHARS = 64
REPLICA_HEADER = "x-jisu-replica"


@dataclass
class ReplicaSettings:
    """What each replica's LLM and create_app take (plain values: they travel to the replicas by pickle)."""

    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    num_kv_blocks: int | None = None
    weights: str = "auto"
    activations: str | None = None
    kv_cache_dtype: str | None = None
    deterministic: bool = True
    served_model_name: str | None = None
    api_key: str | None = None
    max_queue: int = 256
    allowed_hosts: list[str] | None = None
    allowed_origins: list[str] | None = None
    special_tokens_in_content: bool = False
    request_body_timeout_s: float = 30.0
    llm_kwargs: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- routing


def prefix_blocks(text: str) -> list[str]:
    """Chained digests of the text's whole BLOCK_CHARS blocks: entry i stands for text[: (i + 1) * BLOCK_CHARS]."""
    out, h = [], hashlib.blake2b(digest_size=16)
    for end in range(BLOCK_CHARS, len(text) + 1, BLOCK_CHARS):
        h.update(text[end - BLOCK_CHARS:end].encode("utf-8", "surrogatepass"))
        out.append(h.copy().hexdigest())
    return out


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Least-loaded routing with prefix affinity (Ray Serve LLM's PrefixCacheAffinityRouter is the reference).

    A request goes to the replica with the fewest requests in flight, unless its prompt shares at least
    `min_match_chars` leading characters with a prompt routed before: then it goes to the replica that served
    that prompt (whose prefix cache holds it), as long as that replica has at most `imbalance` more requests in
    flight than the least busy one. The table of prefixes lives in this router (one per ingress replica), holds
    at most `max_blocks` block digests (least recently used dropped first) and forgets a replica that dies.
    `affinity=False` turns affinity off (plain least-loaded), for comparison."""

    def initialize_state(self, affinity: bool = True, min_match_chars: int = 4 * BLOCK_CHARS, imbalance: int = 4,
                         max_blocks: int = 200_000, **kwargs):
        self._affinity = affinity
        self._min_blocks = max(1, min_match_chars // BLOCK_CHARS)
        self._imbalance = imbalance
        self._max_blocks = max_blocks
        self._owner: OrderedDict[str, str] = OrderedDict()  # block digest -> replica id (full string)
        self.affinity_hits = 0

    @staticmethod
    def _text(pending_request: Optional[PendingRequest]) -> str | None:
        if pending_request is None or not pending_request.args:
            return None
        call = pending_request.args[0]
        return call.get("route_text") if isinstance(call, dict) else None

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict:
        lens, missing = {}, []
        for r in replicas:
            n = self.replica_queue_len_cache.get(r.replica_id)
            (missing.append(r) if n is None else lens.__setitem__(r.replica_id, n))
        if missing:
            for r, n in await self._probe_queue_lens(missing, 0):
                if n is not None:
                    lens[r.replica_id] = n
        return lens

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        lens = await self._queue_lens(candidate_replicas)
        usable = [r for r in candidate_replicas if lens.get(r.replica_id, 0) < r.max_ongoing_requests]
        if not usable:
            return []
        least = min(lens.get(r.replica_id, 0) for r in usable)
        text = self._text(pending_request) if self._affinity else None
        if text:
            owner = self._match(text)
            for r in usable:
                if r.replica_id.to_full_id_str() == owner and lens.get(r.replica_id, 0) <= least + self._imbalance:
                    self.affinity_hits += 1
                    return [[r]]
        # Least loaded first, ties broken at random (by a shuffle the sort keeps).
        import random

        ranked = sorted(random.sample(usable, len(usable)), key=lambda r: lens.get(r.replica_id, 0))
        return [[r] for r in ranked]

    def _match(self, text: str) -> str | None:
        blocks = prefix_blocks(text)
        owner = None
        for i, digest in enumerate(blocks):
            rid = self._owner.get(digest)
            if rid is None:
                break
            if i + 1 >= self._min_blocks:
                owner = rid
        return owner

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        text = self._text(pending_request) if self._affinity else None
        if not text:
            return
        rid = replica_id.to_full_id_str()
        for digest in prefix_blocks(text):
            self._owner[digest] = rid
            self._owner.move_to_end(digest)
        while len(self._owner) > self._max_blocks:
            self._owner.popitem(last=False)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        gone = replica_id.to_full_id_str()
        for digest in [d for d, rid in self._owner.items() if rid == gone]:
            del self._owner[digest]


def route_text(body: bytes) -> str | None:
    """The text a request's prompt starts with, for prefix affinity: chat messages as role and content in order,
    or the completion prompt / responses input. None when the body says nothing routable (the replica will
    answer it, errors included)."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(req, dict):
        return None
    parts = []
    messages = req.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
                parts.append(f"{m.get('role', '')}\x1f{content if isinstance(content, str) else ''}\x1e")
        return "".join(parts) or None
    for key in ("prompt", "input"):
        value = req.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0]
    return None


# ----------------------------------------------------------------------------- metrics


def merge_metrics(reports: dict[str, str]) -> str:
    """Prometheus texts of several replicas as one, each sample labelled replica="<id>" (families kept whole)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, list[str]]] = {}
    for replica, text in sorted(reports.items()):
        for fam in text_string_to_metric_families(text):
            entry = families.setdefault(fam.name, (fam.documentation, fam.type, []))
            for s in fam.samples:
                labels = {**s.labels, "replica": replica}
                body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                entry[2].append(f"{s.name}{{{body}}} {_number(s.value)}")
    lines = []
    for name, (doc, kind, samples) in families.items():
        lines += [f"# HELP {name} {doc.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}",
                  f"# TYPE {name} {kind}", *samples]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value)}.0"
    return repr(float(value))


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class JisuMetricsHub:
    """What each replica last reported: its Prometheus text, health and process id."""

    def __init__(self):
        self.reports: dict[str, dict] = {}

    def report(self, replica: str, metrics: str, healthy: bool, pid: int, node: str) -> None:
        self.reports[replica] = {"metrics": metrics, "healthy": healthy, "pid": pid, "node": node,
                                 "at": time.monotonic()}

    def snapshot(self) -> dict[str, dict]:
        now = time.monotonic()
        for replica in [r for r, v in self.reports.items() if now - v["at"] > STALE_AFTER_S]:
            del self.reports[replica]
        return self.reports


# ----------------------------------------------------------------------------- the replica


@serve.deployment(max_ongoing_requests=512, health_check_period_s=2, health_check_timeout_s=10)
class JisuReplica:
    """One engine: the single-process server's app, fed requests as ASGI calls."""

    async def __init__(self, settings: dict, threads: int, hub=None):
        import torch

        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        from jisu.llm import LLM
        from jisu.loader.resolve import load_checkpoint
        from jisu.server.app import create_app

        s = ReplicaSettings(**settings)
        self.llm = LLM(model=s.model, device=s.device, dtype=s.dtype, max_model_len=s.max_model_len,
                       max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                       num_kv_blocks=s.num_kv_blocks, checkpoint=load_checkpoint(s.model, keep_blocks=True),
                       weights=s.weights, activations=s.activations, kv_cache_dtype=s.kv_cache_dtype,
                       deterministic=s.deterministic, **s.llm_kwargs)
        self.app = create_app(self.llm.engine, model_name=s.served_model_name, api_key=s.api_key,
                              max_queue=s.max_queue, allowed_hosts=s.allowed_hosts,
                              allowed_origins=s.allowed_origins or None,
                              special_tokens_in_content=s.special_tokens_in_content,
                              request_body_timeout_s=s.request_body_timeout_s)
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.hub = hub
        self.reporter = asyncio.get_running_loop().create_task(self._report_loop()) if hub is not None else None

    async def _report_loop(self) -> None:
        import ray

        node = ray.get_runtime_context().get_node_id()[:12]
        while True:
            try:
                await self.hub.report.remote(self.replica_id, self.app.state.metrics.render().decode(),
                                             self.app.state.async_engine.healthy, os.getpid(), node)
            except Exception as e:  # the hub restarting: report again next period
                logger.debug("metrics report failed: %s", e)
            await asyncio.sleep(REPORT_PERIOD_S)

    async def check_health(self) -> None:
        if not self.app.state.async_engine.healthy and not self.app.state.async_engine.in_flight:
            raise RuntimeError("the engine stopped")

    async def __call__(self, call: dict):
        """Runs one HTTP request through the app; yields the response start ({"status", "headers"}) then its
        body chunks (bytes). If the caller goes away, the app sees the client disconnect (aborting the request)."""
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": call["body"], "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await out.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": call["method"],
                 "scheme": "http", "path": call["path"], "raw_path": call["path"].encode(),
                 "query_string": call["query"], "root_path": "", "headers": call["headers"],
                 "client": tuple(call["client"]) if call.get("client") else None, "server": None,
                 "app": self.app}

        async def run():
            try:
                await self.app(scope, receive, send)
            finally:
                await out.put(None)

        task = asyncio.get_running_loop().create_task(run())
        try:
            while True:
                message = await out.get()
                if message is None:
                    break
                if message["type"] == "http.response.start":
                    headers = [(k, v) for k, v in message.get("headers", [])]
                    headers.append((REPLICA_HEADER.encode(), self.replica_id.encode()))
                    yield {"status": message["status"], "headers": headers}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
            await task
        finally:
            gone.set()
            if not task.done():
                await asyncio.wait([task], timeout=5)
                task.cancel()

    async def __del__(self):
        # Ray Serve lets in-flight requests finish (graceful_shutdown_timeout_s) before calling this.
        if getattr(self, "reporter", None) is not None:
            self.reporter.cancel()
        if getattr(self, "lifespan", None) is not None:
            await self.lifespan.__aexit__(None, None, None)


# ----------------------------------------------------------------------------- the ingress


def _error(status: int, message: str, kind: str = "server_unavailable"):
    from fastapi.responses import JSONResponse

    from jisu.server import protocol as p

    return JSONResponse(p.error_body(message, kind), status_code=status, headers={"Retry-After": "1"})


_api = None


def _ingress_api():
    from fastapi import FastAPI

    global _api
    if _api is None:
        _api = FastAPI(title="jisu (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)
    return _api


_ROUTE_METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
@serve.ingress(_ingress_api())
class JisuIngress:
    """Forwards each request to a replica; /health and /metrics speak for all of them."""

    def __init__(self, engine, hub):
        self.engine = engine
        self.hub = hub
        self.routed = 0
        self.routing_s = 0.0

    @_ingress_api().get("/health")
    async def health(self):
        from fastapi.responses import JSONResponse

        reports = await self.hub.snapshot.remote()
        replicas = [{"replica": r, "healthy": v["healthy"], "pid": v["pid"], "node": v["node"]}
                    for r, v in sorted(reports.items())]
        if any(r["healthy"] for r in replicas):
            return JSONResponse({"status": "ok", "replicas": replicas})
        return JSONResponse({"error": {"message": "no replica is healthy", "type": "server_unavailable",
                                       "param": None, "code": None}, "replicas": replicas}, status_code=503)

    @_ingress_api().get("/metrics")
    async def metrics(self):
        from fastapi.responses import Response

        from jisu.server.metrics import CONTENT_TYPE

        reports = await self.hub.snapshot.remote()
        text = merge_metrics({r: v["metrics"] for r, v in reports.items()})
        return Response(text + self.own_metrics(len(reports)), media_type=CONTENT_TYPE)

    @_ingress_api().api_route("/{path:path}", methods=_ROUTE_METHODS)
    async def forward(self, request: Request, path: str):
        from fastapi.responses import StreamingResponse

        from jisu.server.app import MAX_BODY_BYTES

        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            chunks.append(chunk)
            if size > MAX_BODY_BYTES:  # the replica's app answers the 413; the rest is never read
                break
        body = b"".join(chunks)
        call = {"method": request.method, "path": request.url.path, "query": request.url.query.encode(),
                "headers": [(k.lower(), v) for k, v in request.headers.raw], "body": body,
                "client": list(request.client) if request.client else None,
                "route_text": route_text(body) if request.method == "POST" else None}
        t0 = time.perf_counter()
        stream = self.engine.options(stream=True).remote(call)
        try:
            start = await stream.__anext__()
        except Exception as e:
            logger.warning("a replica failed before answering: %s", e)
            return _error(503, f"the replica serving this request failed before answering ({type(e).__name__}); "
                               f"retry: the other replicas take new requests")
        self.routed += 1
        self.routing_s += time.perf_counter() - t0
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start["headers"]]
        media = next((v for k, v in headers if k.lower() == "content-type"), "")
        sse = media.startswith("text/event-stream")

        async def body_chunks():
            try:
                async for chunk in stream:
                    yield chunk
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except Exception as e:
                logger.warning("a replica failed mid-answer: %s", e)
                if not sse:
                    raise
                error = {"error": {"message": f"the replica serving this request failed mid-stream "
                                              f"({type(e).__name__}); the answer is incomplete, retry it",
                                   "type": "server_unavailable", "param": None, "code": "replica_failed"}}
                yield f"data: {json.dumps(error)}\n\n".encode()

        response = StreamingResponse(body_chunks(), status_code=start["status"])
        for k, v in headers:
            if k.lower() != "content-length":
                response.headers.append(k, v)
        return response

    def own_metrics(self, replicas: int) -> str:
        return ("# HELP jisu:ray_replicas_reporting Replicas whose metrics reached the hub recently.\n"
                "# TYPE jisu:ray_replicas_reporting gauge\n"
                f"jisu:ray_replicas_reporting {replicas}\n"
                "# HELP jisu:ray_routed_requests Requests the ingress sent to a replica.\n"
                "# TYPE jisu:ray_routed_requests counter\n"
                f"jisu:ray_routed_requests_total {self.routed}\n"
                "# HELP jisu:ray_time_to_response_start_seconds Seconds from handing requests to the router to "
                "their replicas' response starts (routing plus the replica's time to the headers).\n"
                "# TYPE jisu:ray_time_to_response_start_seconds counter\n"
                f"jisu:ray_time_to_response_start_seconds_total {self.routing_s}\n")


def build_app(settings: ReplicaSettings, replicas: int = 1, threads: int = 1, affinity: bool = True,
              router_kwargs: dict | None = None, grace_s: float = 30.0):
    """The Serve application: `replicas` engines of `threads` CPUs each behind one ingress."""
    from ray.serve.config import RequestRouterConfig

    hub = JisuMetricsHub.bind()
    engine = JisuReplica.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": threads,
                           "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads),
                                                        "MKL_NUM_THREADS": str(threads)}}},
        graceful_shutdown_timeout_s=grace_s + 5, graceful_shutdown_wait_loop_s=0.5,
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"affinity": affinity, **(router_kwargs or {})},
            request_routing_stats_period_s=1.0),
    ).bind(asdict(settings), threads, hub)
    return JisuIngress.options(graceful_shutdown_timeout_s=grace_s + 10,
                               graceful_shutdown_wait_loop_s=0.5).bind(engine, hub)


def app_from_env():
    """For `serve run jisu.server.ray_serve:app`: JISU_RAY_MODEL, JISU_RAY_REPLICAS (default 2), JISU_RAY_THREADS
    (default 1), JISU_RAY_AFFINITY (default 1), JISU_API_KEY."""
    env = os.environ.get
    settings = ReplicaSettings(model=env("JISU_RAY_MODEL") or None, api_key=env("JISU_API_KEY") or None)
    return build_app(settings, int(env("JISU_RAY_REPLICAS", "2")), int(env("JISU_RAY_THREADS", "1")),
                     env("JISU_RAY_AFFINITY", "1") != "0")


def __getattr__(name: str) -> Any:
    if name == "app":  # built on first access, so importing the module does not read the environment
        return app_from_env()
    raise AttributeError(name)
