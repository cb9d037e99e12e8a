"""Builds the C++ kernels with torch.utils.cpp_extension on first use; the result is cached on disk
(torch's extension cache, under a name that carries a hash of the sources, headers and flags) so later
processes import it directly in well under a second. The instruction set is chosen at run time from the CPU's flags
(KERNEL_SETS); JISU_KERNELS=<set> asks for a lower one (how tests run every set the machine supports)."""

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
_SOURCES = ("module.cpp", "qlinear.cpp", "qlinear_amx.cpp", "fused_decode.cpp", "prefill_attention.cpp", "rowwise.cpp")
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


# The instruction sets the kernels are built for, best first: the /proc/cpuinfo flags a CPU must show to run a
# build, and the compiler flags that make it. Named sets rather than -march=native, and the set is part of a cached
# build's name: a build on disk must never be loaded on a CPU that lacks its instructions (VMs move).
# - avx512: the AVX2 kernels with AVX-512 VNNI's vpdpwssd for their int16 products (the same integer sums as AVX2's
#   vpmaddwd + vpaddd, so the same bits), vpdpbusd for --activations int8, and AVX-512VL's 32 vector registers;
#   the int4 kernels on int16 inputs are written 512 bits wide (qlinear.cpp: ~5% faster on a Xeon with AMX), and
#   AMX is used where the CPU has it (qlinear_amx.cpp, probed at run time). The compiler's own loops stay 256 bits
#   wide (-mprefer-vector-width): Zen 4 splits 512-bit operations into two halves anyway.
# - avx2: AVX2 + FMA + F16C, the kernels' vector code.
# - portable: plain C++ for any CPU (each vector kernel's scalar twin).
KERNEL_SETS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "avx512": (frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
               ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                "-mprefer-vector-width=256")),
    "avx2": (frozenset({"avx2", "fma", "f16c"}), ("-mavx2", "-mfma", "-mf16c")),
    "portable": (frozenset(), ()),
}


def supported_kernel_sets(cpu_flags: set[str]) -> list[str]:
    """The kernel sets a CPU with these /proc/cpuinfo flags can run, best first (always ending in portable)."""
    return [name for name, (needs, _) in KERNEL_SETS.items() if needs <= cpu_flags]


def kernel_set(cpu_flags: set[str], requested: str | None = None) -> str:
    """The set to build: the best this CPU runs, or `requested` (JISU_KERNELS) when the CPU runs it. A set the CPU
    cannot run, or a name that is no set, is refused with a warning naming why, and the best set is used: a build
    with instructions the CPU lacks would stop the process with SIGILL."""
    runnable = supported_kernel_sets(cpu_flags)
    if not requested:
        return runnable[0]
    if requested not in KERNEL_SETS:
        log.warning("jisu: JISU_KERNELS=%r is not a kernel set (allowed: %s); using %s", requested,
                    ", ".join(KERNEL_SETS), runnable[0])
    elif requested not in runnable:
        missing = sorted(KERNEL_SETS[requested][0] - cpu_flags)
        log.warning("jisu: JISU_KERNELS=%s needs CPU flags this CPU lacks (%s); using %s", requested,
                    ", ".join(missing), runnable[0])
    else:
        return requested
    return runnable[0]


def build_flags(name: str) -> list[str]:
    """The compiler flags of kernel set `name`."""
    # -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers; compiled without it the "parallel" loop
    # silently runs on one thread (measured: 20.5 -> 15.4 ms over SmolLM2's layers at batch 1).
    return ["-O3", "-fopenmp", *KERNEL_SETS[name][1]]


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

        chosen = kernel_set(_cpu_flags(), os.environ.get("JISU_KERNELS"))
        flags = build_flags(chosen)
        sources = [str(_HERE / s) for s in _SOURCES]
        # NOTE: the name carries the instruction set and a hash of everything that shapes the binary (sources,
        # headers, flags, torch's version). A cached build is then imported directly: torch's load() takes a file
        # lock and reruns ninja in every new process, and a process killed inside that window (a timeout, Ctrl-C)
        # left the lock behind, so every later process waited on it forever.
        digest = hashlib.sha1(torch.__version__.encode() + " ".join(flags).encode())
        for p in sorted(_HERE.glob("*.h")) + [_HERE / s for s in _SOURCES]:
            digest.update(p.read_bytes())
        name = f"jisu_kernels_{chosen}_{digest.hexdigest()[:12]}"
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


def compile_check(name: str, sources: tuple[str, ...] = _SOURCES, timeout_s: float = 600) -> None:
    """Compile (not link or load) kernel `sources` (default: all) for instruction set `name`, whatever this CPU
    runs: how a machine without AVX-512 checks that the AVX-512 set still builds. Raises RuntimeError with the
    compiler's message when a source fails; FileNotFoundError where there is no C++ compiler."""
    import subprocess
    import sysconfig
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from torch.utils.cpp_extension import get_cxx_compiler, include_paths

    # -O0: an intrinsic whose instruction set the flags leave out fails at -O0 as well (it is always inlined), and
    # parsing torch's headers is then most of the ~25 s a source takes.
    cmd = [get_cxx_compiler(), "-std=c++20", "-O0", "-fPIC", "-fopenmp", *KERNEL_SETS[name][1],
           "-DTORCH_EXTENSION_NAME=jisu_compile_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *(f"-isystem{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]])]
    with tempfile.TemporaryDirectory() as out:
        def compile_one(source: str) -> str:
            proc = subprocess.run([*cmd, "-c", str(_HERE / source), "-o", str(Path(out) / f"{source}.o")],
                                  capture_output=True, text=True, timeout=timeout_s, check=False)
            return "" if proc.returncode == 0 else f"{source}:\n{proc.stderr[-4000:]}"

        with ThreadPoolExecutor(max(1, min(len(sources), os.cpu_count() or 1))) as pool:
            failures = [f for f in pool.map(compile_one, sources) if f]
    if failures:
        raise RuntimeError(f"the {name} kernel set does not compile:\n" + "\n".join(failures))


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
