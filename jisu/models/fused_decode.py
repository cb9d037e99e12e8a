"""The whole decoder stack of a pure decode step as one C++ call (jisu/kernels/fused_decode.cpp).

NOTE: a batch-1 decode step of SmolLM2 runs ~25 small torch ops per layer; their dispatch costs more than the
layer's arithmetic once weights are 4-bit. For steps where every token is a decode (one new token per
sequence) and there are at most MAX_FUSED_SEQS sequences, `FusedDecoder` runs every layer (norms, projections
through the same `qweight_matvec` the eager `Linear` uses, rotary, the K/V cache write, attention, SwiGLU,
residuals) in C++ and returns the residual stream before the final norm, equal to the eager layers' output
within float32 rounding (tests/test_fused_decode.py). The layers that vary by architecture run there too (see
`supports`): Gemma 2/3's sandwich norms, GELU-tanh and attention softcap, q/k norms (Qwen3, Gemma 3), sliding and
global layers (each window's visible slots compacted once a step), two RoPE tables or none (SmolLM3's NoPE layers).

Measured on SmolLM2-135M (int4 weights, 2 threads, quiet machine), one sequence, layer stack only, medians:
context 64: eager 11.8 ms, fused 5.2 ms, the 120 projections alone 4.9 ms; context 512: 15.0 vs 6.6 ms;
context 2048: 26.0 vs 11.8 ms (there attention is bound by reading the float32 K/V cache, ~94 MB a step).

NOTE: Gemma 3 270M (Q4_K_M GGUF: layer matrices 45 int8 + 27 int4, 96 MB; output layer the Q8_0 embedding as
int8 262144 x 640, 178 MB), batch 1, 18-token prompt, 128 greedy tokens, 2 threads, quiet machine, two sets of 5
alternating runs (LLM.generate's metrics.decode_tokens_per_s, toggling `model.use_fused_decode`), medians:
decode 32.4 / 33.9 tok/s eager, 69.3 / 70.5 fused (same tokens). Step 30.4 / 28.3 -> 14.2 / 13.4 ms: the forward
(embedding, 18 layers, final norm) 21.6 / 21.1 -> 5.6 / 5.4 ms, the output layer 7.3 ms either way. That product
alone took 5.3 / 6.5 ms = 34 / 28 GB/s, what torch's sum over 512 MiB reads (30 / 28 GB/s): it is at memory
bandwidth, and now over half of a Gemma step.
On a loaded machine (load 3-14 on the 2 cores, other processes' threads) both paths had stretches of 0.7-1.3 s
steps: threads waiting at each barrier (fused: 10 a layer) or join (eager) on a descheduled team mate.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from jisu.kernels.build import cpu_linear_kernels
from jisu.models.layers import KERNEL_ACTIVATIONS
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


ACTIVATIONS = KERNEL_ACTIVATIONS
"""MLP gate activations the C++ computes (rowwise.h; the eager layers' GateAndMul takes them there too)."""


def supports(config) -> bool:
    """Whether the C++ stack computes this architecture's layers: RMSNorm (plain or Gemma's 1 + w, passed applied),
    pre-norm or sandwich norms, optional per-head q/k norms, a gated MLP with SiLU or GELU-tanh, dense layers,
    RoPE from one or two tables or none on some layers, any mix of attention windows, optional attention softcap.
    Others (LayerNorm, erf GELU, ungated or MoE MLPs, learned positions) run their eager layers."""
    return (
        config.hidden_act in ACTIVATIONS
        and config.norm_type == "rms"
        and config.gated_mlp
        and not config.num_experts
        and not config.learned_positions
    )


class FusedDecoder:
    """Callable as `decoder(x, rotations, meta, kv_caches) -> hidden [D, hidden]` in place of
    `for layer, kv in zip(layers, kv_caches): x = layer(x, rotations, meta, kv)`, when `applies(meta, D)`."""

    def __init__(self, impl, num_layers: int, rope_names: list[str], windows: list[int | None]):
        self._impl = impl
        self.num_layers = num_layers
        self._rope_names = rope_names
        """The rotation tables the layers use, in the order the C++ indexes them."""
        self._windows = windows
        """The attention windows the layers use, in the order the C++ indexes them."""

    @classmethod
    def build(cls, model) -> FusedDecoder | None:
        """The fused stack for a loaded decoder model, or None where it cannot run: an architecture `supports`
        declines, no C++ kernels, a Linear whose `kernel_weight` is not the C++ kernels' QWeight (torch's kernels
        are in use), or norm weights not float32 on CPU. Unit-offset norms are held as their applied 1 + w
        (a copy): a change to such a weight needs a new build, as set_activation_bits makes."""
        kernels = cpu_linear_kernels()
        if kernels is None or not hasattr(kernels, "FusedDecoder"):
            return None
        layers = list(model.model.layers)
        if not layers:
            return None
        cfg = model.config
        if not supports(cfg):
            return None
        keys = ("input_norms", "qkv", "o", "mlp_norms", "gate_up", "down", "attn_out_norms", "mlp_out_norms",
                "q_norms", "k_norms", "layer_rotation", "layer_window")
        lists: dict[str, list] = {k: [] for k in keys}
        eps = layers[0].input_layernorm.eps
        scale = layers[0].self_attn.attn.scale
        softcap = layers[0].self_attn.attn.softcap
        rope_names: list[str] = []
        windows: list[int | None] = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not all(isinstance(getattr(lin, "kernel_weight", None), kernels.QWeight) for lin in linears):
                return None  # torch's kernels (floats, or int4 on torch's int4 kernel) run these layers
            pre_attn, post_attn, pre_mlp, post_mlp = layer.norms()
            head_norms = (attn.q_norm, attn.k_norm) if attn.qk_norm else (None, None)
            weights = []
            for norm in (pre_attn, pre_mlp, post_attn, post_mlp, *head_norms):
                if norm is None:
                    weights.append(None)
                    continue
                w = norm.applied_weight()  # Gemma's 1 + w: the C++ multiplies by what it is given
                if w.device.type != "cpu" or w.dtype != torch.float32 or norm.eps != eps:
                    return None
                weights.append(w.data.contiguous())
            if attn.attn.scale != scale or attn.attn.softcap != softcap:
                return None
            for key, w in zip(("input_norms", "mlp_norms", "attn_out_norms", "mlp_out_norms", "q_norms", "k_norms"),
                              weights):
                if w is not None:
                    lists[key].append(w)
            for key, lin in zip(("qkv", "o", "gate_up", "down"), linears):
                lists[key].append(lin.kernel_weight)
            if attn.rope is None:
                lists["layer_rotation"].append(-1)
            else:
                if attn.rope not in rope_names:
                    rope_names.append(attn.rope)
                lists["layer_rotation"].append(rope_names.index(attn.rope))
            if attn.attn.window not in windows:
                windows.append(attn.attn.window)
            lists["layer_window"].append(windows.index(attn.attn.window))
        impl = kernels.FusedDecoder(
            **lists,
            eps=float(eps),
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.intermediate_size,
            scale=float(scale),
            activation=cfg.hidden_act,
            attn_softcap=0.0 if softcap is None else float(softcap),
        )
        return cls(impl, len(layers), rope_names, windows)

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
        """x [D, hidden] float32 (embeddings, scaled where the model scales them), rotations {'global': [D, 1,
        head_dim/2] complex, 'local': ...} (the model's), meta the step's (its by_window for layers of other
        windows), kv_caches [(k, v)] per layer. Writes this step's K/V into the caches; returns the layers' output
        [D, hidden], passed through `final_norm` (the model's RMSNorm) when given."""
        # One window for every layer: the step's own indices (built for that window).
        metas = [meta] if len(self._windows) == 1 else [meta.for_window(w) for w in self._windows]
        return self._impl.forward(
            x,
            [torch.view_as_real(rotations[name]) for name in self._rope_names],
            [m.decode_gather for m in metas],
            [m.decode_mask for m in metas],
            meta.slot_mapping,
            [kv[0] for kv in kv_caches],
            [kv[1] for kv in kv_caches],
            None if final_norm is None else final_norm.applied_weight().data,
            0.0 if final_norm is None else float(final_norm.eps),
        )
