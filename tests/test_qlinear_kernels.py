"""The C++ QWeight kernels (jisu/kernels/qlinear.cpp) against torch, for every format.

Reference: the weight is dequantized here in plain torch, straight from the layout documented in qlinear.h, and
the product is taken in float64. Tolerance: the classic bound for a float32 dot product of K terms summed in any
order, |y - y_exact| <= (K + 2) * u * (|x| @ |W|^T + |b|) with u = 2**-24 (each of the K - 1 additions and the
bias add rounds once; products are fused or exact). The kernels' fixed 32-way split stays far below it; a wrong
nibble, scale or zero is orders of magnitude above it.

int8 / int4 weights at up to 192 rows round x to int16 per 32-input block first (act_bits 16, the default), which
moves each input by at most d_b / 2 (d_b = max|x_b| / 32767) plus a few float32 roundings: that adds
|W| @ (d / 2 + 4u|x|) to the bound, still ~1000x below a one-step error in a weight.
"""

from __future__ import annotations

import pytest
import torch

from jisu.kernels.build import cpu_linear_kernels

ext = cpu_linear_kernels()
pytestmark = pytest.mark.skipif(ext is None, reason="C++ kernels unavailable (no toolchain)")
# The int16-activation path exists only in the vector builds (avx2, avx512); the portable one
# (tests/test_kernel_sets.py runs this file on it) keeps x in float32 for every format.
act16_only = pytest.mark.skipif(ext is None or ext.instruction_set == "portable", reason="portable kernels: no act16")

U = 2.0**-24


def make_weight(bits: int, N: int, K: int, group: int, bias: bool, seed: int = 0):
    """Random storage for one format, its QWeight, and its float32 matrix dequantized in torch from the docs."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(N, generator=g) if bias else None
    if bits == 32:
        data = torch.randn(N, K, generator=g)
        return ext.QWeight(32, data, bias=b), data.clone(), b
    scales = (torch.rand(N, K // group, generator=g) * 0.02 + 1e-3).half()
    sc = scales.float().repeat_interleave(group, dim=1)
    if bits == 8:
        q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
        return ext.QWeight(8, q, scales, None, group, b), sc * q.float(), b
    data = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
    zeros = ((torch.rand(N, K // group, generator=g) - 0.5) * 0.2).half()
    # Byte j of each 32-input block: input j in the low nibble, input j + 16 in the high nibble.
    blocks = data.view(N, K // 32, 16)
    q = torch.cat([blocks & 0xF, blocks >> 4], dim=2).reshape(N, K).float()
    w = sc * q + zeros.float().repeat_interleave(group, dim=1)
    return ext.QWeight(4, data, scales, zeros, group, b), w, b


def act16_error(x: torch.Tensor, levels: int = 32767) -> torch.Tensor:
    """Per input, how far int16 rounding (int8: levels 127) with one scale per 32-input block may move it."""
    xd = x.double()
    d = xd.abs().view(x.shape[0], -1, 32).amax(dim=2) / levels
    return d.repeat_interleave(32, dim=1) / 2 + 4 * U * xd.abs()


def uses_act16(qw, M: int) -> bool:
    return qw.bits != 32 and qw.act_bits == 16 and M <= 192 and qw.K % 32 == 0 and qw.group % 32 == 0


def check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act16: bool = False):
    exact = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    if b is not None:
        exact += b.double()
        mag += b.double().abs()
    K = x.shape[1]
    err = (y.double() - exact).abs()
    bound = (K + 2) * U * mag + 1e-30
    if act16:
        bound += act16_error(x) @ w.double().abs().T
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3g}x the float32 rounding bound"


# (bits, K, group): every documented format over odd-but-valid shapes, plus int8 / float32 corner cases the
# constructor accepts (groups that are not a multiple of 8 or 32, K not a multiple of 8).
FORMATS = (
    [(32, K, 0) for K in (32, 96, 576, 1536, 37, 100)]
    + [(8, K, G) for K in (32, 96, 576, 1536) for G in sorted({32, K})]
    + [(8, 96, 24), (8, 96, 12), (8, 37, 37)]
    + [(4, K, G) for K in (32, 96, 576, 1536) for G in (32, 64, 128) if K % G == 0]
    + [(4, 96, 96)]
)


def _id(f):
    return f"b{f[0]}-K{f[1]}-G{f[2]}"


@pytest.mark.parametrize("fmt", FORMATS, ids=_id)
def test_dequantize_matches_documented_layout(fmt):
    bits, K, G = fmt
    qw, w, _ = make_weight(bits, 67, K, G, bias=False)
    assert (qw.N, qw.K, qw.bits) == (67, K, bits)
    # scale * q is exact in float32, so the kernel's single rounding of scale * q + zero is torch's, bit for bit.
    assert torch.equal(ext.qweight_dequantize(qw), w)


@pytest.mark.parametrize("fmt", FORMATS, ids=_id)
def test_dequantize_selected_rows(fmt):
    """The embedding lookup: only the rows asked for, in the asked order and shape flattened, repeats allowed."""
    bits, K, G = fmt
    qw, w, _ = make_weight(bits, 67, K, G, bias=False)
    ids = torch.tensor([[66, 0], [3, 66]])
    assert torch.equal(ext.qweight_dequantize(qw, ids), w[ids.reshape(-1)])
    assert ext.qweight_dequantize(qw, torch.tensor([], dtype=torch.long)).shape == (0, K)
    for bad in ([67], [-1]):
        with pytest.raises(RuntimeError, match="outside the matrix's 67 rows"):
            ext.qweight_dequantize(qw, torch.tensor(bad))
    with pytest.raises(RuntimeError, match="int64"):
        ext.qweight_dequantize(qw, torch.tensor([1], dtype=torch.int32))


@pytest.mark.parametrize("fmt", FORMATS, ids=_id)
@pytest.mark.parametrize("bias", [False, True])
def test_qlinear_matches_dequantized_matmul(fmt, bias):
    bits, K, G = fmt
    N = {32: 1, 96: 67, 576: 200, 1536: 71}.get(K, 13)  # never a multiple of 8, mostly not of 64
    qw, w, b = make_weight(bits, N, K, G, bias, seed=K + G + bits)
    wk = ext.qweight_dequantize(qw)
    g = torch.Generator().manual_seed(1)
    for M in (1, 2, 5, 16, 17, 40, 200):  # 200: the dequantize-tiles-into-a-GEMM path (M > 192)
        x = torch.randn(M, K, generator=g)
        y = ext.qlinear(x, qw)
        assert y.shape == (M, N) and y.dtype == torch.float32
        act16 = uses_act16(qw, M)
        check_close(y, x, w, b, act16)  # against the documented format
        ref = x @ wk.T + (b if b is not None else 0)  # against the kernel's own dequantization, in float32
        tol = 2 * (K + 2) * U * ((x.abs() @ wk.abs().T) + (b.abs() if b is not None else 0)) + 1e-30
        if act16:
            tol = tol + (act16_error(x) @ wk.double().abs().T).float()
        assert ((y - ref).abs() <= tol).all()


@pytest.mark.parametrize("fmt", [(8, 576, 32), (8, 576, 576), (4, 576, 32), (4, 1536, 128)], ids=_id)
@act16_only
def test_float_activations_on_request(fmt):
    """act_bits 32 keeps x in float32: the plain float32 rounding bound holds again, and the int16 path's
    results differ from it only by the documented activation rounding."""
    bits, K, G = fmt
    qw, w, b = make_weight(bits, 70, K, G, bias=True, seed=5)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(6))
    assert qw.act_bits == 16
    y16 = ext.qlinear(x, qw)
    qw.act_bits = 32
    y32 = ext.qlinear(x, qw)
    check_close(y32, x, w, b)
    check_close(y16, x, w, b, act16=True)
    assert not torch.equal(y16, y32)  # the two paths really are different computations
    with pytest.raises(RuntimeError, match="act_bits must be 8, 16 or 32"):
        qw.act_bits = 12


@pytest.mark.parametrize("fmt", [(4, 576, 32), (4, 1536, 128), (4, 96, 32)], ids=_id)
@act16_only
def test_int8_activations_on_request(fmt):
    """act_bits 8 (int4 only) rounds x to int8 per 32-input block: within that rounding's bound of the exact
    product, coarser than int16 (so a really different computation), and batch-invariant like int16."""
    bits, K, G = fmt
    qw, w, b = make_weight(bits, 70, K, G, bias=True, seed=7)
    x = torch.randn(40, K, generator=torch.Generator().manual_seed(8))
    y16 = ext.qlinear(x, qw)
    qw.act_bits = 8
    y8 = ext.qlinear(x, qw)
    exact = x.double() @ w.double().T + b.double()
    bound = (K + 2) * U * (x.double().abs() @ w.double().abs().T + b.double().abs()) + act16_error(x, 127) @ (
        w.double().abs().T)
    assert ((y8.double() - exact).abs() <= bound).all()
    assert (y8.double() - exact).abs().mean() > 10 * (y16.double() - exact).abs().mean()
    alone = torch.cat([ext.qlinear(x[m : m + 1], qw) for m in range(len(x))])
    for M in (1, 2, 3, 4, 5, 9, 40):
        assert torch.equal(ext.qlinear(x[:M], qw), alone[:M]), f"M={M}"


@act16_only
def test_int8_activations_leave_int8_weights_on_int16():
    qw, _, _ = make_weight(8, 64, 576, 32, bias=False)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(9))
    y16 = ext.qlinear(x, qw)
    qw.act_bits = 8
    assert torch.equal(ext.qlinear(x, qw), y16)


@act16_only
def test_act16_rounding_is_per_block():
    """One large input only coarsens its own 32-input block: an x with a 1e4 outlier in block 0 still gets the
    other blocks' small inputs right (a per-row int16 scale would round them all to 0)."""
    K = 96
    q = torch.zeros(1, K, dtype=torch.int8)
    q[0, 40] = 100  # the weight only sees input 40 (block 1)
    qw = ext.QWeight(8, q, torch.ones(1, 3, dtype=torch.float16), None, 32, None)
    x = torch.zeros(1, K)
    x[0, 0] = 1e4
    x[0, 40] = 1e-3
    y = ext.qlinear(x, qw)
    assert abs(y.item() - 0.1) <= 0.1 * 2**-15


@pytest.mark.parametrize("act_bits", [16, 8])
@act16_only
def test_act16_propagates_nan_and_inf(act_bits):
    qw, _, _ = make_weight(4, 8, 64, 32, bias=False)
    qw.act_bits = act_bits
    for bad in (float("nan"), float("inf")):
        x = torch.ones(2, 64)
        x[1, 5] = bad
        y = ext.qlinear(x, qw)
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


@pytest.mark.parametrize(
    "fmt", [(32, 576, 0), (32, 100, 0), (8, 576, 32), (8, 576, 576), (8, 96, 24), (4, 576, 32), (4, 1536, 128)], ids=_id
)
def test_batch_invariance(fmt):
    """Row m of a batched call equals that row alone, bit for bit, for every M a decode step makes (up to the
    fused decoder's 128 sequences) and thread count."""
    bits, K, G = fmt
    qw, _, _ = make_weight(bits, 333, K, G, bias=True)
    x = torch.randn(128, K, generator=torch.Generator().manual_seed(2))
    alone = torch.cat([ext.qlinear(x[m : m + 1], qw) for m in range(128)])
    for M in (2, 3, 4, 5, 7, 16, 40, 128):  # up to 4 rows read the blocks directly, more widen them first
        assert torch.equal(ext.qlinear(x[:M], qw), alone[:M]), f"M={M}"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ext.qlinear(x[:16], qw), alone[:16])
        assert torch.equal(ext.qlinear(x[3:4], qw), alone[3:4])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "fmt", [(4, 576, 32), (4, 96, 96), (4, 1536, 128), (8, 576, 32), (8, 576, 576)], ids=_id
)
def test_row_bits_do_not_depend_on_neighbours(fmt):
    """A speculative verify or a small batch puts a row beside 1-7 others: int4 rows of x share each widened block
    4 at a time (qlinear.cpp, act16_quad_rows), so a row's result must be its result alone, bit for bit, at every
    position among any neighbours, and on one thread or two."""
    bits, K, G = fmt
    qw, _, _ = make_weight(bits, 37, K, G, bias=True)  # 37 rows: a last quad with one row
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(6, K, generator=g) * torch.tensor([1.0, 30.0, 1e-3, 1.0, 4.0, 0.2]).unsqueeze(1)
    alone = [ext.qlinear(rows[j : j + 1], qw) for j in range(len(rows))]
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            for M in range(2, 9):
                for pos in range(M):
                    j = (M + pos) % len(rows)
                    x = torch.randn(M, K, generator=g) * 10.0 ** torch.randint(-2, 3, (M, 1), generator=g)
                    x[pos] = rows[j]
                    y = ext.qlinear(x, qw)
                    assert torch.equal(y[pos : pos + 1], alone[j]), f"threads={t} M={M} pos={pos}"
    finally:
        torch.set_num_threads(threads)


needs_amx = pytest.mark.skipif(ext is None or not ext.amx_available(),
                               reason="no AMX here (an AVX-512 build on a CPU with AMX-BF16 and the OS's grant)")


@needs_amx
@pytest.mark.parametrize("fmt", [(4, 576, 32), (4, 1536, 32), (4, 256, 64), (4, 384, 128)], ids=_id)
@pytest.mark.parametrize("N", [576, 333, 50])
def test_amx_gives_the_vector_kernels_bits(fmt, N):
    """From 24 rows an int4 product runs on AMX tiles (qlinear_amx.cpp), and must give what the vector kernels give,
    bit for bit: a prompt's rows and its decode rows meet in the same KV cache. Odd row counts leave partial tiles
    of x and of weight rows (N = 333: a last quad of one row; 50: one partial tile per thread)."""
    bits, K, G = fmt
    qw, _, _ = make_weight(bits, N, K, G, bias=N != 576, seed=K + N)
    g = torch.Generator().manual_seed(N)
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            for M in (24, 33, 47, 64, 100, 192):
                x = torch.randn(M, K, generator=g) * 10.0 ** torch.randint(-2, 3, (M, 1), generator=g)
                ext.amx_set_enabled(False)
                vector = ext.qlinear(x, qw)
                ext.amx_set_enabled(True)
                assert torch.equal(ext.qlinear(x, qw), vector), f"threads={t} M={M}"
    finally:
        ext.amx_set_enabled(True)
        torch.set_num_threads(threads)


@needs_amx
def test_amx_keeps_nan_and_outliers_as_the_vector_kernels_do():
    qw, _, _ = make_weight(4, 96, 256, 32, bias=True)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(3))
    x[7, 5] = float("nan")
    x[9, 100] = float("inf")
    y = ext.qlinear(x, qw)
    assert torch.isnan(y[7]).all() and torch.isnan(y[9]).all()
    others = [m for m in range(40) if m not in (7, 9)]
    assert torch.isfinite(y[others]).all()
    ext.amx_set_enabled(False)
    try:
        assert torch.equal(ext.qlinear(x, qw)[others], y[others])
    finally:
        ext.amx_set_enabled(True)


def with_outliers(bits: int, N: int, K: int, G: int, cols: list[int], bias: bool, seed: int = 0):
    """make_weight's int8 matrix with float16 outlier columns: the blocks hold 0 there (as jisu's quantizer
    writes them), and the documented matrix takes the float weights in those columns."""
    qw, w, b = make_weight(bits, N, K, G, bias, seed)
    data = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=torch.Generator().manual_seed(seed + 1))
    c = torch.tensor(cols, dtype=torch.long)
    data[:, c] = 0
    scales = (torch.rand(N, K // G, generator=torch.Generator().manual_seed(seed + 2)) * 0.02 + 1e-3).half()
    ow = torch.randn(N, len(cols), generator=torch.Generator().manual_seed(seed + 3)).half()
    w = scales.float().repeat_interleave(G, dim=1) * data.float()
    w[:, c] = ow.float()
    return ext.QWeight(8, data, scales, None, G, b, c, ow), w, b


# Outlier columns on every int8 path: act16 (K, G % 32 == 0), float groups of 8 (96/24), scalar groups (37/37).
OUTLIER_FORMATS = [(8, 576, 576, [0, 17, 300, 575]), (8, 576, 32, [5, 6, 7, 200, 31, 32, 33, 400]),
                   (8, 96, 24, [1, 50]), (8, 37, 37, [36])]


@pytest.mark.parametrize("fmt", OUTLIER_FORMATS, ids=lambda f: _id(f[:3]))
@pytest.mark.parametrize("act_bits", [16, 32])
def test_outlier_columns_match_the_documented_matrix(fmt, act_bits):
    bits, K, G, cols = fmt
    qw, w, b = with_outliers(bits, 75, K, G, cols, bias=True, seed=K)
    qw.act_bits = act_bits
    assert torch.equal(ext.qweight_dequantize(qw), w)
    assert torch.equal(ext.qweight_dequantize(qw, torch.tensor([74, 2])), w[[74, 2]])
    g = torch.Generator().manual_seed(4)
    for M in (1, 3, 16, 200):
        x = torch.randn(M, K, generator=g)
        x[:, cols] *= 300.0  # the massive inputs outlier columns are for
        # Those inputs are left out of the int16 rounding (the blocks hold 0 there), so the bound is the one
        # for x without them.
        xr = x.clone()
        xr[:, cols] = 0.0
        y = ext.qlinear(x, qw)
        exact = x.double() @ w.double().T + b.double()
        mag = x.double().abs() @ w.double().abs().T + b.double().abs()
        bound = (K + len(cols) + 3) * U * mag + 1e-30
        if uses_act16(qw, M):
            bound += act16_error(xr) @ w.double().abs().T
        assert ((y.double() - exact).abs() <= bound).all(), f"M={M}"


def test_outlier_columns_keep_batch_invariance():
    qw, _, _ = with_outliers(8, 333, 576, 32, [3, 100, 101, 550], bias=True)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(2))
    alone = torch.cat([ext.qlinear(x[m : m + 1], qw) for m in range(16)])
    for M in (2, 5, 16):
        assert torch.equal(ext.qlinear(x[:M], qw), alone[:M]), f"M={M}"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ext.qlinear(x, qw), alone)
    finally:
        torch.set_num_threads(threads)


def test_noncontiguous_and_empty():
    qw, w, _ = make_weight(4, 40, 64, 32, bias=False)
    x = torch.randn(64, 5).T  # [5, 64], not contiguous
    check_close(ext.qlinear(x, qw), x, w, None, act16=True)
    assert ext.qlinear(torch.empty(0, 64), qw).shape == (0, 40)


def _bad(*args, match):
    with pytest.raises(RuntimeError, match=match):
        ext.QWeight(*args)


def test_bad_weights_raise():
    q8 = torch.zeros(4, 96, dtype=torch.int8)
    q4 = torch.zeros(4, 48, dtype=torch.uint8)

    def s(n):
        return torch.ones(4, n, dtype=torch.float16)

    _bad(8, q8, s(2), None, 40, None, match="does not divide")
    _bad(4, q4, s(6), s(6), 16, None, match="multiple of 32")
    _bad(8, q4, s(3), None, 32, None, match="needs int8")
    _bad(4, q8, s(3), s(3), 32, None, match="needs uint8")
    _bad(32, torch.zeros(4, 8, dtype=torch.float64), None, None, 0, None, match="float32")
    _bad(8, q8, None, None, 32, None, match="needs scales")
    _bad(8, q8, s(2), None, 32, None, match=r"scales must be float16 \[4, 3\]")
    _bad(8, q8, torch.ones(4, 3), None, 32, None, match="scales must be float16")
    _bad(4, q4, s(3), None, 32, None, match="needs zeros")
    _bad(4, q4, s(3), s(2), 32, None, match="zeros must be")
    _bad(8, q8, s(3), None, 32, torch.zeros(5), match=r"bias must be float32 \[4\]")
    _bad(3, q8, s(3), None, 32, None, match="bits must be 32, 8 or 4")
    _bad(32, torch.zeros(8), None, None, 0, None, match="2-D")
    cols, ow = torch.tensor([1, 5]), torch.zeros(4, 2, dtype=torch.float16)
    _bad(8, q8, s(3), None, 32, None, cols, None, match="come together")
    _bad(4, q4, s(3), s(3), 32, None, cols, ow, match="only int8 weights take outlier columns")
    _bad(8, q8, s(3), None, 32, None, cols.int(), ow, match="outlier_cols must be int64")
    _bad(8, q8, s(3), None, 32, None, cols, torch.zeros(4, 2), match=r"outlier_weights must be float16 \[4, 2\]")
    _bad(8, q8, s(3), None, 32, None, torch.tensor([1, 96]), ow, match=r"outlier column 96 is not in \[0, 96\)")
    _bad(8, q8, s(3), None, 32, None, torch.tensor([5, 5]), ow, match="outlier column 5 is given twice")


def test_bad_inputs_raise():
    qw, _, _ = make_weight(8, 4, 96, 32, bias=False)
    with pytest.raises(RuntimeError, match="x has 95 columns, the weight has 96 inputs"):
        ext.qlinear(torch.zeros(2, 95), qw)
    with pytest.raises(RuntimeError, match="float32"):
        ext.qlinear(torch.zeros(2, 96, dtype=torch.float64), qw)
    with pytest.raises(RuntimeError, match="float32"):
        ext.qlinear(torch.zeros(96), qw)


def test_bench_helper_runs():
    """benchmarks/bench_qlinear.py times qweight_matvec through this helper."""
    qw, _, _ = make_weight(4, 8, 64, 32, bias=True)
    times = ext._time_matvec([qw, qw], 2, 3)
    assert len(times) == 3 and all(t >= 0 for t in times)
