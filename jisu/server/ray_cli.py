"""`jisu serve --replicas N [--ray-address ADDR]`: N engine replicas behind one endpoint on Ray Serve (issue 26).

Ray is imported only when --replicas is given, so `jisu --help` and the single-process server never need it.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

from jisu.errors import JisuError

APP_NAME = "jisu"


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replicas on Ray Serve (pip install 'jisu[ray]')")
    g.add_argument("--replicas", type=int, default=None,
                   help="serve N engine replicas behind this one endpoint on a Ray cluster (started here unless "
                        "--ray-address names one); default: one engine in this process, no Ray")
    g.add_argument("--threads-per-replica", type=int, default=None, metavar="N",
                   help="CPUs each replica reserves (Ray num_cpus) and its torch / kernel threads "
                        "(default: this machine's CPUs divided by --replicas, at least 1)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join a running Ray cluster (e.g. 'auto' or 10.0.0.5:6379, from `ray start --head`) "
                        "instead of starting one here")
    g.add_argument("--no-prefix-affinity", action="store_true",
                   help="route every request to the least-loaded replica, ignoring shared prompt prefixes")
    g.add_argument("--affinity-imbalance", type=int, default=4, metavar="N",
                   help="keep a shared-prefix request on the replica that served the prefix unless it has more "
                        "than N requests in flight beyond the least busy replica (default 4)")
    g.add_argument("--affinity-min-prefix", type=int, default=256, metavar="CHARS",
                   help="prompt characters two requests must share before affinity applies (default 256)")


def cmd_serve_or_replicas(args) -> int:
    if getattr(args, "replicas", None) is None:
        from jisu.server.serve import cmd_serve

        return cmd_serve(args)
    return cmd_serve_replicas(args)


def cmd_serve_replicas(args) -> int:
    from jisu.server.serve import API_KEY_ENV, _check_args, _split, allowed_hosts_for, bind_socket

    _check_args(args)
    if args.replicas < 1:
        raise JisuError(f"--replicas must be >= 1, got {args.replicas}")
    if args.port == 0:
        raise JisuError("--port 0 is not supported with --replicas (Ray Serve's proxy needs a fixed port)")
    threads = args.threads_per_replica or max(1, (os.cpu_count() or 1) // args.replicas)
    if threads < 1:
        raise JisuError(f"--threads-per-replica must be >= 1, got {threads}")
    if args.ray_address is None:
        bind_socket(args.host, args.port).close()  # a port in use fails now, not after Ray starts
    try:
        import ray
        from ray import serve
    except ImportError:
        raise JisuError("--replicas needs Ray Serve: pip install 'jisu[ray]' (or 'ray[serve]')") from None
    from jisu.server.ray_serve import ReplicaSettings, build_app

    llm_kwargs = {}
    if getattr(args, "speculative_config", None) is not None:
        llm_kwargs["speculative_config"] = args.speculative_config
    settings = ReplicaSettings(
        model=None if args.model is None else str(args.model), device=args.device, dtype=args.dtype,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=args.num_kv_blocks, weights=args.weights,
        activations=args.activations, kv_cache_dtype=args.kv_cache_dtype, deterministic=args.deterministic,
        served_model_name=args.served_model_name, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_queue=args.max_queue, allowed_hosts=allowed_hosts_for(args.host, args.allowed_hosts),
        allowed_origins=_split(args.allowed_origins) or None,
        special_tokens_in_content=args.allow_special_tokens_in_content,
        request_body_timeout_s=args.request_body_timeout, llm_kwargs=llm_kwargs,
    )
    started_here = args.ray_address is None
    print(f"jisu serve: {'starting a local Ray cluster' if started_here else 'joining ' + args.ray_address}, "
          f"{args.replicas} replica(s) x {threads} CPU ...", file=sys.stderr, flush=True)
    if started_here:
        ray.init(num_cpus=args.replicas * threads, include_dashboard=False, log_to_driver=args.log_level == "debug")
    else:
        ray.init(address=args.ray_address, log_to_driver=args.log_level == "debug")
    stop = threading.Event()
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(settings, replicas=args.replicas, threads=threads, affinity=not args.no_prefix_affinity,
                        router_kwargs={"imbalance": args.affinity_imbalance,
                                       "min_match_chars": args.affinity_min_prefix}, grace_s=args.shutdown_timeout)
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"jisu serve: ready on http://{args.host}:{args.port} ({args.replicas} replicas on Ray Serve; "
              f"SIGTERM or Ctrl-C stops)", flush=True)

        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        print("jisu serve: draining the replicas ...", file=sys.stderr, flush=True)
        serve.delete(APP_NAME)  # each replica finishes its requests (up to --shutdown-timeout), then stops
    finally:
        if started_here:
            serve.shutdown()
            ray.shutdown()
    print("jisu serve: stopped", file=sys.stderr, flush=True)
    return 0
