"""Builds the C++ kernels with torch.utils.cpp_extension on first use; the result is cached on disk
(torch's extension cache, keyed by the source) so later processes load it in well under a second."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)
_HERE = Path(__file__).parent
# module.cpp holds the one PYBIND11_MODULE; every other source registers its own functions into it.
_SOURCES = ("module.cpp", "qlinear.cpp", "fused_decode.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}


def cpu_linear_kernels():
    """The compiled module, or None where no C++ toolchain is available (then torch's kernels are used)."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build():
    try:
        from torch.utils.cpp_extension import load

        # NOTE: named instruction sets rather than -march=native, and the set is part of the extension's name:
        # a build cached on disk must never be loaded on a CPU that lacks its instructions (VMs move).
        # JISU_KERNELS=portable builds the fallback on any CPU (how tests check it).
        vector = {"avx2", "fma", "f16c"} <= _cpu_flags() and os.environ.get("JISU_KERNELS") != "portable"
        # -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers; compiled without it the "parallel"
        # loop silently runs on one thread (measured: 20.5 -> 15.4 ms over SmolLM2's layers at batch 1).
        flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if vector else [])
        name = "jisu_kernels_avx2" if vector else "jisu_kernels_portable"
        sources = [str(_HERE / s) for s in _SOURCES]
        # torch's build cache hashes the sources it is given, not the headers they include: fold the headers'
        # hash into a flag so editing one rebuilds.
        headers = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(_HERE.glob("*.h")))).hexdigest()[:12]
        flags.append(f"-DJISU_HEADERS_SHA={headers}")
        return load(name=name, sources=sources, extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers, a sandbox without /tmp...: fall back, loudly
        log.warning("jisu: C++ kernels unavailable (%s); using torch's CPU kernels", str(e).splitlines()[0])
        return None
