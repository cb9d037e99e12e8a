"""GGUF block types kept compressed (jisu/loader/gguf_blocks.py): per type, whether the mapping onto jisu's int8 /
int4 blocks is exact or requantizes, how far the numbers move from the gguf package's dequantizer, how long a
conversion takes and what it holds against the float32 copy it replaces; then, on SmolLM2, how far next-token
distributions move (KL) from the float32 run of the same file's dequantized weights.

    .venv/bin/python benchmarks/bench_kquants.py                  # everything (~5 min on 2 cores)
    .venv/bin/python benchmarks/bench_kquants.py --no-model       # matrices only
    .venv/bin/python benchmarks/bench_kquants.py --chunks 8 --json out.json

Matrices: the real ones of Gemma 3 270M Q4_K_M (Q5_0, Q4_K, Q6_K, Q8_0, written by llama.cpp); the other types
are made here from that file's Q6_K ffn_down weights, by the gguf package's quantizers where it has one (Q4_0,
Q4_1, Q5_1) and by the simple min/max K-quant encoders below (Q4_K, Q5_K, Q6_K; not llama.cpp's search, so their
own error is a little larger than a real file's, the layout the same). 'own' is that encoding's relative RMS error
against the weights it was made from: the format's own loss, for scale. Timing: a 262144-row matrix of random
valid blocks (640 values a row, 768 for the 256-value K-quant blocks), the size of Gemma 3's embedding.

Model: SmolLM2-135M (the default model; its Q4_1 file's weights dequantized) re-encoded in each type where the
rows allow (K-quants need rows of 256k values: only down_proj's 1536; the other matrices take llama.cpp's
fallbacks, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, as its K-quant mixes do for SmolLM2's 576). Reference: those
bytes dequantized by gguf, run in float32; tested: block_tensor's blocks on jisu's kernels (weights auto), with
float32 activations (the conversion alone) and with decode's int16 activations. WikiText-2 (CC BY-SA 3.0),
512-token chunks, second halves scored (jisu/eval/kl.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES

from jisu.loader.gguf_blocks import KEPT_BLOCK_FORMATS, block_tensor

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
GEMMA = Path("/tmp/g3/gemma-3-270m-q4_k_m.gguf")
NEW = (Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


# ----------------------------------------------------------------------------- simple K-quant encoders


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)


def _k_scale_bytes(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins [n, 8] -> the 12 bytes Q4_K / Q5_K store."""
    out = np.empty(sc.shape[:-1] + (12,), dtype=np.uint8)
    out[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)
    return out


def encode_k(w: np.ndarray, qtype) -> np.ndarray:
    """[rows, cols] float32 -> Q4_K or Q5_K bytes [rows, cols / 256 * block bytes]: per 32-value sub-block the
    min (<= 0) and max give scale and min, both rounded to 6 bits of the block's float16 d and dmin."""
    levels = 15 if qtype == Q.Q4_K else 31
    rows, cols = w.shape
    sub = w.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0)
    scale, mins = (sub.max(-1) - lo) / levels, -lo
    d, dmin = _f16(scale.max(-1) / 63), _f16(mins.max(-1) / 63)
    with np.errstate(divide="ignore", invalid="ignore"):
        df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
        sc = np.where(df > 0, np.rint(scale / df), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dminf > 0, np.rint(mins / dminf), 0).clip(0, 63).astype(np.uint8)
        a = d.astype(np.float32)[:, None] * sc
        z = dmin.astype(np.float32)[:, None] * m
        q = np.where(a[..., None] > 0, np.rint((sub + z[..., None]) / a[..., None]), 0).clip(0, levels).astype(np.uint8)
    runs = (q & 0xF).reshape(-1, 4, 2, 32)
    qs = (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(-1, 128)
    parts = [d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), _k_scale_bytes(sc, m)]
    if qtype == Q.Q5_K:
        bits = (q >> 4) & 1  # [n, 8, 32]: bit j of byte t is sub-block j's value t
        parts.append(np.bitwise_or.reduce(bits << np.arange(8, dtype=np.uint8)[:, None], axis=1).astype(np.uint8))
    parts.append(qs)
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def encode_q6_k(w: np.ndarray) -> np.ndarray:
    """[rows, cols] float32 -> Q6_K bytes: per 16-value sub-block its largest magnitude maps to -32 (llama.cpp's
    choice), the sub-block scales rounded to int8 steps of the block's float16 d."""
    rows, cols = w.shape
    sub = w.reshape(-1, 16, 16).astype(np.float32)
    peak = np.take_along_axis(sub, np.abs(sub).argmax(-1)[..., None], -1)[..., 0]
    scale = peak / -32
    d = _f16(np.abs(scale).max(-1) / 127)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(scale / d.astype(np.float32)[:, None]), 0).clip(-128, 127)
        a = d.astype(np.float32)[:, None] * sc
        q = (np.where(a[..., None] != 0, np.rint(sub / a[..., None]), 0).clip(-32, 31) + 32).astype(np.uint8)
    q = q.reshape(-1, 2, 128)  # halves of 128 values
    ql = (q[..., :64] & 0xF) | ((q[..., 64:] & 0xF) << 4)  # [n, 2, 64]
    hi = (q >> 4).reshape(-1, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8), d[:, None].view(np.uint8)],
        axis=-1,
    ).reshape(rows, -1)


def encode(w: np.ndarray, qtype) -> np.ndarray:
    if qtype in (Q.Q4_K, Q.Q5_K):
        return encode_k(w, qtype)
    if qtype == Q.Q6_K:
        return encode_q6_k(w)
    return gguf_quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


def dequantize(raw: np.ndarray, qtype, shape) -> torch.Tensor:
    return torch.from_numpy(gguf_quants.dequantize(raw, qtype).reshape(shape).copy())


# ----------------------------------------------------------------------------- matrices


def measure(items, qtype, source: str, originals=None) -> dict:
    """items: [(raw bytes, shape)] of one type."""
    err2 = ref2 = own2 = orig2 = 0.0
    worst = 0.0
    changed = n = held = 0
    t_jisu = t_gguf = 0.0
    fidelity = set()
    for i, (raw, shape) in enumerate(items):
        t0 = time.perf_counter()
        t = block_tensor(raw, qtype, shape, "w")
        t_jisu += time.perf_counter() - t0
        t0 = time.perf_counter()
        want = dequantize(raw, qtype, shape)
        t_gguf += time.perf_counter() - t0
        diff = t.dequantize().double() - want.double()
        err2 += diff.pow(2).sum().item()
        ref2 += want.double().pow(2).sum().item()
        worst = max(worst, diff.abs().max().item())
        changed += (diff != 0).sum().item()
        n += want.numel()
        held += t.nbytes
        fidelity.add(t.fidelity)
        if originals is not None:
            o = originals[i].double()
            own2 += (want.double() - o).pow(2).sum().item()
            orig2 += o.pow(2).sum().item()
    return {
        "type": qtype.name, "source": source, "matrices": len(items), "fidelity": "/".join(sorted(fidelity)),
        "jisu": f"int{KEPT_BLOCK_FORMATS[qtype].bits} g{KEPT_BLOCK_FORMATS[qtype].group_size}",
        "max_abs_diff": worst, "rel_rms": (err2 / ref2) ** 0.5, "changed": changed / n,
        "own_rel_rms": (own2 / orig2) ** 0.5 if originals is not None else None,
        "convert_s": t_jisu, "gguf_dequant_s": t_gguf, "bytes_held": held, "float32_bytes": 4 * n,
    }


def matrix_rows(gemma: Path | None) -> list[dict]:
    from jisu.loader.gguf import open_gguf

    rows = []
    sources = []
    if gemma is not None:
        reader = open_gguf(gemma)
        by_type: dict = {}
        for t in reader.tensors:
            if t.tensor_type in KEPT_BLOCK_FORMATS and len(t.shape) == 2:
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                by_type.setdefault(t.tensor_type, []).append((t.data, shape))
        for qtype in (Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.Q8_0):
            if qtype in by_type:
                rows.append(measure(by_type[qtype], qtype, "Gemma 3 270M Q4_K_M (llama.cpp)"))
                print(fmt_row(rows[-1]), flush=True)
        # Near-original floats to encode the other types from: the file's 6-bit ffn_down weights.
        sources = [dequantize(raw, Q.Q6_K, shape) for raw, shape in by_type.get(Q.Q6_K, [])][:4]
    if not sources:  # no Gemma file: heavy-tailed random weights
        g = torch.Generator().manual_seed(0)
        sources = [torch.randn(640, 2048, generator=g) * torch.rand(640, 1, generator=g) * 0.05 for _ in range(4)]
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0):
        items = [(encode(w.numpy(), qtype), tuple(w.shape)) for w in sources]
        rows.append(measure(items, qtype, "ffn_down re-encoded here", sources))
        print(fmt_row(rows[-1]), flush=True)
    return rows


def fmt_row(r: dict) -> str:
    own = f"{r['own_rel_rms']:.2e}" if r.get("own_rel_rms") is not None else "-"
    return (f"| {r['type']} | {r['source']} | {r['matrices']} | {r['jisu']} | {r['fidelity']} | "
            f"{r['max_abs_diff']:.2e} | {r['rel_rms']:.2e} | {100 * r['changed']:.1f}% | {own} | "
            f"{r['convert_s']:.3f} | {r['gguf_dequant_s']:.3f} | {r['bytes_held'] / 2**20:.2f} | "
            f"{r['float32_bytes'] / 2**20:.2f} |")


MATRIX_HEADER = (
    "| type | matrices from | n | jisu | fidelity | max abs diff | rel RMS diff | values changed | own rel RMS | "
    "convert s | gguf dequant s | MB held | MB float32 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def q6_k_group16(gemma: Path | None) -> dict | None:
    """The road not taken for Q6_K: int8 with group 16 (every integer kept, scales fl16(d*sc)) against the group-32
    mapping block_tensor makes: error on Gemma 3's Q6_K matrices, and batch-1 matvec time on jisu's kernels."""
    from jisu.kernels.build import cpu_linear_kernels
    from jisu.loader.gguf import open_gguf

    ext = cpu_linear_kernels()
    if gemma is None or ext is None:
        return None
    found = [t for t in open_gguf(gemma).tensors if t.tensor_type == Q.Q6_K and len(t.shape) == 2]
    if not found:
        return None
    err = {16: 0.0, 32: 0.0}
    ref2 = 0.0
    for t in found:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        want = dequantize(t.data, Q.Q6_K, shape).double()
        g16 = block_tensor(t.data, Q.Q6_K, shape, t.name, q6_k_group=16)
        g32 = block_tensor(t.data, Q.Q6_K, shape, t.name)
        for g, q in ((16, g16), (32, g32)):
            err[g] += (q.dequantize().double() - want).pow(2).sum().item()
        ref2 += want.pow(2).sum().item()
    times = {}
    xin = torch.randn(1, shape[1])
    for name, kw in (("int8 g16", g16.to_kernel(ext)), ("int8 g32", g32.to_kernel(ext)),
                     ("float32", ext.QWeight(32, want.float().contiguous(), None, None, 0, None))):
        ext.qlinear(xin, kw)
        times[name] = min(_timed(lambda: [ext.qlinear(xin, kw) for _ in range(50)]) for _ in range(3)) / 50
    out = {"shape": list(shape), "rel_rms": {g: (e / ref2) ** 0.5 for g, e in err.items()}, "matvec_s": times}
    print(f"Q6_K on Gemma 3 ({len(found)} matrices): rel RMS vs gguf, int8 g16 {out['rel_rms'][16]:.2e}, "
          f"int8 g32 (used) {out['rel_rms'][32]:.2e}; batch-1 matvec {shape[0]}x{shape[1]}: "
          + ", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in times.items()), flush=True)
    return out


def timing_rows(rows_n: int = 262144) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for qtype in KEPT_BLOCK_FORMATS:
        block, nbytes = GGML_QUANT_SIZES[qtype]
        cols = 640 if 640 % block == 0 else 768
        raw = rng.integers(0, 256, size=(rows_n, cols // block, nbytes), dtype=np.uint8)
        scale_at = {Q.Q6_K: [208], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q4_1: [0, 2], Q.Q5_1: [0, 2]}.get(qtype, [0])
        for at in scale_at:
            v = (rng.random((rows_n, cols // block)) * 0.01).astype(np.float16)
            raw[..., at : at + 2] = v.view(np.uint8).reshape(rows_n, -1, 2)
        raw = raw.reshape(rows_n, -1)
        best = min(_timed(lambda: block_tensor(raw, qtype, (rows_n, cols), "w")) for _ in range(2))
        t_gguf = _timed(lambda: gguf_quants.dequantize(raw, qtype))
        out.append({"type": qtype.name, "shape": [rows_n, cols], "convert_s": best, "gguf_dequant_s": t_gguf})
        print(f"| {qtype.name} | {rows_n}x{cols} | {best:.2f} | {t_gguf:.2f} |", flush=True)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- SmolLM2


def model_rows(chunks: int, types: list[str]) -> list[dict]:
    from activation_quality import decode_sized_products

    from jisu import LLM
    from jisu.eval.kl import kl_divergence
    from jisu.loader.checkpoint import Checkpoint
    from jisu.loader.gguf import load_gguf
    from jisu.loader.resolve import resolve_model
    from jisu.quant.plan import is_linear_weight

    base = load_gguf(resolve_model(None))
    text = TEXT.read_text(encoding="utf-8")
    out = []
    for label in types:
        qtype, group16 = Q[label.removesuffix("-g16")], label.endswith("-g16")
        ref_tensors, test_tensors, kinds = {}, {}, {}
        for name, w in base.tensors.items():
            if w.dim() != 2 or not (is_linear_weight(name) or name == "model.embed_tokens.weight"):
                ref_tensors[name] = test_tensors[name] = w
                continue
            kind = qtype if w.shape[1] % GGML_QUANT_SIZES[qtype][0] == 0 else FALLBACK[qtype]
            raw = encode(w.float().numpy(), kind)
            ref_tensors[name] = dequantize(raw, kind, tuple(w.shape))
            test_tensors[name] = block_tensor(raw, kind, tuple(w.shape), name, q6_k_group=16 if group16 else 32)
            kinds[kind.name] = kinds.get(kind.name, 0) + 1

        def ckpt(tensors):
            return Checkpoint(base.config, tensors, base.tokenizer, base.source, dict(base.metadata))

        common = {"max_model_len": 640, "max_num_seqs": 1, "enable_prefix_caching": False}
        ref = LLM(checkpoint=ckpt(ref_tensors), weights="float32", **common)
        row = {"type": label, "matrices": kinds}
        for acts in ("float32", "int16"):
            test = LLM(checkpoint=ckpt(test_tensors), weights="auto", activations=acts, **common)
            with decode_sized_products():  # products in decode-sized calls, so int16 activations are used
                kl = kl_divergence(test.engine, ref.engine, text, 512, chunks)
            row[acts] = {"kl_mean": kl.kl_mean, "kl_p99": kl.kl_p99, "top1": kl.top1_agreement, "ppl": kl.ppl,
                         "ref_ppl": kl.reference_ppl, "tokens": kl.tokens_scored}
            del test
        del ref
        out.append(row)
        f, i = row["float32"], row["int16"]
        mix = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
        print(f"| {label} | {mix} | {f['kl_mean']:.2e} | {100 * f['top1']:.2f}% | {i['kl_mean']:.2e} | "
              f"{100 * i['top1']:.2f}% | {f['ref_ppl']:.3f} -> {i['ppl']:.3f} | {f['tokens']} |", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gemma", default=None, help="Gemma 3 270M Q4_K_M GGUF (default: /tmp/g3 or the test wheels)")
    ap.add_argument("--chunks", type=int, default=4, help="512-token chunks of WikiText-2 per KL run")
    ap.add_argument("--no-model", action="store_true", help="skip the SmolLM2 KL runs")
    ap.add_argument("--no-timing", action="store_true", help="skip the 262144-row timings")
    ap.add_argument("--types", default="Q8_0,Q5_0,Q5_1,Q4_K,Q5_K,Q6_K",
                    help="model runs: GGUF types, comma-separated (Q6_K-g16: Q6_K kept as int8 group 16)")
    ap.add_argument("--no-matrices", action="store_true", help="skip the per-matrix table and timings")
    ap.add_argument("--json", default=None, help="also write every number here")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    gemma = Path(args.gemma) if args.gemma else GEMMA if GEMMA.is_file() else None
    if gemma is None:
        from tiny_models import gemma3_gguf_path

        gemma = gemma3_gguf_path()
    results: dict = {"threads": torch.get_num_threads()}
    if not args.no_matrices:
        print(MATRIX_HEADER)
        results["matrices"] = matrix_rows(gemma)
        print()
        results["q6_k_group16"] = q6_k_group16(gemma)
    if not args.no_timing and not args.no_matrices:
        print("\n| type | shape | convert s | gguf dequant (float32) s |\n|---|---|---|---|")
        results["timing"] = timing_rows()
    if not args.no_model:
        print("\n| SmolLM2 as | matrices | KL, float32 acts | top-1 | KL, int16 acts | top-1 | ppl ref -> int16 | "
              "tokens |\n|---|---|---|---|---|---|---|---|")
        results["model"] = model_rows(args.chunks, args.types.split(","))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
