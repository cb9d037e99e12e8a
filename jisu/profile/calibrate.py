"""Measure this machine's limits once (sustained memory read bandwidth, matmul rate per dtype, CPU clock) and
cache them, so roofline verdicts compare a run with what this hardware sustains rather than a data sheet.

The cache file is keyed by a fingerprint of what the figures depend on (CPU model, cores, torch version,
device, threads); a different machine or torch build finds no file and measures again.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from jisu.errors import InvalidRequestError, JisuError
from jisu.loader.resolve import cache_dir

FORMAT_VERSION = 1

# Full mode: a buffer far larger than any last-level cache, and matrices large enough to reach the GEMM
# plateau. Quick mode (tests) trades accuracy for well under a second.
@dataclass(frozen=True)
class Plan:
    buffer_bytes: int
    bandwidth_reps: int
    max_n: int
    """Largest square matmul tried."""
    target_s: float
    """Matmul sizes grow while the next one would take at most 2x this per product."""
    matmul_reps: int
    warmup_s: float


FULL = Plan(buffer_bytes=512 << 20, bandwidth_reps=11, max_n=2048, target_s=0.25, matmul_reps=5, warmup_s=0.5)
QUICK = Plan(buffer_bytes=64 << 20, bandwidth_reps=5, max_n=512, target_s=0.02, matmul_reps=3, warmup_s=0.1)
CUDA_FULL = Plan(buffer_bytes=2 << 30, bandwidth_reps=21, max_n=8192, target_s=0.05, matmul_reps=11, warmup_s=0.5)
CUDA_QUICK = Plan(buffer_bytes=256 << 20, bandwidth_reps=5, max_n=2048, target_s=0.01, matmul_reps=3, warmup_s=0.1)

MATMUL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Calibration:
    device: str
    device_name: str
    threads: int
    """torch's intra-op threads during the measurement (CPU figures depend on it)."""
    bandwidth_bytes_per_s: float
    """Median sustained read bandwidth (a reduction over a buffer larger than the caches)."""
    peak_flops_per_s: dict[str, float]
    """dtype -> median rate of a square matmul at the largest size measured."""
    matmul_n: dict[str, int]
    """dtype -> the matrix size that rate was measured at."""
    clock_hz: float | None
    clock_source: str
    cpu_model: str
    cpu_count: int
    torch_version: str
    fingerprint: str
    quick: bool
    measured_at: str
    cpu_signature: str = ""
    bandwidth_buffer_bytes: int = 0
    bandwidth_best_bytes_per_s: float = 0.0
    """The fastest rep: the spread from the median says how noisy the machine was."""
    path: str | None = field(default=None, compare=False)
    """Where it was cached (not stored in the file)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        d = dict(d)
        if d.pop("format_version", None) != FORMAT_VERSION:
            raise ValueError("calibration file format changed")
        return cls(**d)


# ----------------------------------------------------------------------------- machine identity


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


_SIGNATURE_KEYS = ("vendor_id", "cpu family", "model", "stepping", "flags", "features", "cpu part")


def cpu_signature() -> str:
    """Vendor, family/model/stepping and a hash of the feature flags: VMs report the same model name
    ("AMD EPYC") for CPU generations whose limits differ twofold (Zen 3 without AVX-512, Zen 4 with it)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in _SIGNATURE_KEYS and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break  # the first processor's block is enough
    except OSError:
        return platform.machine()
    flags = fields.pop("flags", fields.pop("features", ""))
    flag_hash = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:8]
    return " ".join(f"{k}={v}" for k, v in sorted(fields.items())) + f" flags={flag_hash}"


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_model()


def fingerprint(device: str = "cpu", threads: int | None = None) -> str:
    """A short hash of what the figures depend on."""
    parts = {
        "cpu": cpu_model(),
        "cpu_signature": cpu_signature(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": str(torch.device(device)),
        "device_name": device_name(device),
        "threads": threads if threads is not None else torch.get_num_threads(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(fp: str, directory: str | os.PathLike[str] | None = None) -> Path:
    return Path(directory or cache_dir()) / f"calibration-{fp}.json"


# ----------------------------------------------------------------------------- clock


def read_cpu_clock() -> tuple[float | None, str]:
    """(Hz, where it came from). Prefers the kernel's cpufreq maximum (cores under load run near it); then the
    `cpu MHz` of /proc/cpuinfo (in a VM: the clock the hypervisor reports, not necessarily the boost clock);
    then the frequency in the model name."""
    sysfs = Path("/sys/devices/system/cpu/cpu0/cpufreq")
    for name in ("cpuinfo_max_freq", "scaling_max_freq"):
        try:
            khz = int((sysfs / name).read_text().strip())
            if khz > 0:
                return khz * 1e3, f"{sysfs / name} (maximum)"
        except (OSError, ValueError):
            pass
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE)]
    if mhz and max(mhz) > 0:
        return max(mhz) * 1e6, "/proc/cpuinfo 'cpu MHz' (as the kernel reports it; in a VM, the host's nominal clock)"
    m = re.search(r"@\s*([\d.]+)\s*GHz", text)
    if m:
        return float(m.group(1)) * 1e9, "/proc/cpuinfo model name (nominal clock)"
    return None, "unknown (no cpufreq in /sys, no clock in /proc/cpuinfo)"


# ----------------------------------------------------------------------------- measurements


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Seconds one call of fn takes: device events on CUDA (host clocks would time the launch), else perf_counter."""
    if device.type == "cuda":

        def run(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return run

    def run_cpu(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run_cpu


def _warm_up(timer: Callable[[Callable[[], Any]], float], fn: Callable[[], Any], seconds: float) -> None:
    """Runs fn until `seconds` pass: on these VMs the first ~10 passes over memory run at half speed."""
    spent = 0.0
    while True:
        spent += timer(fn)
        if spent >= seconds:
            return


def measure_bandwidth(
    device: str = "cpu", buffer_bytes: int = FULL.buffer_bytes, reps: int = 11, warmup_s: float = 0.5
) -> tuple[float, float]:
    """(median, best) bytes/s of summing a float32 buffer: a reduction reads each byte once and writes nothing,
    and torch runs it vectorised on its intra-op threads."""
    dev = torch.device(device)
    buf = torch.ones(max(1, buffer_bytes // 4), dtype=torch.float32, device=dev)  # ones(): pages touched now
    timer = _timer(dev)
    _warm_up(timer, buf.sum, warmup_s)
    times = [timer(buf.sum) for _ in range(reps)]
    nbytes = buf.numel() * 4
    del buf
    return nbytes / statistics.median(times), nbytes / min(times)


def _product(n: int, dtype: torch.dtype, device: torch.device) -> Callable[[], torch.Tensor]:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return lambda: a @ b


def measure_matmul(
    dtype: str, device: str = "cpu", max_n: int = 2048, target_s: float = 0.25, reps: int = 5, warmup_s: float = 0.5
) -> tuple[float, int]:
    """(median FLOP/s, n) of an n x n x n matmul in `dtype`.

    n doubles from 256 while the next size would take at most 2 x target_s a product (8x the work) and n stays
    within max_n, so dtypes without fast kernels (half precision on most CPUs runs ~1 GFLOP/s) are measured at
    a size that finishes.
    """
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    timer = _timer(dev)
    n = 256
    while True:
        product = _product(n, dt, dev)
        timer(product)  # warm-up at this size
        t = timer(product)
        if 8 * t > 2 * target_s or n * 2 > max_n:
            break
        n *= 2
    _warm_up(timer, product, min(warmup_s, 4 * t))
    times = [timer(product) for _ in range(reps)]
    return 2 * n**3 / statistics.median(times), n


def measure(device: str = "cpu", quick: bool = False) -> Calibration:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device must be cpu or cuda, got {device!r}")
    cfg = (CUDA_QUICK if quick else CUDA_FULL) if dev.type == "cuda" else (QUICK if quick else FULL)
    threads = torch.get_num_threads()
    bw, bw_best = measure_bandwidth(device, cfg.buffer_bytes, cfg.bandwidth_reps, cfg.warmup_s)
    peaks, sizes = {}, {}
    for dtype in MATMUL_DTYPES:
        try:
            peaks[dtype], sizes[dtype] = measure_matmul(
                dtype, device, cfg.max_n, cfg.target_s, cfg.matmul_reps, cfg.warmup_s
            )
        except RuntimeError:  # a dtype with no matmul kernel on this device: leave it out
            continue
    hz, source = read_cpu_clock()
    return Calibration(
        device=str(dev),
        device_name=device_name(device),
        threads=threads,
        bandwidth_bytes_per_s=bw,
        peak_flops_per_s=peaks,
        matmul_n=sizes,
        clock_hz=hz,
        clock_source=source,
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count() or 1,
        torch_version=torch.__version__,
        fingerprint=fingerprint(device, threads),
        quick=quick,
        measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu_signature=cpu_signature(),
        bandwidth_buffer_bytes=cfg.buffer_bytes,
        bandwidth_best_bytes_per_s=bw_best,
    )


# ----------------------------------------------------------------------------- cache


def load_calibration(device: str = "cpu", directory: str | os.PathLike[str] | None = None) -> Calibration | None:
    """The cached calibration for this machine, or None when there is none (never measures)."""
    path = cache_path(fingerprint(device), directory)
    try:
        cal = Calibration.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):  # unreadable, stale format or hand-edited: measure again
        return None
    cal.path = str(path)
    return cal


def calibrate(
    device: str = "cpu",
    force: bool = False,
    quick: bool = False,
    directory: str | os.PathLike[str] | None = None,
) -> Calibration:
    """The cached figures for this machine, measuring (and caching) them first when there are none, when
    `force`, or when only quick figures are cached and full ones are asked for."""
    if not force:
        cached = load_calibration(device, directory)
        if cached is not None and (quick or not cached.quick):
            return cached
    cal = measure(device, quick)
    path = cache_path(cal.fingerprint, directory)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cal.to_dict(), indent=2))
        os.replace(tmp, path)  # readers never see half a file
        cal.path = str(path)
    except OSError as e:
        raise JisuError(f"measured, but cannot write the calibration cache {path}: {e.strerror or e}") from None
    return cal


# ----------------------------------------------------------------------------- output


def calibration_table(cal: Calibration):
    from rich.table import Table

    quick = " [quick]" if cal.quick else ""
    t = Table(title=f"calibration: {cal.device_name} ({cal.device}, {cal.threads} threads){quick}")
    t.add_column("quantity")
    t.add_column("measured", justify="right")
    t.add_row(
        "memory read bandwidth",
        f"{cal.bandwidth_bytes_per_s / 1e9:.1f} GB/s (best {cal.bandwidth_best_bytes_per_s / 1e9:.1f}, "
        f"{cal.bandwidth_buffer_bytes >> 20} MiB buffer)",
    )
    for dtype, rate in cal.peak_flops_per_s.items():
        n = cal.matmul_n.get(dtype)
        t.add_row(f"{dtype} matmul", f"{rate / 1e9:.1f} GFLOP/s (n={n})")
    clock = f"{cal.clock_hz / 1e9:.3f} GHz" if cal.clock_hz else "unknown"
    t.add_row("CPU clock", f"{clock} from {cal.clock_source}")
    t.add_row("cached in", str(cal.path or "-"))
    return t


def cmd_calibrate(args: Any) -> int:
    """`jisu calibrate [--force] [--quick] [--device D] [--json]`."""
    from rich.console import Console

    device = getattr(args, "device", "cpu") or "cpu"
    cal = calibrate(device=device, force=bool(getattr(args, "force", False)), quick=bool(getattr(args, "quick", False)))
    if getattr(args, "json", False):
        print(json.dumps(cal.to_dict() | {"path": cal.path}, indent=2))
    else:
        Console().print(calibration_table(cal))
    return 0
