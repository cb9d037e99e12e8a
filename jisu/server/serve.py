"""`jisu serve`: load the model, start uvicorn on the app, stop gracefully on SIGTERM / Ctrl-C.

Imports of FastAPI, uvicorn and torch happen inside the functions, so `jisu --help` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import threading

from jisu.errors import JisuError
from jisu.startup_gc import freeze_loaded, imports_frozen

API_KEY_ENV = "JISU_API_KEY"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget of one step (default 1024)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; more get 503 with Retry-After (default 256)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 and tokenize routes (or set {API_KEY_ENV})")
    p.add_argument("--allowed-hosts", default=None, metavar="HOST,...",
                   help="Host header names answered besides localhost, 127.0.0.1 and [::1] ('*' any, '*.lan' "
                        "subdomains). Default: only those three when bound to a loopback address (refuses DNS "
                        "rebinding), any otherwise")
    p.add_argument("--allowed-origins", default=None, metavar="ORIGIN,...",
                   help="web origins whose pages may call the server (CORS), e.g. http://localhost:3000; "
                        "default: none (no CORS headers)")
    p.add_argument("--allow-special-tokens-in-content", action="store_true",
                   help="tokenize special-token text typed inside chat messages (e.g. '<|im_start|>') as the "
                        "special tokens; default: as plain text, so a client cannot forge other roles' turns")
    p.add_argument("--request-body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="seconds a client has to send its request body before a 408 (default 30)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the file or short name)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are aborted (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise JisuError(f"--port must be in [0, 65535], got {args.port}")
    for flag, value in (("--max-queue", args.max_queue), ("--max-num-seqs", args.max_num_seqs)):
        if value < 1:
            raise JisuError(f"{flag} must be >= 1, got {value}")
    if args.shutdown_timeout < 0:
        raise JisuError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if not args.request_body_timeout > 0:
        raise JisuError(f"--request-body-timeout must be > 0, got {args.request_body_timeout}")


def _split(value: str | None) -> list[str]:
    return [x.strip() for x in (value or "").split(",") if x.strip()]


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves only this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(bind_host: str, flag: str | None) -> list[str] | None:
    """The Host names the app answers to (None: any). Bound to loopback, only the loopback names unless the
    flag adds more; bound elsewhere, any unless the flag names them (the loopback names are always fine)."""
    from jisu.server.guards import LOOPBACK_HOSTS

    extra = _split(flag)
    if "*" in extra or (not extra and not is_loopback(bind_host)):
        return None
    return [*LOOPBACK_HOSTS, *extra]


def bind_socket(host: str, port: int):
    """A socket bound to host:port, so a port in use is reported before the model loads (seconds) and not
    after it."""
    import socket

    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise JisuError(f"--host {host!r} is not an address this machine can bind: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restarted server may rebind while the old one's connections sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise JisuError(f"cannot listen on {host} port {port}: {e.strerror or e}"
                        + (" (another server is using it; pick another with --port)"
                           if e.errno in (errno.EADDRINUSE,) else "")) from None
    return sock


def cmd_serve(args) -> int:
    _check_args(args)
    sock = bind_socket(args.host, args.port)  # before the model loads: a port in use fails at once
    with imports_frozen():  # see startup_gc.py: a full collection over these would stall requests later
        from jisu.llm import LLM
        from jisu.loader.resolve import load_checkpoint
        from jisu.server.app import create_app

    print("jisu serve: loading the model ...", file=sys.stderr, flush=True)
    try:
        llm = LLM(
            model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            num_kv_blocks=args.num_kv_blocks, checkpoint=load_checkpoint(args.model, keep_blocks=True),
            weights=args.weights, activations=args.activations, kv_cache_dtype=args.kv_cache_dtype,
            deterministic=args.deterministic, speculative_config=getattr(args, "speculative_config", None),
        )
    except BaseException:
        sock.close()
        raise
    freeze_loaded()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(
        llm.engine, model_name=args.served_model_name, api_key=api_key, max_queue=args.max_queue,
        allowed_hosts=allowed_hosts_for(args.host, args.allowed_hosts),
        allowed_origins=_split(args.allowed_origins) or None,
        special_tokens_in_content=args.allow_special_tokens_in_content,
        request_body_timeout_s=args.request_body_timeout,
    )

    def ready(host: str, port: int) -> None:
        print(f"jisu serve: ready on http://{host}:{port} (model {app.state.model_name!r}; "
              f"SIGTERM or Ctrl-C stops)", flush=True)

    server = make_server(app, args.host, args.port, args.shutdown_timeout, args.log_level, on_ready=ready)
    server.run(sockets=[sock])
    print("jisu serve: stopped", file=sys.stderr, flush=True)
    return 0


def make_server(app, host: str, port: int, grace_s: float = 30.0, log_level: str = "info", on_ready=None):
    """A uvicorn server for `app` that drains gracefully: on SIGTERM / SIGINT it stops taking requests (new
    ones get 503 while the socket stays open), lets requests in flight run for `grace_s` seconds, aborts the
    rest, closes, and returns (exit status 0)."""
    import asyncio
    import time

    import uvicorn

    class Server(uvicorn.Server):
        @property
        def port(self) -> int:
            return self.servers[0].sockets[0].getsockname()[1]

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready(host, self.port)

        async def shutdown(self, sockets=None) -> None:
            # Runs on the event loop (not in the signal handler, which may interrupt a held lock).
            engine = app.state.async_engine
            engine.begin_drain(grace_s)
            # uvicorn's shutdown closes the listening socket first, so a client arriving during the drain would
            # be refused a connection; until the engine is done it stays open and the app answers 503.
            deadline = time.monotonic() + grace_s + 5
            while engine.in_flight and not self.force_exit and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await super().shutdown(sockets)

        def capture_signals(self):
            return _exit_quietly_on_signals(self)

    # uvicorn's own timeout is the backstop: the engine aborts what is left at grace_s, so streams end cleanly.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s + 5,
                            lifespan="on")
    return Server(config)


class _exit_quietly_on_signals:
    """Like uvicorn's signal capture, minus re-raising the signal afterwards: uvicorn re-raises it so the
    process dies by the signal, but a drained server should exit with status 0."""

    def __init__(self, server):
        self.server = server
        self.saved = {}

    def __enter__(self):
        import signal

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self.server.handle_exit)

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        return False


class ServerThread:
    """Runs an app on a uvicorn server in a background thread (tests, benchmarks, notebooks).

    >>> with ServerThread(create_app(engine)) as base_url: ...
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, grace_s: float = 5.0):
        self.app = app
        self.server = make_server(app, host, port, grace_s, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name="jisu-uvicorn", daemon=True)
        self.base_url = ""

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.01)
        self.base_url = f"http://127.0.0.1:{self.server.port}"
        return self.base_url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
