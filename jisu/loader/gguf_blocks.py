"""GGUF quantized matrices kept compressed: every GGUF block type jisu runs on its int8 / int4 kernels
(formats in jisu/quant/formats.py), converted from the memory-mapped file a few thousand rows at a time, never as
a float32 copy of the whole matrix.

Per type (d, dmin: float16 per block; sc, m: small integers per sub-block; q: the stored integers):

  GGUF  values per block         w                              jisu                                  fidelity
  Q8_0  32                       d * q, q int8                  int8 g32, scale d (bytes copied)      exact
  Q4_0  32                       d * (q - 8), q 0..15           int4 g32, scale d, zero -8d           exact
  Q4_1  32                       d * q + m, q 0..15             int4 g32, scale d, zero m             exact
  Q5_0  32                       d * (q - 16), q 0..31          int8 g32, scale d, q - 16             exact
  Q4_K  256 = 8 sub-blocks x 32  d*sc * q - dmin*m, q 0..15,    int4 g32, scale fl16(d*sc),           exact when
                                 sc, m 0..63                    zero fl16(-dmin*m)                    they fit f16
  Q6_K  256 = 16 x 16            d*sc * (q - 32), q 0..63,      int8 g32, one sub-block of each       requantized
                                 sc int8                        pair kept (below)
  Q5_1  32                       d * q + m, q 0..31             int8 g32, rounded by jisu             requantized
  Q5_K  256 = 8 x 32             d*sc * q - dmin*m, q 0..31     int8 g32, rounded by jisu             requantized

fl16: rounded to float16 (to nearest even), the kernels' scale type. d*sc is an 11-bit mantissa times a 6-bit
integer, so it fits float16 only when the product's low bits happen to be zero; otherwise each value moves by at
most 2^-11 (|d*sc*q| + |dmin*m|) (QuantizedTensor.fidelity 'scales rounded'). Measured on Gemma 3 270M's Q4_K
matrices: 98% of values move, by a relative RMS of 6.7e-4, against Q4_K's own ~8e-2 (benchmarks/bench_kquants.py):
too little to pay for anything.

Why requantize: int8 is symmetric (w = scale * q), so it cannot hold an offset that is not a whole number of
steps, and Q5_1's m and Q5_K's dmin*m are arbitrary floats; int4 has the offset but 16 levels, not 32. Those values
are decoded in float32 (as gguf does) and rounded exactly as jisu's quantize_int8(w, 32) rounds: scale
fl16(max|w| / 127), q to nearest, so each value moves by at most half a step, ~1/8 of a Q5 step (measured: relative
RMS 5.7e-3, against Q5's own ~4e-2; SmolLM2 with every matrix in Q5_1: KL 1.9e-3, top-1 97.6%, about what jisu's
own int8 group 32 costs its float weights without outlier columns). Trying 24 scales per group and keeping the
best halves the squared error, at ~20x the conversion time: not done.

Q6_K: int8 with group 16 would keep every integer (scales rounded; relative RMS 1.9e-4 on Gemma 3), and the
kernels accept it, but their fast paths (int16 activations, several rows per pass at batch 1) need groups of 32:
at batch 1 an int8 group-16 matvec measured 3x slower than group 32 on a 49152x576 matrix streamed from memory
(still 1.7x faster than float32) and 18x slower on a cache-resident 640x2048 one (2x slower than float32; one
thread, a busy 2-core machine). So each 32-value group, two sub-blocks with scales
a = d*sc1 and b = d*sc2, |a| >= |b|, gets the scale fl16(a / 4): a's sub-block keeps its integers, times 4
(4 (q - 32) in -128..124; within 2^-11 where a / 4 does not fit float16), and b's is rounded to steps of |a| / 4,
as fine as jisu's own max/127 (values reaching 128, only where b = -a and q = 0, are clamped to 127). A larger
factor than 4 never fits a's 64 levels; on Gemma 3 a range-dependent factor picked 4 in 99.6% of the groups.
Measured on Gemma 3: relative RMS 4.1e-3 (quantize_int8 of the same values: 5.6e-3), against Q6_K's own ~1e-2;
on SmolLM2 with its 30 down_proj matrices in Q6_K, KL 1.5e-4 from the float32 run of the same bytes, top-1 99.6%
(group 16: KL 2.6e-7, 99.9%; Q4_K there: 6e-6). block_tensor(..., q6_k_group=16) keeps Q6_K's integers, for
whoever prefers that to speed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

from jisu.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from jisu.quant.formats import QuantizedTensor

Q = GGMLQuantizationType
EXACT, SCALES_ROUNDED, REQUANTIZED = "exact", "scales rounded", "requantized"
CHUNK_VALUES = 1 << 18
"""Weights converted at a time by one thread: its transient buffers (bytes, integers, float32 for the requantized
types) stay around a MB, in cache, whatever the matrix."""
MAX_THREADS = 4
_F16_MAX = 65504.0


@dataclass(frozen=True)
class KeptFormat:
    """What one GGUF block type loads as."""

    bits: int
    group_size: int
    fidelity: str
    """The best case: Q4_K is 'exact' only when every d*sc and dmin*m fits float16 ('scales rounded' otherwise);
    QuantizedTensor.fidelity says what a given matrix got."""
    block: int
    """Values per GGUF block."""
    block_bytes: int

    def loaded_bytes(self, n_elements: int) -> int:
        """Bytes a matrix of n_elements holds once loaded: q, and a float16 scale (and zero, int4) per group."""
        return n_elements * self.bits // 8 + n_elements // self.group_size * (4 if self.bits == 4 else 2)


KEPT_BLOCK_FORMATS: dict[GGMLQuantizationType, KeptFormat] = {
    Q.Q8_0: KeptFormat(8, 32, EXACT, 32, 34),
    Q.Q4_0: KeptFormat(4, 32, EXACT, 32, 18),
    Q.Q4_1: KeptFormat(4, 32, EXACT, 32, 20),
    Q.Q5_0: KeptFormat(8, 32, EXACT, 32, 22),
    Q.Q4_K: KeptFormat(4, 32, SCALES_ROUNDED, 256, 144),
    Q.Q6_K: KeptFormat(8, 32, REQUANTIZED, 256, 210),
    Q.Q5_1: KeptFormat(8, 32, REQUANTIZED, 32, 24),
    Q.Q5_K: KeptFormat(8, 32, REQUANTIZED, 256, 176),
}
"""GGUF block types loaded as jisu int8 / int4 blocks (jisu/loader/gguf.py, keep_blocks)."""


def block_tensor(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...], name: str, *,
                 q6_k_group: int = 32) -> QuantizedTensor:
    """A GGUF matrix of a KEPT_BLOCK_FORMATS type as jisu's int8 / int4 blocks.

    data: the tensor's bytes (GGUFReader's uint8 view of the memory map, any shape); shape: the torch shape
    (rows, row length). origin is the GGUF type's name, fidelity how close the numbers are to the file's.
    q6_k_group: 32 (the kernels' fast paths; Q6_K requantized as above) or 16 (Q6_K's integers kept, scales
    rounded; its matvec measured 3-18x slower at batch 1)."""
    if q6_k_group not in (16, 32):
        raise InvalidRequestError(f"q6_k_group must be 16 or 32, got {q6_k_group!r}")
    if qtype == Q.Q6_K and q6_k_group == 16:
        return _checked(_q6_k_g16, data, qtype, shape, name)
    return _checked(_CONVERT.get(qtype), data, qtype, shape, name)


def _checked(convert, data, qtype, shape, name: str) -> QuantizedTensor:
    fmt = KEPT_BLOCK_FORMATS.get(qtype)
    if fmt is None:
        kept = ", ".join(t.name for t in KEPT_BLOCK_FORMATS)
        raise UnsupportedModelError(
            f"tensor {name!r}: GGUF type {getattr(qtype, 'name', qtype)} is not kept as blocks; jisu keeps {kept}"
        )
    blocks = _block_view(data, qtype, fmt, shape, name)
    try:
        return convert(blocks, int(shape[0]), int(shape[1]), name)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"tensor {name!r} ({qtype.name}, shape {tuple(shape)}) is corrupt: {e}") from None


def _block_view(data, qtype, fmt: KeptFormat, shape, name: str) -> np.ndarray:
    """data as [rows, blocks per row, block bytes] (a view of the memory map), or a clear error."""
    what = f"tensor {name!r} ({qtype.name}, shape {tuple(shape)})"
    if len(shape) != 2 or any(not isinstance(s, (int, np.integer)) or s <= 0 for s in shape):
        raise ModelLoadError(f"{what}: only 2-D matrices are kept as blocks")
    rows, cols = int(shape[0]), int(shape[1])
    if cols % fmt.block:
        raise ModelLoadError(
            f"{what} is corrupt: its rows of {cols} values are not whole {qtype.name} blocks of {fmt.block}"
        )
    arr = np.asarray(data)
    if arr.dtype != np.uint8:
        raise ModelLoadError(f"{what} is corrupt: its data is {arr.dtype}, not the bytes of {qtype.name} blocks")
    want = rows * (cols // fmt.block) * fmt.block_bytes
    if arr.size != want:
        raise ModelLoadError(f"{what} is corrupt: it holds {arr.size} bytes, its shape takes {want}")
    return np.ascontiguousarray(arr).reshape(rows, cols // fmt.block, fmt.block_bytes)


def _run(blocks: np.ndarray, cols: int, fill: Callable[[slice, np.ndarray], object]) -> list:
    """fill(rows, those rows' blocks [n, blocks, bytes] copied off the read-only map) over chunks of CHUNK_VALUES
    weights, on up to MAX_THREADS threads (numpy lets go of the GIL inside each operation); fill's results.

    The bit work is numpy's: vectorised, and single-threaded per call, where torch's own two threads measured up to
    25x slower on these small uint8 operations while another process kept a core busy."""
    step = max(1, CHUNK_VALUES // cols)
    starts = range(0, blocks.shape[0], step)

    def one(r0: int):
        part = np.array(blocks[r0 : r0 + step])
        return fill(slice(r0, r0 + len(part)), part)

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    threads = min(MAX_THREADS, cpus, len(starts))
    if threads <= 1:
        return [one(r0) for r0 in starts]
    with ThreadPoolExecutor(threads, thread_name_prefix="gguf-blocks") as pool:
        return list(pool.map(one, starts))


def _tensor(bits: int, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, origin: str,
            fidelity: str) -> QuantizedTensor:
    rows = q.shape[0]
    return QuantizedTensor(
        bits, torch.from_numpy(q.reshape(rows, -1)), torch.from_numpy(scales.reshape(rows, -1)),
        None if zeros is None else torch.from_numpy(zeros.reshape(rows, -1)), 32, origin, fidelity=fidelity,
    )


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> [...] float16 (little-endian, as GGUF stores them)."""
    return np.ascontiguousarray(b).view("<f2")[..., 0]


def _to_f16(x: np.ndarray, what: str, name: str) -> np.ndarray:
    """float32 values -> float16 (to nearest, ties to even), refusing what float16 cannot hold."""
    with np.errstate(over="ignore", invalid="ignore"):
        h = x.astype(np.float16)
    bad = np.isinf(h) & np.isfinite(x)
    if bad.any():
        raise ModelLoadError(
            f"tensor {name!r}: a block {what} of {np.abs(x[bad]).max():.4g} is beyond float16's range "
            f"({_F16_MAX:g}), the kernels' scale type; load it with weights float32"
        )
    return h


def _nibbles(b: np.ndarray) -> np.ndarray:
    """[..., B] bytes -> [..., 2, B]: the low nibbles, then the high ones."""
    out = np.empty(b.shape[:-1] + (2, b.shape[-1]), dtype=np.uint8)
    np.bitwise_and(b, 0xF, out=out[..., 0, :])
    np.right_shift(b, 4, out=out[..., 1, :])
    return out


def _pack32(q: np.ndarray) -> np.ndarray:
    """[..., 32] values 0..15 -> [..., 16] bytes in jisu's (and GGUF Q4's) layout: byte j = q[j] | q[j + 16] << 4."""
    return q[..., :16] | (q[..., 16:] << 4)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> the 8 sub-blocks' 6-bit (scale, min). Bytes 0-3 hold scales 0-3 in their low 6
    bits, bytes 4-7 mins 0-3; scales / mins 4-7 take their low 4 bits from bytes 8-11 (low / high nibble) and
    their top 2 from the spare top bits of bytes 0-3 / 4-7."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0xF) | ((a >> 6) << 4)], axis=-1)
    m = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, m


def _last_axis(fn, x: np.ndarray) -> np.ndarray:
    """fn (np.maximum / np.minimum) reduced over the short last axis, through a transposed copy: numpy reduces
    across one long contiguous axis ~2x faster than along many 32-element ones."""
    flat = x.reshape(-1, x.shape[-1])
    return fn.reduce(np.ascontiguousarray(flat.T), axis=0).reshape(x.shape[:-1])


# ----------------------------------------------------------------------------- exact: the file's integers kept


def _q8_0(blocks, rows, cols, name) -> QuantizedTensor:
    q = np.empty((rows, cols // 32, 32), dtype=np.int8)
    d = np.empty((rows, cols // 32), dtype=np.float16)

    def fill(r, b):
        d[r] = _f16(b[..., :2])
        q[r] = b[..., 2:].view(np.int8)

    _run(blocks, cols, fill)
    return _tensor(8, q, d, None, "Q8_0", EXACT)


def _q4_01(blocks, rows, cols, name, with_min: bool) -> QuantizedTensor:
    q = np.empty((rows, cols // 32, 16), dtype=np.uint8)
    d = np.empty((rows, cols // 32), dtype=np.float16)
    z = np.empty_like(d)

    def fill(r, b):
        d[r] = _f16(b[..., :2])
        # Q4_1: w = d * q + m. Q4_0: w = d * (q - 8) = d * q - 8d, and -8d is exact in float16.
        z[r] = _f16(b[..., 2:4]) if with_min else _to_f16(d[r].astype(np.float32) * -8, "scale", name)
        q[r] = b[..., 4 if with_min else 2 :]

    _run(blocks, cols, fill)
    return _tensor(4, q, d, z, "Q4_1" if with_min else "Q4_0", EXACT)


def _q5_ints(b: np.ndarray, qh_at: int) -> np.ndarray:
    """Q5_0 / Q5_1 blocks [n, blocks, bytes] -> q 0..31 [n, blocks, 32]: value j's low 4 bits from byte j % 16 of
    qs (the low nibble for j < 16), its 5th from bit j of the little-endian 32-bit qh."""
    q = _nibbles(b[..., qh_at + 4 :]).reshape(b.shape[:-1] + (32,))
    q |= np.unpackbits(b[..., qh_at : qh_at + 4], axis=-1, bitorder="little") << 4  # bit j % 8 of byte j // 8
    return q


def _q5_0(blocks, rows, cols, name) -> QuantizedTensor:
    q = np.empty((rows, cols // 32, 32), dtype=np.int8)
    d = np.empty((rows, cols // 32), dtype=np.float16)

    def fill(r, b):
        d[r] = _f16(b[..., :2])
        np.subtract(_q5_ints(b, 2).view(np.int8), 16, out=q[r])

    _run(blocks, cols, fill)
    return _tensor(8, q, d, None, "Q5_0", EXACT)


def _q4_k(blocks, rows, cols, name) -> QuantizedTensor:
    q = np.empty((rows, cols // 256, 8, 16), dtype=np.uint8)
    scales = np.empty((rows, cols // 256, 8), dtype=np.float16)
    zeros = np.empty_like(scales)

    def fill(r, b) -> bool:
        n = len(b)
        sc, m = _k_scales(b[..., 4:16])
        a = _f16(b[..., 0:2]).astype(np.float32)[..., None] * sc  # [n, blocks, 8], exact in float32
        z = -(_f16(b[..., 2:4]).astype(np.float32)[..., None] * m)
        scales[r], zeros[r] = _to_f16(a, "scale", name), _to_f16(z, "minimum", name)
        # qs: 4 runs of 32 bytes; run i holds sub-block 2i in its low nibbles and 2i + 1 in its high ones.
        q[r] = _pack32(_nibbles(b[..., 16:].reshape(n, -1, 4, 32))).reshape(n, -1, 8, 16)
        return not (np.array_equal(scales[r], a) and np.array_equal(zeros[r], z))  # rounded

    rounded = any(_run(blocks, cols, fill))
    return _tensor(4, q, scales, zeros, "Q4_K", SCALES_ROUNDED if rounded else EXACT)


# ----------------------------------------------------------------------------- requantized


def _q6_k_ints(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K blocks [n, blocks, 210] -> (q - 32 int8 [n, blocks, 256], sub-block scales d*sc float32 [n, blocks, 16]).
    Per half of 128 values: ql (64 bytes) gives values 0-63 their low nibbles and 64-127 their high ones; qh (32
    bytes) gives values 32i + t their bits 4-5 from bits 2i, 2i + 1 of byte t."""
    n, nb = b.shape[:2]
    x = _nibbles(b[..., :128].reshape(n, nb, 2, 64))  # [n, nb, half, nibble, 64]
    xh = x.reshape(n, nb, 2, 4, 32)
    qh = b[..., 128:192].reshape(n, nb, 2, 32)
    for i in range(4):
        xh[..., i, :] |= ((qh << (4 - 2 * i)) if i < 2 else (qh >> (2 * i - 4))) & 0x30
    x = x.reshape(n, nb, 256).view(np.int8)
    x -= 32
    return x, _f16(b[..., 208:210]).astype(np.float32)[..., None] * b[..., 192:208].view(np.int8)


def _q6_k(blocks, rows, cols, name) -> QuantizedTensor:
    q = np.empty((rows, cols // 32, 32), dtype=np.int8)
    scales = np.empty((rows, cols // 32), dtype=np.float16)

    def fill(r, b):
        n = len(b)
        x, a = _q6_k_ints(b)
        a = a.reshape(n, -1, 2)  # 32-value groups: pairs of sub-blocks
        # Scale: the larger sub-block scale (sign kept) / 4, so that sub-block's values are 4 (q - 32), within
        # -128..124. The other's, |scale| no larger, fall within -128..128 (128 clamped to 127: only when its scale
        # is the larger one negated and q = 0).
        p = np.where(np.abs(a[..., 0]) >= np.abs(a[..., 1]), a[..., 0], a[..., 1])
        s = _to_f16(p / np.float32(4), "scale", name)
        sf = s.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where(sf != 0, a / np.where(sf != 0, sf, 1), 0).astype(np.float32)  # sub-block scale / s
        # The kept sub-block: c = 4 (1 + e), |e| <= 2^-11 (float16 rounding), so c (q - 32) rounds to 4 (q - 32).
        w = np.repeat(c.reshape(n, -1), 16, axis=-1) * x.reshape(n, -1)
        np.clip(np.rint(w, out=w), -128, 127, out=w)
        q[r], scales[r] = w.reshape(n, -1, 32), s.reshape(n, -1)

    _run(blocks, cols, fill)
    return _tensor(8, q, scales, None, "Q6_K", REQUANTIZED)


def _q6_k_g16(blocks, rows, cols, name) -> QuantizedTensor:
    """Q6_K as int8 with group 16: q - 32 as it is, scale fl16(d*sc) per sub-block."""
    q = np.empty((rows, cols // 256, 256), dtype=np.int8)
    scales = np.empty((rows, cols // 256, 16), dtype=np.float16)

    def fill(r, b) -> bool:
        x, a = _q6_k_ints(b)
        q[r], scales[r] = x, _to_f16(a, "scale", name)
        return not np.array_equal(scales[r], a)  # rounded

    rounded = any(_run(blocks, cols, fill))
    t = _tensor(8, q, scales, None, "Q6_K", SCALES_ROUNDED if rounded else EXACT)
    t.group_size = 16
    return t


def _q5_1_ints(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q5_1 blocks -> (q 0..31 [n, blocks, 1, 32], d, m [n, blocks, 1]): w = d * q + m."""
    d, m = _f16(b[..., 0:2]).astype(np.float32)[..., None], _f16(b[..., 2:4]).astype(np.float32)[..., None]
    return _q5_ints(b, 4)[..., None, :], d, m


def _q5_k_ints(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q5_K blocks [n, blocks, 176] -> (q 0..31 [n, blocks, 8, 32], d*sc, -dmin*m [n, blocks, 8]): low nibbles as
    Q4_K's, bit 4 of sub-block j's value t is bit j of qh byte t."""
    n, nb = b.shape[:2]
    sc, m = _k_scales(b[..., 4:16])
    a = _f16(b[..., 0:2]).astype(np.float32)[..., None] * sc
    z = _f16(b[..., 2:4]).astype(np.float32)[..., None] * m
    x = _nibbles(b[..., 48:].reshape(n, nb, 4, 32)).reshape(n, nb, 8, 32)
    qh = b[..., 16:48]
    for j in range(8):
        x[..., j, :] |= ((qh << (4 - j)) if j < 4 else (qh >> (j - 4))) & 0x10
    return x, a, -z


def _requantized(ints: Callable, origin: str):
    """w = a * q + z per 32-value group (float32, as gguf computes it), rounded exactly as jisu's quantize_int8(w,
    32) rounds (jisu/quant/formats.py): scale fl16(max|w| / 127), q = w / scale to nearest (ties to even), in
    -127..127. max|w| is taken at the group's smallest and largest q (w is monotonic in q, float rounding
    included)."""

    def convert(blocks, rows, cols, name) -> QuantizedTensor:
        q = np.empty((rows, cols // 32, 32), dtype=np.int8)
        scales = np.empty((rows, cols // 32), dtype=np.float16)

        def fill(r, b):
            n = len(b)
            qb, a, z = ints(b)
            ends = [a * _last_axis(fn, qb) + z for fn in (np.maximum, np.minimum)]
            amax = np.maximum(np.abs(ends[0]), np.abs(ends[1]))
            with np.errstate(over="ignore", invalid="ignore"):
                s = (amax / np.float32(127)).astype(np.float16)
            if np.isinf(s).any() and np.isfinite(amax).all():
                raise ModelLoadError(
                    f"tensor {name!r}: a block of {origin} values reaches {amax.max():.4g}, beyond float16's range "
                    f"times 127; load it with weights float32"
                )
            sf = s.astype(np.float32)
            positive = sf > 0
            w = qb.astype(np.float32)
            w *= a[..., None]
            w += z[..., None]
            w /= np.where(positive, sf, 1)[..., None]
            if not positive.all():
                w *= positive[..., None]
            np.clip(np.rint(w, out=w), -127, 127, out=w)
            q[r], scales[r] = w.reshape(n, -1, 32), s.reshape(n, -1)

        _run(blocks, cols, fill)
        return _tensor(8, q, scales, None, origin, REQUANTIZED)

    return convert


_CONVERT: dict[GGMLQuantizationType, Callable[..., QuantizedTensor]] = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: lambda *a: _q4_01(*a, with_min=False),
    Q.Q4_1: lambda *a: _q4_01(*a, with_min=True),
    Q.Q5_0: _q5_0,
    Q.Q4_K: _q4_k,
    Q.Q6_K: _q6_k,
    Q.Q5_1: _requantized(_q5_1_ints, "Q5_1"),
    Q.Q5_K: _requantized(_q5_k_ints, "Q5_K"),
}
