"""`jisu bench latency`: prefill and decode speed, TTFT and peak memory of jisu on one fixed workload.

Definitions (as ../shared/docs/BASELINES.md and llama-bench):
  prefill tok/s  prompt tokens computed (cache hits excluded) / time until every sequence has its first token
  decode tok/s   tokens generated after that instant / the time from it to the last token; for batch 1
                 this is (n - 1) / (t_n - t_1)
  TTFT           request added -> its first token, averaged over the batch
  depth N        N tokens already in the KV cache before the prompt (llama-bench -d): they are prefilled
                 (untimed) through the prefix cache, so prefill and decode run against a context of N + prompt
Every figure is reported as min / median / max over --runs runs after one untimed warm-up run.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from jisu.errors import InvalidRequestError

_HWM_FILE = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class TimedRun:
    """Per-request token arrival times of one batch; times are time.perf_counter() seconds."""

    start: float
    token_times: list[list[float]]
    prompt_tokens: int
    """Prompt tokens computed, i.e. without prefix-cache hits."""
    cached_tokens: int = 0
    preemptions: int = 0


def phase_figures(run: TimedRun) -> dict[str, float | None]:
    """prefill/decode rates, TTFT and E2E of one batch from its token times (decode is None when no token
    came after the last first token, e.g. a one-token output)."""
    if not run.token_times or any(not t for t in run.token_times):
        raise InvalidRequestError("every sequence of a timed run must have produced a token")
    firsts = [t[0] for t in run.token_times]
    all_first = max(firsts)  # from here on, every step is a pure decode step
    end = max(t[-1] for t in run.token_times)
    decoded = sum(1 for times in run.token_times for x in times if x > all_first)
    return {
        "prefill_tokens_per_s": run.prompt_tokens / (all_first - run.start),
        "decode_tokens_per_s": decoded / (end - all_first) if end > all_first and decoded else None,
        "ttft_s": statistics.fmean(f - run.start for f in firsts),
        "e2e_s": end - run.start,
    }


def timed_generate(engine, prompts: list[list[int]], output_len: int) -> TimedRun:
    """Runs token-id prompts together through an LLMEngine, greedy and ignoring EOS, recording when each
    token became visible to the caller (after the step that produced it returned)."""
    from jisu.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    times: dict[str, list[float]] = {rid: [] for rid in ids}
    metrics = {}
    while engine.has_unfinished_requests() and len(metrics) < len(ids):
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            seen = times.get(out.request_id)
            if seen is None:
                continue
            seen.extend([now] * (len(out.outputs[0].token_ids) - len(seen)))
            if out.finished:
                metrics[out.request_id] = out.outputs[0].metrics
    cached = sum(m.cached_prompt_tokens for m in metrics.values() if m)
    return TimedRun(
        start=start,
        token_times=[times[r] for r in ids],
        prompt_tokens=sum(len(p) for p in prompts) - cached,
        cached_tokens=cached,
        preemptions=sum(m.num_preemptions for m in metrics.values() if m),
    )


# ----------------------------------------------------------------------------- peak memory


def reset_peak_memory(device: str) -> None:
    """Restart the high-water mark so the peak covers the timed runs (the model's weights stay counted)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        _CLEAR_REFS.write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass  # then the peak includes loading; peak_memory() says which


def peak_memory(device: str) -> tuple[int | None, str]:
    """(bytes, what was measured)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    try:
        for line in _HWM_FILE.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "RSS high-water mark (VmHWM)"
    except OSError:
        pass
    import resource

    # ru_maxrss is KiB on Linux and cannot be reset: it includes model loading.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS high-water mark since process start"


# ----------------------------------------------------------------------------- the benchmark


def spread(values: list[float | None]) -> dict:
    """min / median / max of the defined values (a figure can be undefined in a run, see phase_figures)."""
    known = [v for v in values if v is not None]
    if not known:
        return {"min": None, "median": None, "max": None, "values": values}
    return {"min": min(known), "median": statistics.median(known), "max": max(known), "values": values}


def check_positive(flag: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidRequestError(f"{flag} must be an integer >= {low}, got {value!r}")


def check_workload(input_len: int, output_len: int, runs: int, batch: int = 1, depth: int = 0) -> None:
    for flag, v in (("--input-len", input_len), ("--batch", batch), ("--runs", runs)):
        check_positive(flag, v)
    check_positive("--depth", depth, allow_zero=True)
    if isinstance(output_len, bool) or not isinstance(output_len, int) or output_len < 2:
        raise InvalidRequestError(f"--output-len must be an integer >= 2 (decode speed needs a second token), "
                                  f"got {output_len!r}")


def run_latency(llm, input_len: int = 512, output_len: int = 128, batch: int = 1, runs: int = 5,
                depth: int = 0, device: str = "cpu", log=None) -> dict:
    """The latency workload on a loaded jisu LLM; returns the JSON-ready result."""
    from jisu.bench.prompts import synthetic_prompt

    check_workload(input_len, output_len, runs, batch, depth)
    engine = llm.engine
    context = depth + input_len + output_len
    if context > engine.max_model_len:
        raise InvalidRequestError(
            f"--depth {depth} + --input-len {input_len} + --output-len {output_len} = {context} tokens exceeds "
            f"the context window of {engine.max_model_len}; lower them (or raise --max-model-len)"
        )
    tok = llm.tokenizer
    prefix = synthetic_prompt(tok, depth, seed=999_983).token_ids if depth else []

    def one_run(seed: int) -> TimedRun:
        if prefix:  # untimed: puts the depth tokens in the prefix cache
            timed_generate(engine, [prefix], 1)
        prompts = [prefix + synthetic_prompt(tok, input_len, seed=seed * 1009 + i).token_ids for i in range(batch)]
        return timed_generate(engine, prompts, output_len)

    one_run(10_000)  # warm-up: kernels built, caches and allocator settled
    reset_peak_memory(device)
    figures, cached, preempted = [], [], 0
    for r in range(runs):
        run = one_run(r)
        f = phase_figures(run)
        figures.append(f)
        cached.append(run.cached_tokens)
        preempted += run.preemptions
        if log:
            log(f"run {r + 1}/{runs}: prefill {fmt_num(f['prefill_tokens_per_s'])} tok/s, decode "
                f"{fmt_num(f['decode_tokens_per_s'])} tok/s, TTFT {fmt_num(f['ttft_s'], 1000)} ms")
    peak, peak_kind = peak_memory(device)
    return {
        "input_len": input_len,
        "output_len": output_len,
        "batch": batch,
        "depth": depth,
        "runs": runs,
        "results": {k: spread([f[k] for f in figures]) for k in figures[0]},
        "cached_prompt_tokens_per_run": cached,
        "preemptions": preempted,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
    }


def machine_info(device: str = "cpu") -> dict:
    import platform

    import torch

    from jisu.profile.calibrate import device_name

    info = {"device": device, "device_name": device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}
    if device == "cpu":  # which build of jisu's C++ kernels ran (jisu/kernels/build.py KERNEL_SETS), None: none
        from jisu.kernels.build import cpu_linear_kernels

        kernels = cpu_linear_kernels()
        info["cpu_kernels"] = None if kernels is None else kernels.instruction_set
    return info


def fmt_num(v: float | None, scale: float = 1.0) -> str:
    return "-" if v is None else f"{v * scale:.1f}"


def format_latency(result: dict) -> str:
    r = result["results"]
    rows = [("prefill tok/s", "prefill_tokens_per_s", 1), ("decode tok/s", "decode_tokens_per_s", 1),
            ("TTFT ms", "ttft_s", 1000), ("E2E s", "e2e_s", 1)]
    lines = [f"model {result.get('model')} | batch {result['batch']} | prompt {result['input_len']} | "
             f"output {result['output_len']} | depth {result['depth']} | {result['runs']} runs after a warm-up",
             f"{'':16s}{'min':>10s}{'median':>10s}{'max':>10s}"]
    for label, key, scale in rows:
        s = r[key]
        lines.append(f"{label:16s}" + "".join(f"{fmt_num(s[k], scale):>10s}" for k in ("min", "median", "max")))
    if result["peak_memory_bytes"] is not None:
        lines.append(f"peak memory: {result['peak_memory_bytes'] / 2**20:.0f} MiB ({result['peak_memory_kind']})")
    if result["preemptions"]:
        lines.append(f"note: {result['preemptions']} preemptions (KV cache too small for this batch)")
    return "\n".join(lines)


def cmd_latency(args) -> int:
    from jisu.llm import LLM
    from jisu.loader.resolve import load_checkpoint, resolve_model

    check_workload(args.input_len, args.output_len, args.runs, args.batch, args.depth)
    path = resolve_model(args.model)
    print(f"jisu bench latency: loading {path} ...", file=sys.stderr, flush=True)
    llm = LLM(model=str(path), device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=max(args.batch, 1), checkpoint=load_checkpoint(path, keep_blocks=True),
              weights=args.weights, activations=args.activations, kv_cache_dtype=args.kv_cache_dtype,
              deterministic=args.deterministic)
    result = {"command": "latency", "model": str(path), "machine": machine_info(args.device),
              "dtype": str(llm.engine.dtype).removeprefix("torch."), "weights": llm.engine.weights}
    result |= run_latency(llm, args.input_len, args.output_len, args.batch, args.runs, args.depth, args.device,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_latency(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
