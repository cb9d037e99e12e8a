"""Builds the C++ kernels with torch.utils.cpp_extension on first use; the result is cached on disk
(torch's extension cache, under a name that carries a hash of the sources, headers and flags) so later
processes import it directly in well under a second."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
_HERE = Path(__file__).parent
# module.cpp holds the one PYBIND11_MODULE; every other source registers its own functions into it.
_SOURCES = ("module.cpp", "qlinear.cpp", "fused_decode.cpp", "prefill_attention.cpp", "rowwise.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}
# A build takes 1-2 minutes on a busy 2-core machine; a lock older than this was left by a killed process.
STALE_LOCK_S = 600


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


def _torch_extensions_dir(name: str) -> Path | None:
    """Where torch.utils.cpp_extension builds extension `name` (its _get_build_directory, restated), without importing
    that module: it imports setuptools, ~0.1-0.2 s of every start-up. A wrong guess (another torch) only misses the
    cached build, and the import below finds it."""
    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        try:
            from torch import _appdirs

            base = os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions"))
        except Exception:  # a torch without _appdirs: let cpp_extension say
            return None
        if torch.version.hip is not None:
            accelerator = f"rocm{torch.version.hip.replace('.', '')}"
        elif torch.version.cuda is not None:
            accelerator = f"cu{torch.version.cuda.replace('.', '')}"
        else:
            accelerator = "cpu"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(base, f"{python}_{accelerator}")
    return Path(root) / name


def _build():
    try:
        import torch  # the extension links against libtorch, which importing torch loads

        # NOTE: named instruction sets rather than -march=native, and the set is part of the extension's name:
        # a build cached on disk must never be loaded on a CPU that lacks its instructions (VMs move).
        # JISU_KERNELS=portable builds the fallback on any CPU (how tests check it).
        vector = {"avx2", "fma", "f16c"} <= _cpu_flags() and os.environ.get("JISU_KERNELS") != "portable"
        # -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers; compiled without it the "parallel"
        # loop silently runs on one thread (measured: 20.5 -> 15.4 ms over SmolLM2's layers at batch 1).
        flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if vector else [])
        sources = [str(_HERE / s) for s in _SOURCES]
        # NOTE: the name carries a hash of everything that shapes the binary (sources, headers, flags, torch's
        # version). A cached build is then imported directly: torch's load() takes a file lock and reruns ninja
        # in every new process, and a process killed inside that window (a timeout, Ctrl-C) left the lock behind,
        # so every later process waited on it forever.
        digest = hashlib.sha1(torch.__version__.encode() + " ".join(flags).encode())
        for p in sorted(_HERE.glob("*.h")) + [_HERE / s for s in _SOURCES]:
            digest.update(p.read_bytes())
        name = f"jisu_kernels_{'avx2' if vector else 'portable'}_{digest.hexdigest()[:12]}"
        guess = _torch_extensions_dir(name)
        if guess is not None and (guess / f"{name}.so").exists():
            return _import(name, guess / f"{name}.so")
        from torch.utils.cpp_extension import _get_build_directory, load

        build_dir = Path(_get_build_directory(name, verbose=False))
        built = build_dir / f"{name}.so"
        if built.exists():
            return _import(name, built)
        lock = build_dir / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            log.warning("jisu: removing a stale build lock left by a killed process (%s)", lock)
            lock.unlink(missing_ok=True)
        log.warning("jisu: building the C++ kernels (%s), once for this machine; this takes a minute or two", name)
        return load(name=name, sources=sources, extra_cflags=flags, extra_ldflags=["-fopenmp"],
                    build_directory=str(build_dir), verbose=False)
    except Exception as e:  # no compiler, no headers, a sandbox without /tmp...: fall back, loudly
        log.warning("jisu: C++ kernels unavailable (%s); using torch's CPU kernels", str(e).splitlines()[0])
        return None


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
