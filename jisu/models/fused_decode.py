"""The whole decoder stack of a pure decode step as one C++ call (jisu/kernels/fused_decode.cpp).

NOTE: a batch-1 decode step of SmolLM2 runs ~25 small torch ops per layer; their dispatch costs more than the
layer's arithmetic once weights are 4-bit. For steps where every token is a decode (one new token per
sequence) and there are at most MAX_FUSED_SEQS sequences, `FusedDecoder` runs every layer (norms, projections
through the same `qweight_matvec` the eager `Linear` uses, rotary, the K/V cache write, attention, SwiGLU,
residuals) in C++ and returns the residual stream before the final norm, equal to the eager layers' output
within float32 rounding (tests/test_fused_decode.py).

Measured on SmolLM2-135M (int4 weights, 2 threads, quiet machine), one sequence, layer stack only, medians:
context 64: eager 11.8 ms, fused 5.2 ms, the 120 projections alone 4.9 ms; context 512: 15.0 vs 6.6 ms;
context 2048: 26.0 vs 11.8 ms (there attention is bound by reading the float32 K/V cache, ~94 MB a step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from jisu.kernels.build import cpu_linear_kernels
from jisu.runner.attention import AttentionMetadata

MAX_FUSED_SEQS = 128
"""The most sequences one fused call takes: the products inside run on the kernels' matrix-vector path, which
jisu's float32 kernel outruns torch's GEMM up to 128 rows (qlinear.cpp); larger batches take the eager layers.
NOTE: this was 16 (the old small-batch limit); steps of 17-128 decodes then paid the eager layers' ~25 ops a
layer. Measured (SmolLM2 Q4_1, 2 threads, 32-token prompts, 64 new tokens, decode tok/s of all sequences, two
rounds): 17 sequences 241/275 -> 322/339, 32: 254/300 -> 369/377, 64: 295/322 -> 420/440, 128: 307/320 ->
399/428."""
FUSED_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""KV caches the C++ attention reads (every dtype jisu offers; the narrow ones widen exactly to float32)."""


@contextmanager
def layer_by_layer(model: torch.nn.Module) -> Iterator[None]:
    """Every step runs the Python layers while inside: module hooks (the operator profiler, pruning's
    calibration statistics) see nothing of the fused C++ path. A model without one is left as it is."""
    before = getattr(model, "use_fused_decode", None)
    if before is None:
        yield
        return
    model.use_fused_decode = False
    try:
        yield
    finally:
        model.use_fused_decode = before


def supports(config) -> bool:
    """Whether the C++ stack computes this architecture's layers: pre-norm RMSNorm, SwiGLU, one RoPE table on
    every layer, one attention window for all layers. Others run their eager layers (a measured fallback, see
    docs/MODELS.md)."""
    return (
        not config.qk_norm
        and not config.sandwich_norm
        and not config.norm_unit_offset
        and config.hidden_act == "silu"
        and config.norm_type == "rms"
        and config.gated_mlp
        and not config.num_experts
        and not config.learned_positions
        and config.attn_softcap is None
        and len(config.attention_windows) == 1
        and config.rope_local_theta is None
        and not config.rope_layers
    )


class FusedDecoder:
    """Callable as `decoder(x, rotation, meta, kv_caches) -> hidden [D, hidden]` in place of
    `for layer, kv in zip(layers, kv_caches): x = layer(x, rotation, meta, kv)`, when `applies(meta, D)`."""

    def __init__(self, impl, num_layers: int):
        self._impl = impl
        self.num_layers = num_layers

    @classmethod
    def build(cls, model) -> FusedDecoder | None:
        """The fused stack for a loaded LlamaForCausalLM, or None where it cannot run: no C++ kernels, a Linear
        whose `kernel_weight` is not the C++ kernels' QWeight (torch's kernels are in use), or weights not float32
        on CPU."""
        kernels = cpu_linear_kernels()
        if kernels is None or not hasattr(kernels, "FusedDecoder"):
            return None
        layers = list(model.model.layers)
        if not layers:
            return None
        cfg = model.config
        if not supports(cfg):
            return None
        lists: dict[str, list] = {k: [] for k in ("input_norms", "qkv", "o", "post_norms", "gate_up", "down")}
        eps = layers[0].input_layernorm.eps
        scale = layers[0].self_attn.attn.scale
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not all(isinstance(getattr(lin, "kernel_weight", None), kernels.QWeight) for lin in linears):
                return None  # torch's kernels (floats, or int4 on torch's int4 kernel) run these layers
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            for norm in norms:
                w = norm.weight
                if w.device.type != "cpu" or w.dtype != torch.float32 or norm.eps != eps:
                    return None
            if attn.attn.scale != scale:
                return None
            lists["input_norms"].append(norms[0].weight.data.contiguous())
            lists["post_norms"].append(norms[1].weight.data.contiguous())
            for key, lin in zip(("qkv", "o", "gate_up", "down"), linears):
                lists[key].append(lin.kernel_weight)
        impl = kernels.FusedDecoder(
            **lists,
            eps=float(eps),
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.intermediate_size,
            scale=float(scale),
        )
        return cls(impl, len(layers))

    @staticmethod
    def applies(meta: AttentionMetadata, num_tokens: int, kv_caches=None) -> bool:
        """A pure decode step (no prefill chunk, every token a decode) of 1 to MAX_FUSED_SEQS sequences, over a
        KV cache the C++ attention reads (FUSED_KV_DTYPES)."""
        return (
            (kv_caches is None or kv_caches[0][0].dtype in FUSED_KV_DTYPES)
            and not meta.prefills
            and meta.num_decodes == num_tokens
            and 1 <= num_tokens <= MAX_FUSED_SEQS
            and meta.decode_gather is not None
        )

    def __call__(
        self, x: torch.Tensor, rotations: dict, meta: AttentionMetadata, kv_caches, final_norm=None
    ) -> torch.Tensor:
        """x [D, hidden] float32 (embeddings), rotations {'global': [D, 1, head_dim/2] complex} (the model's),
        kv_caches [(k, v)] per layer. Writes this step's K/V into the caches; returns the layers' output
        [D, hidden], passed through `final_norm` (the model's RMSNorm) when given."""
        return self._impl.forward(
            x,
            torch.view_as_real(rotations["global"]),
            meta.decode_gather,
            meta.decode_mask,
            meta.slot_mapping,
            [kv[0] for kv in kv_caches],
            [kv[1] for kv in kv_caches],
            None if final_norm is None else final_norm.applied_weight().data,
            0.0 if final_norm is None else float(final_norm.eps),
        )
