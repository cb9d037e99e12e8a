"""The portable C++ kernels (no AVX2: what a CPU without AVX2/FMA/F16C builds) pass the same kernel, fused-decode,
prefill-attention and row-wise tests as the AVX2 ones. Run in a child process: one process can hold only one build
of the kernels' Python types."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jisu.kernels.build import cpu_linear_kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(cpu_linear_kernels() is None, reason="no C++ toolchain: nothing to build")
def test_portable_build_passes_the_kernel_tests():
    env = dict(os.environ, JISU_KERNELS="portable", PYTHONPATH=str(ROOT))
    which = subprocess.run(
        [sys.executable, "-c", "from jisu.kernels.build import cpu_linear_kernels as k; print(k().__name__)"],
        check=False, env=env, capture_output=True, text=True, timeout=900,
    )
    assert which.stdout.strip().startswith("jisu_kernels_portable_"), which.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_qlinear_kernels.py",
         "tests/test_fused_decode.py", "tests/test_prefill_attention.py", "tests/test_rowwise_kernels.py"],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # Only the int16-activation tests (an AVX2-only path) may skip: everything else ran on the portable build.
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and (" 6 skipped" in summary or "skipped" not in summary), summary
