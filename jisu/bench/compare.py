"""`jisu bench compare`: the latency workload on jisu and the engines users would pick instead, in one
process, on the same weights and the same prompt token ids.

Per run and engine: one batch-1 request of --input-len prompt tokens and --output-len greedy tokens
(prefill tok/s = prompt / TTFT, decode tok/s = (n - 1) / (t_n - t_1)), then for each --concurrency
level above 1, that many such requests at once (output tokens/s over the wall time). Engines alternate
run by run (their order rotates, so none always runs first); medians over --runs runs after a warm-up.

Each figure is also given as % of its roofline bound: the time the analytical model
(jisu.profile.roofline) says the work needs at this machine's calibrated bandwidth and matmul rate,
over the time it took, with the weight format that engine actually reads.

ik_llama.cpp runs as its own `llama-bench` ($JISU_IK_LLAMA_BENCH) in a child process, once per run in its turn,
on the same GGUF, prompt length, output length and threads; its figures come from llama-bench's JSON.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

from jisu.bench.engine_support import EngineSkipped as _Skip
from jisu.bench.engine_support import gguf_weight_format as _gguf_weight_format
from jisu.bench.ik_llama import IK_LLAMA_ENV, IkLlamaEngine, ik_llama_bench_path
from jisu.bench.latency import TimedRun, check_workload, fmt_num, machine_info, phase_figures, timed_generate
from jisu.errors import InvalidRequestError, JisuError
from jisu.profile.memory import peak_rss_bytes, rss_bytes

ENGINE_ALIASES = {"jisu": "jisu", "transformers": "transformers", "hf": "transformers",
                  "llama.cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp",
                  "llama_cpp": "llama.cpp", "ik_llama": "ik_llama", "ik_llama.cpp": "ik_llama",
                  "ik-llama": "ik_llama"}
INSTALL = {"transformers": "pip install transformers accelerate", "llama.cpp": "pip install llama-cpp-python",
           "ik_llama": f"build llama-bench from github.com/ikawrakow/ik_llama.cpp and set {IK_LLAMA_ENV} to its path"}


def parse_engines(text: str) -> list[str]:
    """Engine names; `jisu:WEIGHTS` is jisu loaded with --weights WEIGHTS (e.g. jisu:float32 beside jisu), and
    `jisu:WEIGHTS:KV` also with --kv-cache-dtype KV (e.g. jisu:auto:float16)."""
    out = []
    for part in text.split(","):
        base, _, weights = part.strip().partition(":")
        name = ENGINE_ALIASES.get(base.lower())
        if name is None or (weights and name != "jisu"):
            raise InvalidRequestError(
                f"--engines: unknown engine {part.strip()!r}; use jisu, jisu:WEIGHTS (e.g. jisu:float32), "
                f"jisu:WEIGHTS:KV (e.g. jisu:auto:float16), transformers, llama.cpp, ik_llama"
            )
        if weights:
            from jisu.config import CacheConfig
            from jisu.quant.plan import parse_weights

            fmt, _, kv = weights.partition(":")
            parse_weights(fmt)  # a clear error for a format the engine does not know
            if kv:
                CacheConfig(dtype=kv)  # likewise for a KV cache dtype
            name = f"jisu:{weights}"
        if name not in out:
            out.append(name)
    return out


# ----------------------------------------------------------------------------- engines


class JisuEngine:
    name = "jisu"
    kv_dtype = "float32"
    note = ""

    def __init__(self, path: Path, checkpoint, max_len: int, max_seqs: int, weights: str = "auto",
                 deterministic: bool = True, activations: str = "int16"):
        """weights: a --weights format, optionally followed by ':' and a --kv-cache-dtype (auto:float16).
        deterministic: False runs prompts on the eager layers' faster, batch-shape-dependent kernels (--no-
        deterministic). activations: --activations (int8: faster, coarser)."""
        from jisu.llm import LLM

        from jisu.loader.resolve import load_checkpoint

        # Its own load, keeping GGUF's Q4_1/Q8_0 blocks (the checkpoint shared with the others is float).
        del checkpoint
        fmt, _, kv = weights.partition(":")
        self.llm = LLM(model=str(path), checkpoint=load_checkpoint(path, keep_blocks=True), max_model_len=max_len,
                       max_num_seqs=max_seqs, weights=fmt, kv_cache_dtype=kv or "auto", deterministic=deterministic,
                       activations=activations)
        notes = []
        if not deterministic:
            notes.append("not deterministic (--no-deterministic): prompts run whole on the eager layers")
        if activations != "int16":
            notes.append(f"--activations {activations}" + (" (changes answers: docs/QUANTIZATION.md)"
                                                           if activations == "int8" else ""))
        self.note = "; ".join(notes)
        if weights != "auto":
            self.name = f"jisu:{weights}"
        self.kv_dtype = str(self.llm.engine.kv_dtype).removeprefix("torch.")
        self.version = _version("jisu")

    def _run(self, prompts: list[list[int]], output_len: int) -> TimedRun:
        run = timed_generate(self.llm.engine, prompts, output_len)
        if run.cached_tokens:  # prompts are unique per run; a hit would make jisu's prefill look free
            raise JisuError(f"jisu reused {run.cached_tokens} cached prompt tokens in a compare run")
        return run

    def latency(self, prompt: list[int], output_len: int) -> TimedRun:
        return self._run([prompt], output_len)

    def batch(self, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
        run = self._run(prompts, output_len)
        return max(t[-1] for t in run.token_times) - run.start, sum(len(t) for t in run.token_times)

    def weight_format(self):
        from jisu.profile.roofline import WeightFormat

        return WeightFormat.from_model(self.llm.engine.model)


class TransformersEngine:
    name = "transformers"
    kv_dtype = "float32"
    note = "weights dequantized to float32 by transformers' GGUF loader"

    def __init__(self, path: Path, checkpoint, max_len: int, max_seqs: int):
        import torch
        import transformers

        kw = {"gguf_file": path.name} if path.is_file() else {}
        folder = str(path.parent) if kw else str(path)
        if not kw:
            self.note = "Hugging Face folder, float32"
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
        eos = self.model.generation_config.eos_token_id
        pad = self.model.generation_config.pad_token_id
        self.pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos) or 0
        self.version = transformers.__version__

    def _generate(self, prompts: list[list[int]], output_len: int, streamer=None):
        import torch

        ids = torch.tensor(prompts)  # compare prompts are all the same length: no padding needed
        with torch.no_grad():
            return self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                                       min_new_tokens=output_len, do_sample=False, pad_token_id=self.pad,
                                       streamer=streamer)

    def latency(self, prompt: list[int], output_len: int) -> TimedRun:
        times: list[float] = []

        class Clock:  # generate() calls put() once with the prompt, then once per generated token
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        start = time.perf_counter()
        self._generate([prompt], output_len, Clock())
        return TimedRun(start, [times[1:]], len(prompt))

    def batch(self, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
        start = time.perf_counter()
        out = self._generate(prompts, output_len)  # a streamer takes batch 1 only
        wall = time.perf_counter() - start
        return wall, int(out.shape[0] * (out.shape[1] - len(prompts[0])))

    def weight_format(self):
        from jisu.profile.roofline import WeightFormat

        return WeightFormat.from_model(self.model)


class LlamaCppEngine:
    name = "llama.cpp"
    kv_dtype = "float16"  # llama.cpp's default KV cache type
    note = ""

    def __init__(self, path: Path, checkpoint, max_len: int, max_seqs: int):
        import llama_cpp
        import torch

        if not path.is_file():
            raise _Skip("llama.cpp needs a GGUF file; the model is a Hugging Face folder")
        threads = torch.get_num_threads()  # the same threads as the torch engines
        self.path = path
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=max_len, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, verbose=False)
        self.version = llama_cpp.__version__
        if max_seqs > 1:
            self.note = "llama-cpp-python's Llama runs one sequence at a time: concurrent prompts ran back to back"

    def _one(self, prompt: list[int], output_len: int) -> list[float]:
        self.llm.reset()  # forget the previous run's tokens so nothing of the prompt is reused
        times = []
        for _ in self.llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == output_len:
                break
        return times

    def latency(self, prompt: list[int], output_len: int) -> TimedRun:
        start = time.perf_counter()
        return TimedRun(start, [self._one(prompt, output_len)], len(prompt))

    def batch(self, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
        start = time.perf_counter()
        tokens = sum(len(self._one(p, output_len)) for p in prompts)
        return time.perf_counter() - start, tokens

    def weight_format(self):
        return _gguf_weight_format(self.path)


ENGINES = {"jisu": JisuEngine, "transformers": TransformersEngine, "llama.cpp": LlamaCppEngine,
           "ik_llama": IkLlamaEngine}
_MODULES = {"jisu": "jisu", "transformers": "transformers", "llama.cpp": "llama_cpp"}


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "unknown"


def load_engines(names: list[str], path: Path, checkpoint, max_len: int, max_seqs: int, log,
                 ik_llama_options: dict | None = None, jisu_options: dict | None = None) -> tuple[list, dict]:
    """The engines that load, and {name: {reason, install}} for those skipped. ik_llama_options / jisu_options:
    keyword arguments of IkLlamaEngine (run_time_repack, timeout_s) / JisuEngine (deterministic, activations)."""
    loaded, skipped = [], {}
    for name in names:
        base, _, weights = name.partition(":")
        if base in _MODULES and importlib.util.find_spec(_MODULES[base]) is None:
            skipped[name] = {"reason": f"{_MODULES[base]} is not installed", "install": INSTALL[base]}
            log(f"{name}: skipped ({_MODULES[base]} is not installed; {INSTALL[base]})")
            continue
        t = time.perf_counter()
        rss = rss_bytes()
        try:
            args = (path, checkpoint, max_len, max_seqs) + ((weights,) if weights else ())
            options = {"ik_llama": ik_llama_options, "jisu": jisu_options}.get(base) or {}
            engine = ENGINES[base](*args, **options)
        except _Skip as e:
            # Not installed (no binary named) comes with how to get it; a model it cannot run does not.
            install = INSTALL[base] if base == "ik_llama" and IK_LLAMA_ENV in str(e) else None
            skipped[name] = {"reason": str(e), "install": install}
            log(f"{name}: skipped ({e}" + (f"; {install})" if install else ")"))
            continue
        after = rss_bytes()
        # What loading this engine added to the process's RSS: its weights, caches and buffers as they stand once
        # loaded (None where the OS does not say). Approximate: allocator reuse of memory freed meanwhile hides part.
        # An engine in its own process adds nothing here: its memory is measured on the child.
        engine.load_rss_growth = (None if rss is None or after is None or getattr(engine, "own_process", False)
                                  else after - rss)
        loaded.append(engine)
        log(f"{name}: loaded in {time.perf_counter() - t:.1f} s"
            + ("" if engine.load_rss_growth is None else f", RSS +{engine.load_rss_growth / 2**20:.0f} MiB"))
    return loaded, skipped


# ----------------------------------------------------------------------------- roofline


def get_calibration(mode: str, device: str = "cpu"):
    """(calibration or None, how it was obtained)."""
    if mode == "none":
        return None, "skipped (--calibration none)"
    from jisu.profile import calibrate as cal_mod

    cached = None if mode == "fresh" else cal_mod.load_calibration(device)
    if cached is not None and (mode == "quick" or not cached.quick):
        return cached, f"cached ({cached.path}, measured {cached.measured_at})"
    cal = cal_mod.calibrate(device=device, quick=mode == "quick", force=mode == "fresh")
    return cal, f"measured now{' (quick)' if cal.quick else ''}, cached in {cal.path}"


def roofline_percents(config, engine, cal, input_len: int, output_len: int, medians: dict,
                      concurrencies: list[int]) -> dict:
    """% of the roofline bound of each median figure, for the weight format this engine reads."""
    from jisu.profile.roofline import decode_cost, prefill_cost, roofline_verdict

    wf = engine.weight_format()
    kw = {"weights": wf, "dtype": "float32", "kv_dtype": engine.kv_dtype}
    decode_steps = [decode_cost(config, input_len + k, 1, **kw) for k in range(1, output_len)]
    out = {"weights": wf.name,
           "weight_bytes_per_decode_token": decode_steps[0].bytes.weights_total if decode_steps else None}
    if medians.get("prefill_tokens_per_s") is not None:
        pre = roofline_verdict(medians["prefill_tokens_per_s"], prefill_cost(config, input_len, 1, **kw), cal)
        out["prefill"] = {"percent": pre.percent_of_bound, "bound_tokens_per_s": pre.bound_tokens_per_s,
                          "binding": pre.binding}
    if decode_steps and medians.get("decode_tokens_per_s") is not None:
        dec = roofline_verdict(medians["decode_tokens_per_s"], decode_steps, cal)
        out["decode"] = {"percent": dec.percent_of_bound, "bound_tokens_per_s": dec.bound_tokens_per_s,
                         "binding": dec.binding}
    for c in concurrencies:
        key = f"concurrent_{c}_output_tokens_per_s"
        if c == 1 or medians.get(key) is None:
            continue
        # The whole workload: c prompts prefilled, then output_len - 1 decode steps of c sequences.
        steps = [prefill_cost(config, input_len, c, **kw)] + [decode_cost(config, input_len + k, c, **kw)
                                                              for k in range(1, output_len)]
        tokens = sum(s.tokens for s in steps)
        wall = c * output_len / medians[key]  # the median rate's wall time
        v = roofline_verdict(tokens / wall, steps, cal)
        out[f"concurrent_{c}"] = {"percent": v.percent_of_bound, "binding": v.binding,
                                  "bound_output_tokens_per_s": c * output_len * v.bound_tokens_per_s / tokens}
    return out


# ----------------------------------------------------------------------------- the benchmark


def run_compare(engines: list, tokenizer, input_len: int, output_len: int, runs: int, concurrencies: list[int],
                log=None) -> dict:
    """Per engine: every run's figures and their medians."""
    from jisu.bench.prompts import synthetic_prompt

    log = log or (lambda s: None)
    batch = [c for c in concurrencies if c > 1]

    def prompts(seed: int, n: int) -> list[list[int]]:
        return [synthetic_prompt(tokenizer, input_len, seed=seed * 7919 + i).token_ids for i in range(n)]

    def latency_figures(e, prompt: list[int]) -> dict:
        # An engine timed by its own tool (ik_llama's llama-bench) gives figures, not token times.
        if hasattr(e, "latency_figures"):
            return e.latency_figures(prompt, output_len)
        return phase_figures(e.latency(prompt, output_len))

    for e in engines:  # warm-up: every shape once
        if hasattr(e, "latency_figures"):
            e.latency_figures(prompts(90_001, 1)[0], min(output_len, 8))
        else:
            e.latency(prompts(90_001, 1)[0], min(output_len, 8))
        for c in batch:
            if e.batch is not None:
                e.batch(prompts(90_002 + c, c), 2)
    per = {e.name: {} for e in engines}
    for r in range(runs):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        single = prompts(r, 1)  # the same token ids for every engine in this run
        for e in order:
            f = latency_figures(e, single[0])
            _add(per[e.name], f)
            log(f"run {r + 1}/{runs} {e.name:12s} prefill {fmt_num(f['prefill_tokens_per_s']):>8s} tok/s  decode "
                f"{fmt_num(f['decode_tokens_per_s']):>7s} tok/s  TTFT {fmt_num(f['ttft_s'], 1000):>7s} ms")
        for c in batch:
            many = prompts(1000 + r * 100 + c, c)
            for e in order:
                if e.batch is None:
                    continue
                wall, tokens = e.batch(many, output_len)
                _add(per[e.name], {f"concurrent_{c}_wall_s": wall, f"concurrent_{c}_output_tokens_per_s": tokens / wall})
                log(f"run {r + 1}/{runs} {e.name:12s} {c} concurrent: {tokens / wall:8.1f} output tok/s")
    return {name: {"runs": figs, "medians": {k: _median(v) for k, v in figs.items()}} for name, figs in per.items()}


def _median(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _add(into: dict, figures: dict) -> None:
    for k, v in figures.items():
        into.setdefault(k, []).append(v)


RATIO_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s")


def _is_rate(key: str) -> bool:
    return key in RATIO_KEYS or key.endswith("output_tokens_per_s")


def ratios_vs_jisu(results: dict) -> dict:
    """engine -> figure -> engine / jisu (above 1: faster than jisu), for rate figures."""
    if "jisu" not in results:
        return {}
    base = results["jisu"]["medians"]
    return {name: {k: v / base[k] for k, v in r["medians"].items() if _is_rate(k) and base.get(k)}
            for name, r in results.items() if name != "jisu"}


def paired_ratios_vs_jisu(results: dict) -> dict:
    """engine -> figure -> {median, min, max, pairs} of engine / jisu within each run.

    Why: the engines of one run go back to back on the same prompt, so they share that moment's load on a shared
    machine; a ratio per run shows how far the host's noise moves the comparison, which the ratio of medians
    hides (e.g. float32 decode swings 50-80 tok/s between minutes while int4, compute-bound, moves less)."""
    if "jisu" not in results:
        return {}
    base = results["jisu"]["runs"]
    out = {}
    for name, r in results.items():
        if name == "jisu":
            continue
        out[name] = {}
        for k, values in r["runs"].items():
            pairs = [v / b for v, b in zip(values, base.get(k, [])) if v is not None and b] if _is_rate(k) else []
            if pairs:
                out[name][k] = {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs),
                                "pairs": len(pairs)}
    return out


def format_compare(result: dict) -> str:
    engines = result["engines"]
    # (median key, roofline key, column title)
    cols = [("prefill_tokens_per_s", "prefill", f"prefill {result['input_len']}"),
            ("decode_tokens_per_s", "decode", "decode b1")]
    cols += [(f"concurrent_{c}_output_tokens_per_s", f"concurrent_{c}", f"{c} concurrent")
             for c in result["concurrency"] if c > 1]
    width = max([14] + [len(name) + 2 for name in engines])
    kernels = (result.get("machine") or {}).get("cpu_kernels")
    lines = [f"medians of {result['runs']} runs, tokens/s (% of roofline bound); model {result['model']}"
             + (f"; jisu's CPU kernels: {kernels}" if kernels else ""),
             f"{'engine':{width}s}" + "".join(f"{label:>22s}" for _, _, label in cols)]
    for name, e in engines.items():
        roof = e.get("roofline") or {}
        cells = []
        for key, roof_key, _ in cols:
            v = e["medians"].get(key)
            pct = (roof.get(roof_key) or {}).get("percent")
            cells.append("-" if v is None else f"{v:.1f}" + (f" ({pct:.0f}%)" if pct is not None else ""))
        lines.append(f"{name:{width}s}" + "".join(f"{c:>22s}" for c in cells))
    paired = result.get("paired_ratios_vs_jisu", {})
    short = lambda key: key.replace("_tokens_per_s", "")  # noqa: E731
    for name, r in result.get("ratios_vs_jisu", {}).items():
        lines.append(f"{name} / jisu: " + ", ".join(f"{short(k)} {v:.2f}x" for k, v in r.items()))
        spread = {k: p for k, p in paired.get(name, {}).items() if p["pairs"] > 1}
        if spread:
            lines.append(f"  {'':{len(name)}s} within each run: " + ", ".join(
                f"{short(k)} {p['min']:.2f}-{p['max']:.2f}x (median {p['median']:.2f}x)" for k, p in spread.items()))
    grown = {name: e["load_rss_growth_bytes"] for name, e in engines.items() if e.get("load_rss_growth_bytes") is not None}
    if result.get("peak_rss_bytes") is not None:
        parts = [f"process peak RSS {result['peak_rss_bytes'] / 2**20:,.0f} MiB (all engines together, one process)"]
        if result.get("checkpoint_rss_bytes") is not None:
            parts.append(f"the checkpoint the engines share +{result['checkpoint_rss_bytes'] / 2**20:,.0f} MiB")
        parts += [f"{name} +{b / 2**20:,.0f} MiB at load" for name, b in grown.items()]
        lines.append("memory: " + "; ".join(parts) + " (RSS growth while each loaded; approximate)")
    for name, e in engines.items():
        child = e["medians"].get("child_peak_rss_bytes")
        if child is not None:
            lines.append(f"memory: {name}: peak RSS of its own process {child / 2**20:,.0f} MiB (median over runs)")
    for name, e in engines.items():
        if e.get("note"):
            lines.append(f"note: {name}: {e['note']}")
    for name, s in result["skipped"].items():
        lines.append(f"skipped: {name}: {s['reason']}" + (f" (install: {s['install']})" if s.get("install") else ""))
    cal = result.get("calibration")
    if cal:
        lines.append(f"roofline: {cal['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, float32 matmul "
                     f"{cal['peak_flops_per_s'].get('float32', 0) / 1e9:.0f} GFLOP/s; {result['calibration_source']}")
        if any((part or {}).get("percent", 0) > 100 for e in engines.values()
               for part in (e.get("roofline") or {}).values() if isinstance(part, dict)):
            lines.append("note: above 100% means the calibration understates this machine (measured while it "
                         "was busy?) or the work stayed in cache: re-run with --calibration fresh on a quiet machine")
    else:
        lines.append(f"roofline: {result['calibration_source']}")
    return "\n".join(lines)


def cmd_compare(args) -> int:
    from jisu.loader.resolve import load_checkpoint, resolve_model
    from jisu.tokenizer import Tokenizer

    from jisu.bench.serve import parse_concurrency

    check_workload(args.input_len, args.output_len, args.runs)
    concurrencies = parse_concurrency(args.concurrency)
    names = parse_engines(args.engines)
    if "ik_llama" in names:
        timeout = getattr(args, "ik_llama_timeout", 600.0)
        if not timeout > 0 or timeout == float("inf"):
            raise InvalidRequestError(f"--ik-llama-timeout must be a number of seconds > 0, got {timeout!r}")
        ik_llama_bench_path()  # a bad $JISU_IK_LLAMA_BENCH fails now, before minutes of loading
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    path = resolve_model(args.model)
    rss = rss_bytes()
    checkpoint = load_checkpoint(path)
    after = rss_bytes()
    checkpoint_rss = None if rss is None or after is None else after - rss
    max_len = args.input_len + args.output_len + 16
    if max_len > checkpoint.config.max_position_embeddings:
        raise InvalidRequestError(f"--input-len + --output-len ({max_len - 16}) exceeds the model's context of "
                                  f"{checkpoint.config.max_position_embeddings} tokens")
    tokenizer = Tokenizer(checkpoint.tokenizer)
    ik_options = {"run_time_repack": getattr(args, "ik_llama_rtr", True),
                  "timeout_s": getattr(args, "ik_llama_timeout", 600.0)}
    engines, skipped = load_engines(names, path, checkpoint, max_len, max(concurrencies), log, ik_options,
                                    {"deterministic": getattr(args, "deterministic", True),
                                     "activations": getattr(args, "activations", "int16")})
    if not engines:
        raise JisuError("no engine could run: " + "; ".join(f"{n}: {s['reason']}" for n, s in skipped.items()))
    results = run_compare(engines, tokenizer, args.input_len, args.output_len, args.runs, concurrencies, log)

    cal, cal_source = get_calibration(args.calibration)
    for e in engines:
        r = results[e.name]
        r |= {"version": e.version, "note": e.note, "kv_cache_dtype": e.kv_dtype,
              "load_rss_growth_bytes": getattr(e, "load_rss_growth", None)}
        if isinstance(e, IkLlamaEngine):  # what llama-bench ran with, as its JSON reports it
            r |= {"run_time_repack": e.run_time_repack, "llama_bench": e.config}
        if cal is not None:
            try:
                r["roofline"] = roofline_percents(checkpoint.config, e, cal, args.input_len, args.output_len,
                                                  r["medians"], concurrencies)
            except JisuError as err:
                r["roofline"] = None
                r["note"] = (r["note"] + "; " if r["note"] else "") + f"no roofline figure: {err}"
    result = {"command": "compare", "model": str(path), "machine": machine_info(), "input_len": args.input_len,
              "output_len": args.output_len, "runs": args.runs, "concurrency": concurrencies,
              "calibration_source": cal_source,
              "calibration": None if cal is None else {"bandwidth_bytes_per_s": cal.bandwidth_bytes_per_s,
                                                       "peak_flops_per_s": cal.peak_flops_per_s, "quick": cal.quick},
              "engines": results, "skipped": skipped, "ratios_vs_jisu": ratios_vs_jisu(results),
              "paired_ratios_vs_jisu": paired_ratios_vs_jisu(results),
              "peak_rss_bytes": peak_rss_bytes(), "checkpoint_rss_bytes": checkpoint_rss}
    print(format_compare(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        log(f"wrote {args.json}")
    if args.plot:
        from jisu.bench.plots import compare_plot

        log(f"wrote {compare_plot(result, args.plot)}")
    return 0
