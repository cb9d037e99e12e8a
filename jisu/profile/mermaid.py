"""`jisu profile --mermaid`: a profiled run as a Mermaid flowchart of the inference pipeline, each stage annotated
per phase with its measured time per token and share of the step, its bytes and FLOPs per token and its % of the
roofline bound.

Where the figures come from (all from ProfileResult, nothing estimated here):
- Step time and its phases (schedule, prepare, forward, sample, detokenize) are the run without hooks.
- The forward time is split into embedding / attention / feed-forward / output layer by the shares StageTimer
  measured in the run with hooks (where decode runs layer by layer); what those stages leave is "forward: other".
- Sampling is the step log's sample phase; the detokenizer is its incremental decode timed on the generated
  tokens (time_text_stages), and the rest of the detokenize phase, with schedule, prepare and draft, is
  "scheduler + bookkeeping". So the stages of a phase add up to its step time exactly.
- Bytes and FLOPs are the roofline model's (jisu/profile/roofline.py) for the same steps, split by stage; bytes
  are the compulsory ones (weights read + KV cache), as the bound uses.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jisu.errors import JisuError
from jisu.profile.roofline import StepCost
from jisu.profile.run import STAGES, ProfileResult, step_phase

STEP_STAGES = (*STAGES, "forward_other", "sampling", "detokenizer", "bookkeeping")
"""The stages of one engine step, in pipeline order: their times partition the step time of each phase."""

MODEL_STAGES = frozenset(STAGES)
"""Stages the roofline model costs (FLOPs and bytes)."""


def _stage_costs(cost: StepCost, num_layers: int) -> dict[str, tuple[float, float]]:
    """One step's (FLOPs, compulsory bytes) per model stage; they add up to the step's totals."""
    f, w = cost.flops, cost.bytes.weights
    # The model counts two norms per layer (one per half) and the final one before the output layer.
    per_half = num_layers / (2 * num_layers + 1)
    final = 1.0 - 2 * per_half
    return {
        "embedding": (f.embedding, w["embed_tokens"]),
        # One residual add closes each half of a layer: half of the residual FLOPs each.
        "attention": (f.linear["qkv_proj"] + f.linear["o_proj"] + f.attention + f.softmax + f.rotary
                      + f.norm * per_half + f.residual / 2,
                      w["qkv_proj"] + w["qkv_bias"] + w["o_proj"] + w["norms"] * per_half
                      + cost.bytes.kv_read + cost.bytes.kv_write),
        "ffn": (f.linear["gate_up_proj"] + f.linear["down_proj"] + f.activation + f.norm * per_half + f.residual / 2,
                w["gate_up_proj"] + w["down_proj"] + w["norms"] * per_half),
        "output_layer": (f.linear["lm_head"] + f.norm * final, w["lm_head"] + w["norms"] * final),
    }


def pipeline_stages(result: ProfileResult, calibration=None) -> dict[str, Any]:
    """Per phase: its steps, tokens and step seconds, and per stage of STEP_STAGES its seconds, FLOPs, bytes and
    roofline bound seconds (None where the stage is not in the roofline model or there is no calibration)."""
    if len(result.step_costs) != len(result.steps):
        raise JisuError("the profile result has no roofline cost for every step (run it with run_profile)")
    if not result.layers or not result.stages:
        raise JisuError("the profile result has no per-layer or per-stage times: the model has no decoder layers "
                        "jisu can hook (or the result did not come from run_profile)")
    timings = result.text_timings
    for name in ("tokenizer", "detokenizer"):
        if name not in timings:
            raise JisuError(f"the profile result has no {name} timing (run it with run_profile)")
    detok = timings["detokenizer"]
    detok_per_token = detok["seconds"] / detok["tokens"] if detok["tokens"] else 0.0
    bandwidth = peak = None
    if calibration is not None:
        bandwidth = float(calibration.bandwidth_bytes_per_s)
        dtypes = {c.dtype for c in result.step_costs}
        missing = dtypes - set(calibration.peak_flops_per_s)
        if missing:
            raise JisuError(f"the calibration has no matmul rate for {', '.join(sorted(missing))}; "
                            f"run `jisu calibrate --force`")

    phases: dict[str, Any] = {}
    for step, cost in zip(result.steps, result.step_costs):
        phase = step_phase(step)
        p = phases.setdefault(phase, {
            "steps": 0, "tokens": 0, "sampled": 0, "seconds": 0.0,
            "step_phases": dict.fromkeys(("schedule", "prepare", "forward", "sample", "detokenize", "draft"), 0.0),
            "flops": dict.fromkeys(STAGES, 0.0), "bytes": dict.fromkeys(STAGES, 0.0),
            "bound_seconds": dict.fromkeys(STAGES, 0.0),
        })
        p["steps"] += 1
        p["tokens"] += step.num_tokens
        # Tokens the step emitted: one per sampling sequence, plus accepted draft tokens.
        p["sampled"] += sum(1 for *_, samples in step.batch if samples) + step.num_accepted_tokens
        p["seconds"] += step.total
        for k in p["step_phases"]:
            p["step_phases"][k] += getattr(step, k)
        for stage, (flops, nbytes) in _stage_costs(cost, len(result.layers)).items():
            p["flops"][stage] += flops
            p["bytes"][stage] += nbytes
            if bandwidth is not None:
                p["bound_seconds"][stage] += max(nbytes / bandwidth, flops / calibration.peak_flops_per_s[cost.dtype])

    out: dict[str, Any] = {"phases": {}, "stages": {s: {} for s in STEP_STAGES},
                           "tokenizer": dict(timings["tokenizer"]), "detokenizer": dict(detok)}
    for phase, p in phases.items():
        hooked = result.stages.get(phase)
        if hooked is None:
            raise JisuError(f"the run with hooks has no {phase} steps to split the forward time by stage")
        sp = p["step_phases"]
        # Shares of the hooked forward; nested hooks cannot exceed it, but clamp so the split never overshoots.
        hooked_forward = max(hooked["forward"], sum(hooked[s] for s in STAGES))
        seconds = {s: sp["forward"] * hooked[s] / hooked_forward if hooked_forward else 0.0 for s in STAGES}
        seconds["forward_other"] = sp["forward"] - sum(seconds[s] for s in STAGES)
        seconds["sampling"] = sp["sample"]
        seconds["detokenizer"] = min(sp["detokenize"], detok_per_token * p["sampled"])
        seconds["bookkeeping"] = (sp["schedule"] + sp["prepare"] + sp["draft"]
                                  + sp["detokenize"] - seconds["detokenizer"])
        out["phases"][phase] = {k: p[k] for k in ("steps", "tokens", "sampled", "seconds")} | {
            "roofline": result.phases.get(phase, {}).get("roofline")}
        for stage in STEP_STAGES:
            modelled = stage in MODEL_STAGES
            out["stages"][stage][phase] = {
                "seconds": seconds[stage],
                "flops": p["flops"][stage] if modelled else None,
                "bytes": p["bytes"][stage] if modelled else None,
                "bound_seconds": p["bound_seconds"][stage] if modelled and bandwidth is not None else None,
            }
    return out


# ----------------------------------------------------------------------------- text

NOT_CALIBRATED = "roofline n/a (run jisu calibrate)"


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _ms(seconds: float) -> str:
    """Milliseconds with 3 decimals, or at least 3 significant digits below 0.1 ms (a detokenizer's microsecond)."""
    ms = 1e3 * seconds
    decimals = 3 if ms >= 0.1 or ms <= 0 else min(6, 2 - math.floor(math.log10(ms)))
    return f"{ms:.{decimals}f}"


def _label(*lines: str) -> str:
    """A quoted Mermaid label: characters Mermaid would read as syntax become entity codes."""
    def escape(text: str) -> str:
        text = text.replace("#", "#35;").replace('"', "#quot;")
        return text.replace("<", "#lt;").replace(">", "#gt;")

    return '"' + "<br/>".join(escape(line) for line in lines) + '"'


def _phase_line(phase: str, info: dict, stage: dict, calibrated: bool) -> str:
    tokens, step_seconds = info["tokens"], info["seconds"]
    parts = [f"{phase}: {_ms(stage['seconds'] / tokens)} ms/token, "
             f"{100 * stage['seconds'] / step_seconds if step_seconds else 0.0:.1f}%"]
    if stage["flops"] is not None:
        parts.append(f"{_si(stage['bytes'] / tokens, 'B')}/token")
        parts.append(f"{_si(stage['flops'] / tokens, 'FLOP')}/token")
        if not calibrated:
            parts.append(NOT_CALIBRATED)
        elif stage["seconds"] > 0:
            parts.append(f"{100 * stage['bound_seconds'] / stage['seconds']:.0f}% of roofline bound")
    return " · ".join(parts)


STAGE_TITLES = {
    "embedding": "embedding",
    "attention": "self-attention with KV cache (norm, QKV, rotary, attention, output projection)",
    "ffn": "feed-forward (norm, gate/up, activation, down)",
    "output_layer": "output layer (final norm, lm_head: logits)",
    "forward_other": "forward: other (residual adds, rotary tables, glue)",
    "sampling": "softmax / sampling",
    "detokenizer": "detokenizer (incremental decode)",
    "bookkeeping": "scheduler + bookkeeping (schedule, prepare inputs, stop checks, outputs)",
}
NODE_IDS = {"embedding": "embed", "attention": "attn", "ffn": "ffn", "output_layer": "lm_out",
            "forward_other": "fwd_other", "sampling": "sample", "detokenizer": "detok", "bookkeeping": "bookkeep"}


def mermaid_diagram(result: ProfileResult, calibration=None) -> str:
    """The pipeline as a Mermaid flowchart (GitHub renders it in a ```mermaid block)."""
    data = pipeline_stages(result, calibration)
    phases = data["phases"]
    calibrated = calibration is not None
    w = result.workload
    tok = data["tokenizer"]
    tok_ms = _ms(tok["seconds"] / tok["tokens"] if tok["tokens"] else 0.0)

    def stage_node(stage: str, indent: str) -> str:
        lines = [STAGE_TITLES[stage]]
        lines += [_phase_line(ph, info, data["stages"][stage][ph], calibrated) for ph, info in phases.items()]
        return f"{indent}{NODE_IDS[stage]}[{_label(*lines)}]"

    step_lines = ["step time (the stages in this box add up to it)"]
    for ph, info in phases.items():
        verdict = info["roofline"]
        bound = (f"{verdict['percent_of_bound']:.0f}% of roofline bound ({verdict['binding']})" if verdict
                 else NOT_CALIBRATED if not calibrated else "no roofline verdict")
        steps = f"{info['steps']} step" + ("s" if info["steps"] != 1 else "")
        step_lines.append(f"{ph}: {_ms(info['seconds'] / info['tokens'])} ms/token, 100% · "
                          f"{info['tokens']} tokens in {steps} · {bound}")
    n_layers = len(result.layers)
    out = [
        "flowchart TD",
        f"    text_in[{_label('input text', f'{w.num_prompts} prompt(s) × {w.input_len} tokens')}]",
        f"    tokenize[{_label('tokenizer (encode)', f'{tok_ms} ms/token, before the engine step (not in it)')}]",
        f"    subgraph step[{_label('one engine step (decode: once per generated token)')}]",
        "        direction TB",
        f"        step_time[{_label(*step_lines)}]",
        stage_node("embedding", "        "),
        f"        subgraph layers[{_label(f'{n_layers} × decoder layer')}]",
        "            direction TB",
        stage_node("attention", "            "),
        stage_node("ffn", "            "),
        "        end",
        *(stage_node(s, "        ") for s in ("output_layer", "sampling", "detokenizer", "forward_other",
                                              "bookkeeping")),
        "    end",
        f"    text_out[{_label('output text', f'{w.num_prompts} × {w.output_len} tokens')}]",
        f"    legend[{_label(*LEGEND)}]",
        "    text_in --> tokenize",
        "    tokenize --> embed",
        "    embed --> attn",
        "    attn --> ffn",
        '    ffn -.->|"next layer"| attn',
        "    ffn --> lm_out",
        "    lm_out --> sample",
        "    sample --> detok",
        '    sample -.->|"decode: the sampled token"| embed',
        "    detok --> text_out",
        "    step_time ~~~ embed",
        "    lm_out ~~~ fwd_other",
        "    fwd_other ~~~ bookkeep",
        "    text_out ~~~ legend",
    ]
    return "\n".join(out) + "\n"


LEGEND = (
    "how to read it",
    "ms/token: the phase's time in the stage over the phase's tokens (prompt tokens for prefill), run without hooks",
    "%: share of the phase's step time; the forward pass is split by the shares measured with per-module hooks",
    "B/token: weights read + KV cache read and written; FLOP/token: the roofline model's count",
    "% of roofline bound: the time memory bandwidth or peak FLOP/s allow for the stage over its measured time",
    "(over 100%: faster than the calibrated bandwidth allows, e.g. weights still in cache from the last step)",
)


def write_mermaid(path: str | Path, diagram: str) -> Path:
    """A .md file gets a ```mermaid block (what GitHub renders); any other name the bare diagram (.mmd)."""
    path = Path(path)
    text = f"```mermaid\n{diagram}```\n" if path.suffix.lower() in (".md", ".markdown") else diagram
    path.write_text(text)
    return path

