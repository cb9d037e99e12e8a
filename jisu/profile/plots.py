"""PNG charts of a profiled run (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from jisu.profile.timeline import PHASES, StepRecord
from jisu.request import RequestTimes

PHASE_COLOURS = {"schedule": "#8da0cb", "prepare": "#66c2a5", "forward": "#fc8d62", "sample": "#e78ac3",
                 "detokenize": "#a6d854", "draft": "#ffd92f"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def request_gantt(requests: list[tuple[str, RequestTimes]], path: Path) -> Path:
    plt = _pyplot()
    origin = min(t.arrival for _, t in requests)
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(requests) + 1.5))
    for row, (rid, t) in enumerate(requests):
        if t.first_scheduled is not None:
            ax.barh(row, t.first_scheduled - t.arrival, left=t.arrival - origin, color="#cccccc", label="queued" if row == 0 else None)
        for i, (kind, a, b, _) in enumerate(e for e in t.events if e[0] == "prefill"):
            ax.barh(row, b - a, left=a - origin, color="#fc8d62", label="prefill" if row == 0 and i == 0 else None)
        if t.first_token is not None and t.last_token is not None:
            ax.barh(row, t.last_token - t.first_token, left=t.first_token - origin, color="#66c2a5",
                    label="decode" if row == 0 else None)
        for kind, a, _, _ in t.events:
            if kind == "preempted":
                ax.plot(a - origin, row, "kx")
    ax.set_yticks(range(len(requests)), [rid for rid, _ in requests])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first arrival")
    ax.set_title("Requests: queued, prefill chunks, decode (x = preempted)")
    ax.legend(loc="lower right")
    return _save(fig, path)


def step_phases(steps: list[StepRecord], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    x = [s.index - steps[0].index for s in steps]
    bottom = [0.0] * len(steps)
    for phase in PHASES:
        ms = [getattr(s, phase) * 1e3 for s in steps]
        ax.bar(x, ms, bottom=bottom, width=1.0, color=PHASE_COLOURS.get(phase, "#b3b3b3"), label=phase)
        bottom = [b + m for b, m in zip(bottom, ms)]
    ax.set_xlabel("engine step")
    ax.set_ylabel("ms")
    ax.set_title("Per-step time by phase")
    ax.legend(loc="upper right")
    return _save(fig, path)


def operator_breakdown(seconds: dict[str, float], path: Path) -> Path:
    plt = _pyplot()
    items = sorted(((k, v) for k, v in seconds.items() if v > 0), key=lambda kv: kv[1])
    total = sum(v for _, v in items) or 1.0
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(items) + 1.5))
    ax.barh([k for k, _ in items], [v * 1e3 for _, v in items], color="#8da0cb")
    for i, (_, v) in enumerate(items):
        ax.text(v * 1e3, i, f" {100 * v / total:.1f}%", va="center")
    ax.set_xlabel("ms (whole run)")
    ax.set_title("Time by operator class")
    return _save(fig, path)


def roofline_chart(points: list[dict], bandwidth: float, peak_flops: float, path: Path) -> Path:
    """points: {"label", "intensity" (FLOP/byte), "flops_per_s"}; bandwidth in bytes/s, peak in FLOP/s."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    lo = min([p["intensity"] for p in points] + [0.1]) / 4
    hi = max([p["intensity"] for p in points] + [peak_flops / bandwidth]) * 8
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peak_flops, bandwidth * x) for x in xs], "k-", label="this machine's roofline")
    for p in points:
        ax.plot(p["intensity"], p["flops_per_s"], "o", markersize=8, label=p["label"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(f"Roofline: {bandwidth / 1e9:.1f} GB/s, {peak_flops / 1e9:.0f} GFLOP/s peak")
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
