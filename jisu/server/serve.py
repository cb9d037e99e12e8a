"""`jisu serve`: load the model, start uvicorn on the app, stop gracefully on SIGTERM / Ctrl-C.

Imports of FastAPI, uvicorn and torch happen inside the functions, so `jisu --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

from jisu.errors import JisuError

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


def cmd_serve(args) -> int:
    _check_args(args)
    from jisu.llm import LLM
    from jisu.loader.resolve import load_checkpoint
    from jisu.server.app import create_app

    print("jisu serve: loading the model ...", file=sys.stderr, flush=True)
    llm = LLM(
        model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks, checkpoint=load_checkpoint(args.model, keep_blocks=True),
        weights=args.weights, activations=args.activations, kv_cache_dtype=args.kv_cache_dtype,
    )
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(llm.engine, model_name=args.served_model_name, api_key=api_key, max_queue=args.max_queue)

    def ready(host: str, port: int) -> None:
        print(f"jisu serve: ready on http://{host}:{port} (model {app.state.model_name!r}; "
              f"SIGTERM or Ctrl-C stops)", flush=True)

    server = make_server(app, args.host, args.port, args.shutdown_timeout, args.log_level, on_ready=ready)
    server.run()
    print("jisu serve: stopped", file=sys.stderr, flush=True)
    return 0


def make_server(app, host: str, port: int, grace_s: float = 30.0, log_level: str = "info", on_ready=None):
    """A uvicorn server for `app` that drains gracefully: on SIGTERM / SIGINT it stops accepting, lets
    requests in flight run for `grace_s` seconds, aborts the rest, and returns (exit status 0)."""
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
            app.state.async_engine.begin_drain(grace_s)
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
