"""Where a process's memory is: its peak and current resident set, and of the KV cache how much is allocated and how
much has been touched (its CPU pages are resident only once written, jisu/runner/kv_cache.py).

Figures come from the operating system: peak RSS is getrusage's ru_maxrss (the whole process since it started:
Python, torch, every model it loaded, whatever else ran in it); current RSS and the resident part of a tensor are
read from /proc (Linux; None elsewhere).
"""

from __future__ import annotations

import os
import sys
from typing import Any


def peak_rss_bytes() -> int | None:
    """The process's peak resident set since it started (ru_maxrss: KiB on Linux, bytes on macOS); None on Windows."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int | None:
    """The process's resident set now (Linux /proc/self/statm), None where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _mappings() -> list[tuple[int, int, int]] | None:
    """(start, end, resident bytes) of every mapping of this process (Linux /proc/self/smaps), None elsewhere."""
    out: list[tuple[int, int, int]] = []
    try:
        with open("/proc/self/smaps") as f:
            start = end = None
            for line in f:
                head = line.split(maxsplit=1)[0]
                if not head.endswith(":") and "-" in head:
                    lo, hi = head.split("-")
                    start, end = int(lo, 16), int(hi, 16)
                elif head == "Rss:" and start is not None:
                    out.append((start, end, int(line.split()[1]) * 1024))
    except (OSError, ValueError):
        return None
    return out


def resident_bytes(tensors) -> int | None:
    """Resident bytes of the mappings that hold these CPU tensors' data, counted once each. Exact for tensors that
    own a mapping (the KV cache's); None where /proc/self/smaps is unavailable."""
    maps = _mappings()
    if maps is None:
        return None
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        ptr = t.data_ptr()
        for i, (lo, hi, rss) in enumerate(maps):
            if lo <= ptr < hi:
                if i not in seen:
                    seen.add(i)
                    total += rss
                break
    return total


def memory_report(engine=None) -> dict[str, Any]:
    """Peak and current RSS of this process, and, given an LLMEngine (or a ModelRun), its KV cache: bytes allocated
    and bytes resident (touched). Sizes in bytes; None where the platform does not say."""
    rss, peak = rss_bytes(), peak_rss_bytes()
    if rss is not None and peak is not None:
        peak = max(peak, rss)  # the kernel updates ru_maxrss lazily: RSS read now may be ahead of it
    report: dict[str, Any] = {
        "peak_rss_bytes": peak,
        "rss_bytes": rss,
        "meaning": "peak_rss_bytes: the whole process since it started (ru_maxrss): Python, torch, the model, the "
                   "KV cache pages written, and anything else this process ran",
    }
    kv = getattr(engine, "kv_cache", None)
    if kv is not None:
        tensors = [t for pair in kv.layers for t in pair]
        on_cpu = all(t.device.type == "cpu" for t in tensors)
        report["kv_cache"] = {
            "allocated_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "resident_bytes": resident_bytes(tensors) if on_cpu else None,
        }
    return report


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 1024:,.0f} KiB"
