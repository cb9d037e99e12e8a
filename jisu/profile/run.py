"""`jisu profile`: run a workload, then join measured time with the analytical model of each step.

The workload runs twice on the same prompts, each from a cold prefix cache: once with no operator hooks
(the figures reported for requests, steps and the roofline), once with them (the operator and layer
breakdown). The greedy outputs of both runs must be identical, and the slowdown between them is the
profiler's own overhead, stated in the report.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from jisu.profile.memory import memory_report
from jisu.profile.operators import OperatorProfiler
from jisu.profile.roofline import SeqWork, StepCost, WeightFormat, roofline_verdict, step_cost
from jisu.profile.timeline import PHASES, StepRecord
from jisu.request import RequestOutput
from jisu.sampling_params import SamplingParams


@dataclass
class Workload:
    num_prompts: int = 1
    input_len: int = 128
    output_len: int = 64

    def __post_init__(self):
        for name in ("num_prompts", "input_len", "output_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                from jisu.errors import InvalidRequestError

                raise InvalidRequestError(f"{name} must be an integer >= 1, got {v!r}")


@dataclass
class ProfileResult:
    workload: Workload
    outputs: list[RequestOutput]
    steps: list[StepRecord]
    wall_time: float
    profiled_wall_time: float
    operators: dict[str, float]
    layers: dict[int, float]
    outputs_identical: bool
    baseline_wall_time: float = 0.0
    """The faster of two runs without hooks (one before, one after the profiled run)."""
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    cycles: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    """Peak and current RSS of the process, KV cache allocated and resident (jisu/profile/memory.py)."""
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per phase of the run with operator hooks: seconds in each pipeline stage of the forward pass (STAGES) and
    the phase's whole forward time in that run ("forward"), from StageTimer."""
    step_costs: list[StepCost] = field(default_factory=list)
    """The roofline model of each of `steps` (FLOPs and bytes)."""
    text_timings: dict[str, dict[str, float]] = field(default_factory=dict)
    """"tokenizer" and "detokenizer": seconds and tokens, timed apart from the engine steps (time_text_stages)."""

    @property
    def profiler_overhead(self) -> float:
        """Slowdown of the run with operator hooks, as a fraction of the run without them."""
        return self.profiled_wall_time / (self.baseline_wall_time or self.wall_time) - 1.0


def synthetic_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n different prompts of exactly `length` tokens."""
    prompts = []
    for i in range(n):
        text = " ".join(f"item{(j * 7919 + i * 104729) % 997}" for j in range(length))
        ids = tokenizer.encode(text, add_special_tokens=False)[:length]
        if len(ids) < length:
            ids = (ids * (length // max(1, len(ids)) + 1))[:length]
        prompts.append(ids)
    return prompts


def step_phase(step: StepRecord) -> str:
    """prefill (the step only prefills), decode (it only decodes) or mixed."""
    if step.num_prefill_tokens and step.num_decodes:
        return "mixed"
    return "prefill" if step.num_prefill_tokens else "decode"


STAGES = ("embedding", "attention", "ffn", "output_layer")


class StageTimer:
    """Seconds per pipeline stage per engine step, from forward hooks on the model's blocks: the embedding, each
    layer's attention and feed-forward halves (their norms included), the output layer (final norm + lm_head).

    NOTE: it runs inside OperatorProfiler, whose layer-by-layer decode makes these modules run; times are keyed
    by the index the engine's step record will get, so they can be grouped by phase afterwards.
    """

    def __init__(self, engine):
        self.engine = engine
        self.sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
        self.by_step: dict[int, dict[str, float]] = {}
        self._handles = []

    def __enter__(self) -> "StageTimer":
        model = self.engine.model
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if not layers or not hasattr(model, "lm_head") or not all(hasattr(x, "norms") for x in layers):
            return self  # not a jisu decoder: nothing to time by stage, and the rest of the profile goes on
        modules = [("embedding", inner.embed_tokens), ("embedding", getattr(inner, "embed_positions", None)),
                   ("output_layer", inner.norm), ("output_layer", model.lm_head)]
        for layer in layers:
            pre_attn, post_attn, pre_mlp, post_mlp = layer.norms()
            modules += [("attention", pre_attn), ("attention", layer.self_attn), ("attention", post_attn),
                        ("ffn", pre_mlp), ("ffn", layer.mlp), ("ffn", post_mlp)]
        for stage, module in modules:
            if module is not None:
                self._hook(stage, module)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, stage: str, module) -> None:
        starts: list[float] = []

        def pre(mod, args):
            self.sync()
            starts.append(time.perf_counter())

        def post(mod, args, output):
            self.sync()
            seconds = time.perf_counter() - starts.pop()
            per = self.by_step.setdefault(self.engine.step_log.count, dict.fromkeys(STAGES, 0.0))
            per[stage] += seconds

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def by_phase(self, steps: list[StepRecord]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for s in steps:
            entry = out.setdefault(step_phase(s), dict.fromkeys((*STAGES, "forward"), 0.0))
            entry["forward"] += s.forward
            for stage, seconds in self.by_step.get(s.index, {}).items():
                entry[stage] += seconds
        return out


def time_text_stages(tokenizer, prompts: list[list[int]], outputs: list[RequestOutput], repeats: int = 5):
    """Tokenizer (encoding the prompts' text) and detokenizer (the engine's incremental decode of each generated
    token), timed here because the workload hands the engine token ids and the step log lumps detokenization
    with stop checks and output building. The fastest of `repeats` passes, as for any short timing."""
    texts = [tokenizer.decode(p) for p in prompts]
    generated = [(o.prompt_token_ids, list(c.token_ids)) for o in outputs for c in o.outputs]
    best = {"tokenizer": float("inf"), "detokenizer": float("inf")}
    counts = {"tokenizer": 0, "detokenizer": sum(len(ids) for _, ids in generated)}
    for _ in range(repeats):
        t = time.perf_counter()
        counts["tokenizer"] = sum(len(tokenizer.encode(x, add_special_tokens=False)) for x in texts)
        best["tokenizer"] = min(best["tokenizer"], time.perf_counter() - t)
        decoders = [(tokenizer.stream_decoder(prompt), ids) for prompt, ids in generated]
        t = time.perf_counter()
        for decoder, ids in decoders:
            for token in ids:
                decoder.step(token)
        best["detokenizer"] = min(best["detokenizer"], time.perf_counter() - t)
    return {k: {"seconds": best[k], "tokens": counts[k]} for k in best}


def run_profile(llm, workload: Workload, calibration=None, count_cycles_fn=None) -> ProfileResult:
    engine = llm.engine
    prompts = synthetic_prompts(llm.tokenizer, workload.num_prompts, workload.input_len)
    params = SamplingParams(temperature=0, max_tokens=workload.output_len, ignore_eos=True)
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up

    def one_run():
        engine.blocks.reset_prefix_cache()
        first = engine.step_log.count
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        return outs, engine.step_log.since(first), time.perf_counter() - t

    cycles = None
    if count_cycles_fn is not None:
        (outs, steps, wall), cyc = count_cycles_fn(one_run)
        cycles = cyc
    else:
        outs, steps, wall = one_run()
    with OperatorProfiler(engine.model, engine.device) as prof, StageTimer(engine) as stages:
        outs_on, steps_on, wall_on = one_run()
    # A second hook-free run after the profiled one: the overhead is judged against the faster of the two,
    # so a noisy moment in either does not pass for profiler cost (or for a profiler speed-up).
    outs_again, _, wall_again = one_run()
    identical = [o.token_ids for o in outs] == [o.token_ids for o in outs_on] == [o.token_ids for o in outs_again]
    result = ProfileResult(
        workload=workload, outputs=outs, steps=steps, wall_time=wall, profiled_wall_time=wall_on,
        baseline_wall_time=min(wall, wall_again),
        operators=prof.breakdown(sampling_seconds=sum(s.sample for s in steps_on)),
        layers=dict(prof.by_layer), outputs_identical=identical,
    )
    result.phases = phase_verdicts(engine, steps, calibration)
    result.stages = stages.by_phase(steps_on)
    result.step_costs = [_cost(engine, s) for s in steps]
    result.text_timings = time_text_stages(llm.tokenizer, prompts, outs)
    result.memory = memory_report(engine)
    if cycles is not None:
        tokens = sum(s.num_tokens for s in steps)
        flops = sum(_cost(engine, s).flops.total for s in steps)
        result.cycles = cycles.to_dict() | {
            "cycles_per_token": cycles.per_token(tokens),
            "flops_per_cycle": cycles.flops_per_cycle(flops),
        }
    return result


def _cost(engine, step: StepRecord):
    batch = [SeqWork(n, ctx, samples) for n, ctx, samples in step.batch]
    weights = getattr(engine, "_weight_format", None)
    if weights is None:
        weights = engine._weight_format = WeightFormat.from_model(engine.model)
    return step_cost(engine.model_config, batch, weights, dtype=engine.dtype, kv_dtype=engine.kv_dtype)


def phase_verdicts(engine, steps: list[StepRecord], calibration) -> dict[str, dict[str, Any]]:
    """Per phase (steps that only prefill, steps that only decode): achieved tokens/s over the steps' own
    time, and the roofline verdict when a calibration is available."""
    groups = {phase: [s for s in steps if step_phase(s) == phase] for phase in ("prefill", "decode", "mixed")}
    out: dict[str, dict[str, Any]] = {}
    for phase, group in groups.items():
        if not group:
            continue
        seconds = sum(s.total for s in group)
        tokens = sum(s.num_tokens for s in group)
        entry: dict[str, Any] = {
            "steps": len(group), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else None,
            "mean_batch": statistics.mean(s.num_seqs for s in group),
            "phase_seconds": {p: sum(getattr(s, p) for s in group) for p in PHASES},
        }
        if calibration is not None and seconds:
            entry["roofline"] = roofline_verdict(tokens / seconds, [_cost(engine, s) for s in group], calibration).to_dict()
        out[phase] = entry
    return out


def request_summary(outputs: list[RequestOutput]) -> dict[str, Any]:
    ms = [o.metrics for o in outputs if o.metrics is not None]

    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        values = sorted(values)
        p99 = values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]
        return {"mean": statistics.mean(values), "median": statistics.median(values), "p99": p99}

    return {
        "requests": len(ms),
        "prompt_tokens": sum(m.prompt_tokens for m in ms),
        "completion_tokens": sum(m.completion_tokens for m in ms),
        "queue_time": stats(m.queue_time for m in ms),
        "ttft": stats(m.time_to_first_token for m in ms),
        "tpot": stats(m.tpot for m in ms),
        "itl": stats([x for m in ms for x in m.inter_token_latencies]),
        "e2e": stats(m.e2e_time for m in ms),
        "decode_tokens_per_s": stats(m.decode_tokens_per_s for m in ms),
    }
