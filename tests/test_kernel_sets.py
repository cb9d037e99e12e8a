"""The C++ kernels' instruction sets (jisu/kernels/build.py's KERNEL_SETS): the set is chosen from the CPU's flags,
every set this CPU runs passes the kernel, fused-decode, prefill-attention and row-wise tests, the vector sets give
the same bits, and a set this CPU cannot run still compiles. Other sets run in child processes: one process can
hold only one build of the kernels' Python types."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jisu.kernels.build import (KERNEL_SETS, _cpu_flags, compile_check, cpu_linear_kernels, kernel_set,
                                supported_kernel_sets)

ROOT = Path(__file__).resolve().parents[1]
HERE_FLAGS = _cpu_flags()
HERE_SETS = supported_kernel_sets(HERE_FLAGS)
ZEN3 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
ZEN4 = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"}
KERNEL_TESTS = ["tests/test_qlinear_kernels.py", "tests/test_fused_decode.py", "tests/test_prefill_attention.py",
                "tests/test_rowwise_kernels.py"]
# The kernel sources with code of their own per set (see the compile test below).
SET_SPECIFIC_SOURCES = ("fused_decode.cpp", "module.cpp", "qlinear.cpp", "qlinear_amx.cpp")
needs_toolchain = pytest.mark.skipif(cpu_linear_kernels() is None, reason="no C++ toolchain: nothing to build")


def test_the_best_set_the_cpu_runs_is_chosen():
    assert kernel_set(ZEN4) == "avx512"
    assert kernel_set(ZEN3) == "avx2"
    assert kernel_set(ZEN4 - {"avx512_vnni"}) == "avx2"  # Skylake-X: AVX-512 without VNNI
    assert kernel_set({"sse4_2", "avx"}) == "portable"
    assert kernel_set(set()) == "portable"
    assert supported_kernel_sets(ZEN4) == ["avx512", "avx2", "portable"]


def test_a_lower_set_can_be_asked_for_and_one_the_cpu_lacks_is_refused(caplog):
    assert kernel_set(ZEN4, "avx2") == "avx2"
    assert kernel_set(ZEN4, "portable") == "portable"
    with caplog.at_level(logging.WARNING, logger="jisu.kernels.build"):
        assert kernel_set(ZEN3, "avx512") == "avx2"
    assert "avx512_vnni" in caplog.text and "avx512bw" in caplog.text and "using avx2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jisu.kernels.build"):
        assert kernel_set(ZEN3, "sse9") == "avx2"
    assert "'sse9' is not a kernel set" in caplog.text and "avx512, avx2, portable" in caplog.text


@needs_toolchain
def test_the_build_in_use_is_the_chosen_set_and_named_by_it():
    ext = cpu_linear_kernels()
    chosen = kernel_set(HERE_FLAGS, os.environ.get("JISU_KERNELS"))
    # instruction_set comes from the compiler's macros, the name from build.py: both must agree.
    assert ext.instruction_set == chosen
    assert ext.__name__.startswith(f"jisu_kernels_{chosen}_")


def _run_with_set(name: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, JISU_KERNELS=name, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@needs_toolchain
@pytest.mark.parametrize("name", list(KERNEL_SETS))
def test_every_set_this_cpu_runs_passes_the_kernel_tests(name):
    if name not in HERE_SETS:
        pytest.skip(f"this CPU lacks {sorted(KERNEL_SETS[name][0] - HERE_FLAGS)} (the compile test covers {name})")
    if name == cpu_linear_kernels().instruction_set:
        pytest.skip(f"{name} is this process's build: the rest of the suite runs these tests on it")
    which = _run_with_set(name, ["-c", "from jisu.kernels.build import cpu_linear_kernels as k; "
                                       "print(k().instruction_set)"])
    assert which.stdout.strip() == name, which.stderr[-2000:]
    proc = _run_with_set(name, ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *KERNEL_TESTS])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # Only the rounded-activation tests (a vector-set path) may skip, and only on the portable set; and the AMX
    # tests on every set but avx512 on a CPU with AMX (this process's build runs them there).
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    allowed = ["no AMX here"] + (["portable kernels: no act16"] if name == "portable" else [])
    assert all(any(reason in line for reason in allowed) for line in skips), skips
    assert "passed" in proc.stdout.strip().splitlines()[-1]


# Int4 and int8 products through the int16-activation kernels (int4 also through the int8-activation ones), for row
# counts that take each path (one row, the quads' 2-4 rows, tiles, AMX from 24 rows where the CPU has it, the
# GEMM): their bytes, hashed.
_BITS_SCRIPT = """
import hashlib, torch
from jisu.kernels.build import cpu_linear_kernels
ext = cpu_linear_kernels()
g = torch.Generator().manual_seed(0)
h = hashlib.sha256()
for bits in (4, 8):
    N, K, group = 96, 256, 32
    scales = (torch.rand(N, K // group, generator=g) * 0.02 + 1e-3).half()
    if bits == 8:
        w = ext.QWeight(8, torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g), scales, None, group, None)
    else:
        q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
        zeros = (torch.rand(N, K // group, generator=g) * 0.1).half()
        w = ext.QWeight(4, q, scales, zeros, group, None)
    for act_bits in ((16, 8) if bits == 4 else (16,)):
        w.act_bits = act_bits
        for m in (1, 3, 4, 17, 45, 200):
            x = torch.randn(m, K, generator=g)
            h.update(ext.qlinear(x, w).numpy().tobytes())
print(ext.instruction_set, h.hexdigest())
"""


# One fused decoder step (a 300-token prompt's rows beside a decode row over 1,000 slots, so attention takes its
# prompt-row and decode-row paths over several chunks) for each cache dtype: the output's bytes, hashed. The
# avx512 set's V sums and softmax run 512 bits wide and must keep the avx2 set's bits.
_ATTENTION_BITS_SCRIPT = """
import hashlib, torch
from jisu.kernels.build import cpu_linear_kernels
ext = cpu_linear_kernels()
g = torch.Generator().manual_seed(1)
H, KVH, hd, hidden, inter, group = 6, 2, 64, 128, 256, 32
def qw(n, k):
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, k // group, generator=g) * 0.05 + 1e-2).half()
    zeros = (torch.rand(n, k // group, generator=g) * 0.1).half()
    return ext.QWeight(4, q, scales, zeros, group, None)
ones = torch.ones(hidden)
dec = ext.FusedDecoder([ones], [qw((H + 2 * KVH) * hd, hidden)], [qw(hidden, H * hd)], [ones],
                       [qw(2 * inter, hidden)], [qw(hidden, inter)], 1e-5, H, KVH, hd, inter, hd ** -0.5)
# One step: a 300-token prompt (slots 0..299, causal) beside a decode row over 1,000 earlier slots (400..1399).
prompt, past = 300, 1000
D, ctx = prompt + 1, past + 1
gather = torch.zeros(D, ctx, dtype=torch.long)
mask = torch.zeros(D, ctx, dtype=torch.bool)
for r in range(prompt):
    gather[r, : r + 1] = torch.arange(r + 1)
    mask[r, : r + 1] = True
gather[prompt] = torch.arange(400, 400 + ctx)
mask[prompt] = True
slots = torch.cat([torch.arange(prompt), torch.tensor([400 + past])])
angles = torch.rand(D, hd // 2, generator=g) * 6.28
rot = torch.stack([angles.cos(), angles.sin()], -1).contiguous()
x = torch.randn(D, hidden, generator=g)
h = hashlib.sha256()
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    k = (torch.randn(2048, KVH, hd, generator=g) * 2).to(dtype)
    v = torch.randn(2048, KVH, hd, generator=g).to(dtype)
    out = dec.forward(x, [rot], [gather], [mask], slots, [k], [v])
    h.update(out.numpy().tobytes())
print(ext.instruction_set, h.hexdigest())
"""


@needs_toolchain
@pytest.mark.parametrize("script", [_BITS_SCRIPT, _ATTENTION_BITS_SCRIPT], ids=["products", "fused-step"])
def test_the_vector_sets_give_the_same_bits(script):
    vector_sets = [s for s in HERE_SETS if s != "portable"]
    if len(vector_sets) < 2:
        pytest.skip(f"this CPU runs one vector set ({vector_sets}): nothing to compare")
    digests = {}
    for name in vector_sets:
        proc = _run_with_set(name, ["-c", script])
        assert proc.returncode == 0, proc.stderr[-3000:]
        got, digest = proc.stdout.split()
        assert got == name
        digests[name] = digest
    assert len(set(digests.values())) == 1, digests


@needs_toolchain
@pytest.mark.parametrize("name", [s for s in KERNEL_SETS if s != "portable"])
def test_a_set_this_cpu_cannot_run_still_compiles(name):
    if name in HERE_SETS:
        pytest.skip(f"this CPU runs {name}: the tests above build and run it")
    # Only the sources with code of their own per set (an intrinsic the flags lack fails only where it is called):
    # ~25 s a source, most of it torch's headers, and the others would add ~40 s to every run of the suite for code
    # no set changes. The test below keeps the list honest.
    compile_check(name, SET_SPECIFIC_SOURCES)


def test_the_compile_check_reports_a_source_that_fails(monkeypatch):
    # A flag no compiler knows makes every source fail at once: the error must say which set and show the compiler.
    monkeypatch.setitem(KERNEL_SETS, "broken", (frozenset(), ("-mno-such-instruction-set",)))
    try:
        compile_check("broken")
    except FileNotFoundError:
        pytest.skip("no C++ compiler")
    except RuntimeError as e:
        assert "the broken kernel set does not compile" in str(e) and "no-such-instruction-set" in str(e)
    else:
        pytest.fail("a source compiled with an unknown flag")


def test_the_compile_check_covers_every_source_with_avx512_code():
    """A source has code of its own per set when it tests an AVX-512 macro or calls a simd.h helper that does:
    each must be in SET_SPECIFIC_SOURCES, or the compile test would miss it."""
    import re

    kernels = ROOT / "jisu" / "kernels"
    simd = (kernels / "simd.h").read_text()
    # simd.h's functions, each with its body up to the next one: those whose body tests __AVX512...
    defs = list(re.finditer(r"^inline [^(]*?(\w+)\(", simd, flags=re.M))
    dual = {m.group(1) for i, m in enumerate(defs)
            if "__AVX512" in simd[m.end():defs[i + 1].start() if i + 1 < len(defs) else len(simd)]}
    assert {"madd16_pair", "dot_u8s8_pair"} <= dual
    for source in sorted(kernels.glob("*.cpp")) + sorted(p for p in kernels.glob("*.h") if p.name != "simd.h"):
        text = source.read_text()
        if "__AVX512" in text or any(re.search(rf"\b{f}\(", text) for f in dual):
            assert source.name in SET_SPECIFIC_SOURCES, f"{source.name} has AVX-512 code: add it to the list"
