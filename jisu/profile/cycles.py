"""Cycles per token and FLOPs per cycle: read from the CPU's hardware counters through perf_event_open where
the kernel allows it, otherwise estimated as CPU time x clock and labelled so.

The counters are opened per thread of this process (torch's intra-op pool included, since those threads
exist before the measurement starts), user space only, which perf_event_paranoid <= 2 permits for one's own
threads. Virtual machines often expose no PMU at all; then the kernel offers only software events.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jisu.errors import InvalidRequestError

# <linux/perf_event.h>
PERF_TYPE_HARDWARE = 0
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_HW_CPU_CYCLES = 0
PERF_COUNT_HW_INSTRUCTIONS = 1
PERF_COUNT_SW_TASK_CLOCK = 1
_FLAG_DISABLED = 1 << 0
_FLAG_INHERIT = 1 << 1
_FLAG_EXCLUDE_KERNEL = 1 << 5
_FLAG_EXCLUDE_HV = 1 << 6
_IOC_ENABLE, _IOC_DISABLE, _IOC_RESET = 0x2400, 0x2401, 0x2403
_SYSCALL = {"x86_64": 298, "aarch64": 241, "i686": 336, "ppc64le": 319, "s390x": 331, "riscv64": 241}
_ATTR_SIZE = 72  # PERF_ATTR_SIZE_VER1: up to config2, all any kernel since 2.6.39 needs for counting


def _attr(type_: int, config: int) -> bytes:
    """struct perf_event_attr for a counting (not sampling) event, disabled until enabled."""
    # inherit: threads a counted thread starts later (a lazily created thread pool) are counted too.
    flags = _FLAG_DISABLED | _FLAG_INHERIT | _FLAG_EXCLUDE_KERNEL | _FLAG_EXCLUDE_HV
    # type, size, config, sample_period, sample_type, read_format, flags, wakeup_events, bp_type, config1, config2
    return struct.pack("<IIQQQQQIIQQ", type_, _ATTR_SIZE, config, 0, 0, 0, flags, 0, 0, 0, 0)


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _open_event(type_: int, config: int, tid: int) -> int:
    """A counter fd for one thread, or raises OSError with the kernel's errno."""
    nr = _SYSCALL.get(platform.machine())
    if nr is None or not Path("/proc/sys/kernel/perf_event_paranoid").exists():
        raise OSError(errno.ENOSYS, "perf_event_open is unavailable on this OS/architecture")
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(_attr(type_, config), _ATTR_SIZE)
    fd = libc.syscall(ctypes.c_long(nr), buf, ctypes.c_int(tid), ctypes.c_int(-1), ctypes.c_int(-1), ctypes.c_ulong(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def _paranoid() -> str:
    try:
        return Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip()
    except OSError:
        return "unknown"


def _why(err: OSError) -> str:
    """The plain reason a hardware counter could not be opened."""
    if err.errno in (errno.EACCES, errno.EPERM):
        return (f"perf_event_paranoid is {_paranoid()}, which forbids these counters to this user "
                "(set it to 2 or lower, or run with CAP_PERFMON)")
    if err.errno in (errno.ENOENT, errno.EOPNOTSUPP, errno.ENODEV):
        sources = Path("/sys/bus/event_source/devices")
        pmu = (sources / "cpu").exists() or (sources / "armv8_pmuv3_0").exists()
        where = "" if pmu else f" (no CPU PMU under {sources}: a virtual machine without PMU passthrough?)"
        return f"the kernel offers no hardware cycle counter here{where}"
    if err.errno == errno.ENOSYS:
        return "perf_event_open is unavailable on this OS/architecture"
    return f"perf_event_open failed: {err.strerror or err}"


@dataclass(frozen=True)
class CounterStatus:
    available: bool
    reason: str
    """Why not, in words (empty when available)."""


def counter_status() -> CounterStatus:
    """Whether hardware cycle counters can be read for this process."""
    try:
        fd = _open_event(PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES, 0)
    except OSError as e:
        return CounterStatus(False, _why(e))
    os.close(fd)
    return CounterStatus(True, "")


class ThreadCounters:
    """One event counted over every thread of this process that exists when it is opened."""

    def __init__(self, type_: int, config: int):
        self.fds: list[int] = []
        try:
            for tid in sorted(int(t) for t in os.listdir("/proc/self/task")):
                try:
                    self.fds.append(_open_event(type_, config, tid))
                except OSError as e:
                    if e.errno != errno.ESRCH:  # a thread that ended meanwhile is fine to skip
                        raise
        except BaseException:
            self.close()
            raise

    def _ioctl(self, request: int) -> None:
        libc = _libc()
        for fd in self.fds:
            libc.ioctl(fd, request, 0)

    def start(self) -> None:
        self._ioctl(_IOC_RESET)
        self._ioctl(_IOC_ENABLE)

    def stop(self) -> int:
        self._ioctl(_IOC_DISABLE)
        return sum(struct.unpack("<Q", os.read(fd, 8))[0] for fd in self.fds)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


@dataclass(frozen=True)
class CycleCount:
    cycles: float
    """Core cycles spent by this process's threads (summed over cores)."""
    instructions: int | None
    source: str
    """'perf_event' (hardware counters) or 'estimated' (CPU time x clock)."""
    wall_s: float
    cpu_s: float
    clock_hz: float | None
    note: str

    @property
    def estimated(self) -> bool:
        return self.source != "perf_event"

    def per_token(self, tokens: int) -> float:
        if tokens < 1:
            raise InvalidRequestError(f"tokens must be >= 1, got {tokens}")
        return self.cycles / tokens

    def flops_per_cycle(self, flops: float) -> float:
        return flops / self.cycles if self.cycles else float("nan")

    @property
    def instructions_per_cycle(self) -> float | None:
        return self.instructions / self.cycles if self.instructions is not None and self.cycles else None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__) | {"estimated": self.estimated}


def count_cycles(
    fn: Callable[[], Any], clock_hz: float | None = None, use_counters: bool = True
) -> tuple[Any, CycleCount]:
    """Runs fn() and returns (its result, the cycles it took).

    clock_hz: for the estimate when counters are unavailable (default: calibrate.read_cpu_clock()).
    """
    status = counter_status() if use_counters else CounterStatus(False, "hardware counters not asked for")
    counters: list[ThreadCounters] = []
    if status.available:
        try:
            counters = [ThreadCounters(PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES),
                        ThreadCounters(PERF_TYPE_HARDWARE, PERF_COUNT_HW_INSTRUCTIONS)]
        except OSError as e:
            for c in counters:
                c.close()
            counters, status = [], CounterStatus(False, _why(e))
    for c in counters:
        c.start()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        result = fn()
    finally:
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        values = [c.stop() for c in counters]
        for c in counters:
            c.close()
    if counters:
        note = "hardware counters, user space"
        return result, CycleCount(values[0], values[1], "perf_event", wall, cpu, clock_hz, note)
    if clock_hz is None:
        from jisu.profile.calibrate import read_cpu_clock

        clock_hz, source = read_cpu_clock()
    else:
        source = "given clock"
    if not clock_hz:
        raise InvalidRequestError(f"cannot estimate cycles: {status.reason}, and the CPU clock is unknown")
    note = f"estimated: process CPU time x {clock_hz / 1e9:.3f} GHz ({source}); counters unavailable: {status.reason}"
    return result, CycleCount(cpu * clock_hz, None, "estimated", wall, cpu, clock_hz, note)
