"""A profiled run as rich tables, as one JSON document, as a trace and as PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jisu.profile.run import ProfileResult, request_summary
from jisu.profile.timeline import PHASES


def report_dict(result: ProfileResult, calibration=None) -> dict[str, Any]:
    return {
        "workload": dict(result.workload.__dict__),
        "requests": request_summary(result.outputs),
        "wall_time_s": result.wall_time,
        "steps": {
            "count": len(result.steps),
            "phase_seconds": {p: sum(getattr(s, p) for s in result.steps) for p in PHASES},
            "records": [s.to_dict() for s in result.steps],
        },
        "phases": result.phases,
        "operators_seconds": result.operators,
        "layers_seconds": {str(k): v for k, v in sorted(result.layers.items())},
        "profiler": {
            "overhead_fraction": result.profiler_overhead,
            "outputs_identical_with_profiler_off": result.outputs_identical,
        },
        "cycles": result.cycles,
        "memory": result.memory,
        "calibration": calibration.to_dict() if calibration is not None else None,
    }


def print_report(result: ProfileResult, calibration=None, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    req = request_summary(result.outputs)
    w = result.workload
    console.print(f"[bold]jisu profile[/]: {w.num_prompts} prompt(s) x {w.input_len} tokens in, {w.output_len} out; "
                  f"wall {result.wall_time:.2f} s")

    t = Table(title="Requests (seconds)")
    for col in ("metric", "mean", "median", "p99"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for key in ("queue_time", "ttft", "tpot", "itl", "e2e", "decode_tokens_per_s"):
        v = req[key]
        if v is not None:
            t.add_row(key, *(f"{v[k]:.4f}" for k in ("mean", "median", "p99")))
    console.print(t)

    t = Table(title="Engine steps by phase")
    t.add_column("phase")
    for col in ("steps", "tokens", "tok/s", "mean batch", *PHASES):
        t.add_column(col, justify="right")
    for name, ph in result.phases.items():
        secs = ph["seconds"] or 1.0
        t.add_row(name, str(ph["steps"]), str(ph["tokens"]), f"{ph['tokens_per_s']:.1f}", f"{ph['mean_batch']:.1f}",
                  *(f"{100 * ph['phase_seconds'][p] / secs:.1f}%" for p in PHASES))
    console.print(t)

    total = sum(result.operators.values()) or 1.0
    t = Table(title=f"Operators (profiler overhead {100 * result.profiler_overhead:+.1f}%, outputs "
                    f"{'identical' if result.outputs_identical else 'DIFFERENT'} with it off; measured on the "
                    f"eager layers: the fused C++ stack, which runs decode steps and, in deterministic mode, "
                    f"prompts too when unhooked, has no operators to time)")
    t.add_column("class")
    t.add_column("ms", justify="right")
    t.add_column("share", justify="right")
    for k, v in sorted(result.operators.items(), key=lambda kv: -kv[1]):
        t.add_row(k, f"{v * 1e3:.1f}", f"{100 * v / total:.1f}%")
    console.print(t)

    if result.layers:
        ms = [v * 1e3 for _, v in sorted(result.layers.items())]
        console.print(f"Layers: {len(ms)}, mean {sum(ms) / len(ms):.2f} ms, min {min(ms):.2f} (layer "
                      f"{ms.index(min(ms))}), max {max(ms):.2f} (layer {ms.index(max(ms))}) over the run")

    rows = [(name, ph["roofline"]) for name, ph in result.phases.items() if "roofline" in ph]
    if rows:
        first = rows[0][1]
        t = Table(title=f"Roofline ({first['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
                        f"{first['peak_flops_per_s'] / 1e9:.0f} GFLOP/s peak for the compute dtype, calibrated)")
        for col in ("phase", "achieved tok/s", "bound tok/s", "% of bound", "binds", "GB/s", "GFLOP/s"):
            t.add_column(col, justify="left" if col in ("phase", "binds") else "right")
        for name, v in rows:
            t.add_row(name, f"{v['achieved_tokens_per_s']:.1f}", f"{v['bound_tokens_per_s']:.1f}",
                      f"{v['percent_of_bound']:.0f}%", v["binding"], f"{v['achieved_bytes_per_s'] / 1e9:.1f}",
                      f"{v['achieved_flops_per_s'] / 1e9:.1f}")
        console.print(t)
        for name, v in rows:
            console.print(f"[bold]{name}[/] ran at {v['percent_of_bound']:.0f}% of this machine's "
                          f"{v['binding']} limit ({v['achieved_tokens_per_s']:.1f} of {v['bound_tokens_per_s']:.1f} tok/s).")
    else:
        console.print("Roofline: no calibration yet (run `jisu calibrate`).")
    if result.cycles:
        c = result.cycles
        label = "estimated from CPU time x clock" if c["estimated"] else "hardware counters"
        console.print(f"Cycles: {c['cycles_per_token'] / 1e6:.2f} M per token, {c['flops_per_cycle']:.2f} FLOPs per "
                      f"cycle ({label}; {c['note']})")
    if result.memory:
        from jisu.profile.memory import format_bytes

        m = result.memory
        kv = m.get("kv_cache") or {}
        kv_text = (f"; KV cache {format_bytes(kv.get('resident_bytes'))} written of "
                   f"{format_bytes(kv.get('allocated_bytes'))} allocated" if kv else "")
        console.print(f"Memory: peak RSS {format_bytes(m['peak_rss_bytes'])} (the whole process since it started), "
                      f"RSS now {format_bytes(m['rss_bytes'])}{kv_text}")


def write_plots(result: ProfileResult, directory: str | Path, calibration=None) -> list[Path]:
    from jisu.profile import plots

    d = Path(directory)
    requests = [(o.request_id, o.outputs[0].timeline) for o in result.outputs]
    paths = [
        plots.request_gantt(requests, d / "requests_gantt.png"),
        plots.step_phases(result.steps, d / "step_phases.png"),
        plots.operator_breakdown(result.operators, d / "operators.png"),
    ]
    points = [{"label": f"{name} ({v['percent_of_bound']:.0f}% of bound)", "intensity": v["arithmetic_intensity"],
               "flops_per_s": v["achieved_flops_per_s"]}
              for name, ph in result.phases.items() if (v := ph.get("roofline"))]
    verdicts = [v for ph in result.phases.values() if (v := ph.get("roofline"))]
    if verdicts:
        paths.append(plots.roofline_chart(points, verdicts[0]["bandwidth_bytes_per_s"],
                                          verdicts[0]["peak_flops_per_s"], d / "roofline.png"))
    return paths
