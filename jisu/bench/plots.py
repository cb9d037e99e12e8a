"""Charts of benchmark results (matplotlib, Agg backend: files only, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from jisu.errors import InvalidRequestError, JisuError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise JisuError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _out_dir(directory: str | Path) -> Path:
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidRequestError(f"--plot {d}: cannot create the directory: {e.strerror or e}") from None
    return d


def load_results(path: str | Path, flag: str = "--plot-with") -> dict:
    """A `bench serve --json` file, checked enough to plot."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidRequestError(f"{flag} {path}: file not found") from None
    except (OSError, ValueError) as e:
        raise InvalidRequestError(f"{flag} {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or data.get("command") != "serve" or not isinstance(data.get("levels"), list):
        raise InvalidRequestError(f"{flag} {path}: not the JSON of `jisu bench serve --json`")
    return data


def serve_plots(series: list[dict], directory: str | Path, percentiles=(99.0,)) -> list[Path]:
    """Throughput vs concurrency and latency percentiles vs concurrency, one line per result (server)."""
    plt = _pyplot()
    d = _out_dir(directory)
    high = f"p{max(percentiles):g}"

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in series:
        x = [lv["max_concurrency"] for lv in s["levels"]]
        axes[0].plot(x, [lv["output_throughput"] for lv in s["levels"]], marker="o", label=s["label"])
        axes[1].plot(x, [lv["request_throughput"] for lv in s["levels"]], marker="o", label=s["label"])
    for ax, title in zip(axes, ("output tokens/s", "requests/s")):
        _concurrency_axis(ax)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("throughput vs concurrency")
    fig.tight_layout()
    throughput = d / "throughput_vs_concurrency.png"
    fig.savefig(throughput, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, metric in zip(axes.flat, ("ttft", "tpot", "itl", "e2el")):
        for i, s in enumerate(series):
            color = f"C{i}"
            x = [lv["max_concurrency"] for lv in s["levels"]]
            for stat, style in (("median", "-"), (high, "--")):
                y = [lv.get(f"{stat}_{metric}_ms") for lv in s["levels"]]
                pts = [(a, b) for a, b in zip(x, y) if b is not None]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=color, label=f"{s['label']} {stat}")
        _concurrency_axis(ax)
        ax.set_title(f"{metric.upper()} (ms)")
        ax.legend(fontsize=8)
    fig.suptitle(f"latency vs concurrency (solid: median, dashed: {high})")
    fig.tight_layout()
    latency = d / "latency_vs_concurrency.png"
    fig.savefig(latency, dpi=120)
    plt.close(fig)
    return [throughput, latency]


def _concurrency_axis(ax) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.grid(True, alpha=0.3)


def compare_plot(result: dict, directory: str | Path) -> Path:
    """Grouped bars of a `bench compare` run: one group per figure, one bar per engine, labelled with its
    % of the roofline bound."""
    plt = _pyplot()
    d = _out_dir(directory)
    figures = [("prefill_tokens_per_s", "prefill", f"prefill {result['input_len']}"),
               ("decode_tokens_per_s", "decode", "decode batch 1")]
    figures += [(f"concurrent_{c}_output_tokens_per_s", f"concurrent_{c}", f"{c} concurrent")
                for c in result["concurrency"] if c > 1]
    engines = list(result["engines"])
    fig, axes = plt.subplots(1, len(figures), figsize=(4 * len(figures), 4), squeeze=False)
    for ax, (key, roof_key, title) in zip(axes[0], figures):
        values = [result["engines"][e]["medians"].get(key, 0.0) for e in engines]
        bars = ax.bar(engines, values, color=[f"C{i}" for i in range(len(engines))])
        for bar, e in zip(bars, engines):
            pct = ((result["engines"][e].get("roofline") or {}).get(roof_key) or {}).get("percent")
            if pct is not None:
                ax.annotate(f"{pct:.0f}% of bound", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{title} (tokens/s)")
        ax.grid(True, axis="y", alpha=0.3)
    skipped = ", ".join(result.get("skipped", {}))
    fig.suptitle(f"bench compare: medians of {result['runs']} runs" + (f" (skipped: {skipped})" if skipped else ""))
    fig.tight_layout()
    path = d / "compare.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
