"""The Llama family (Llama, SmolLM2, Mistral, Qwen2): one decoder, differences carried by ModelConfig."""

from __future__ import annotations

import torch
from torch import nn

from jisu.errors import ModelLoadError
from jisu.models.config import ModelConfig
from jisu.kernels.build import cpu_linear_kernels
from jisu.kernels.torch_int4 import TorchInt4Kernels, TorchInt4Weight, torch_int4_available
from jisu.models.fused_decode import FusedDecoder
from jisu.models.layers import Linear, MergedLinear, QuantizedEmbedding, RMSNorm, SwiGLU
from jisu.quant.formats import QuantizedTensor, concat_rows
from jisu.quant.plan import unify
from jisu.models.rotary import ApplyRotary, RotaryEmbedding, pairs_adjacent
from jisu.runner.attention import AttentionMetadata, PagedAttention


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix, stored in-major: the layout for torch's kernels when jisu's are unavailable.

    NOTE: measured on this project's CPUs (AVX2, 2 threads), F.linear with one input row runs 1.4x faster on
    the 30 SmolLM2 layers and 2.2x faster on its 49152-row output layer when the weight's storage is
    [in, out], and about the same for larger batches. A tied output layer then gets its own copy rather than
    sharing the embedding's row-major storage.
    """
    return weight.t().contiguous().t()


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size,
            {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
            bias=config.attention_bias,
        )
        self.o_proj = Linear(q_size, config.hidden_size, bias=False)
        self.rotary = ApplyRotary()
        self.attn = PagedAttention(self.head_dim**-0.5)
        self.qk_size = q_size + kv_size

    def forward(self, x, rotation, meta: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor]):
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        # q and k of every head rotate together (their rows are stored with rotary pairs adjacent).
        qk = self.rotary(qkv[:, : self.qk_size].view(t, -1, self.head_dim), rotation)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.qk_size :].view(t, self.num_kv_heads, self.head_dim)
        o = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(o.reshape(t, -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, rotation, meta, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), rotation, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device="meta")
        self.rotary = RotaryEmbedding(config, max_positions)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions or config.max_position_embeddings)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.fused_decode = None
        """A FusedDecoder once weights are loaded on CPU kernels (None: every step runs layer by layer)."""
        self.use_fused_decode = True
        """Off while per-operator hooks are installed: the fused path runs no Python modules to hook."""

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        """Flattened tokens of a step -> final hidden states [T, hidden] (logits are computed separately,
        only for the rows that are sampled)."""
        x = self.model.embed_tokens(input_ids)
        rotation = self.model.rotary.for_positions(positions)
        fused = self.fused_decode
        if fused is not None and self.use_fused_decode and fused.applies(meta, x.shape[0], kv_caches):
            # A pure decode step of few sequences: every layer and the final norm in one C++ call (see
            # jisu/models/fused_decode.py).
            return fused(x, rotation, meta, kv_caches, final_norm=self.model.norm)
        for layer, kv in zip(self.model.layers, kv_caches):
            x = layer(x, rotation, meta, kv)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(
        self, tensors: dict, dtype: torch.dtype, device: torch.device, cpu_kernels: bool = True, act_bits: int = 16
    ) -> None:
        """Materialises every parameter from checkpoint tensors named as in Hugging Face. Tensors may be
        QuantizedTensor (see jisu/quant/plan.py): those matrices run on jisu's int8/int4 C++ kernels as they are, with
        activations rounded to int16 (act_bits 16) or kept float32 (32) at decode (see jisu/kernels/qlinear.h);
        where those are not in use (CUDA), int4 runs on torch's int4 kernel (jisu/kernels/torch_int4.py)."""
        kernels = None
        if cpu_kernels and device.type == "cpu" and dtype == torch.float32:
            kernels = cpu_linear_kernels()
        blocks = {n: t for n, t in tensors.items() if isinstance(t, QuantizedTensor)}
        if blocks and kernels is None:
            # Without jisu's C++ kernels only int4 runs, on torch's int4 kernel (the CUDA path).
            int8 = any(t.bits != 4 for t in blocks.values())
            why_not = "it runs int4 only" if int8 else torch_int4_available(device)
            if why_not:
                kinds = ", ".join(sorted({t.describe() for t in blocks.values()}))
                raise ModelLoadError(
                    f"{kinds} weights need jisu's C++ CPU kernels, which are not in use here (a CPU device, float32 "
                    f"compute and a C++ toolchain), or torch's int4 kernel ({why_not}); load float weights instead"
                )
        params = dict(self.named_parameters())
        filled: dict[str, torch.Tensor] = {}
        shards: dict[str, list] = {}
        # A fused matrix with any quantized shard is assembled quantized (float shards are converted).
        quantized_targets = {self._param_for(n)[0] for n in blocks}
        for name, tensor in tensors.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # older HF checkpoints store this buffer; it is recomputed from the config
            target, rows = self._param_for(name)
            if target not in params:
                raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
            want = params[target].shape if rows is None else (rows.stop - rows.start, *params[target].shape[1:])
            if tuple(want) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(want)}"
                )
            tensor = self._stored_layout(name, tensor)
            if target in quantized_targets:
                shards.setdefault(target, []).append((0 if rows is None else rows.start, tensor))
                continue
            if target not in filled:
                filled[target] = torch.empty(params[target].shape, dtype=dtype, device=device)
            dest = filled[target] if rows is None else filled[target][rows]
            dest.copy_(tensor)
        quantized = {t: concat_rows(unify([p for _, p in sorted(parts, key=lambda x: x[0])], t))
                     for t, parts in shards.items()}
        if self.config.tie_word_embeddings or "lm_head.weight" not in tensors:
            embed = "model.embed_tokens.weight"
            if embed in filled:
                filled["lm_head.weight"] = filled[embed]
            if embed in quantized:
                quantized["lm_head.weight"] = quantized[embed]
        missing = sorted(set(params) - set(filled) - set(quantized))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ModelLoadError(f"checkpoint lacks tensors: {shown}")
        for name, value in filled.items():
            module_name, _, attr = name.rpartition(".")
            module = self.get_submodule(module_name)
            if isinstance(module, Linear) and kernels is None and attr == "weight" and value.device.type == "cpu":
                value = column_major(value)
            setattr(module, attr, nn.Parameter(value, requires_grad=False))
        for name, value in quantized.items():
            module_name = name.rpartition(".")[0]
            module = self.get_submodule(module_name)
            if isinstance(module, nn.Embedding):
                self.model.embed_tokens = QuantizedEmbedding(value.to(device), dtype)
            else:
                module.weight = None
                module.quantized = value
                module.weight_format = value.describe()
        if kernels is not None:
            for module in self.modules():
                if isinstance(module, Linear):
                    bias = None if module.bias is None else module.bias.data
                    q = module.quantized
                    kw = q.to_kernel(kernels, bias) if q is not None else kernels.QWeight(32, module.weight.data, bias=bias)
                    kw.act_bits = act_bits
                    module.use_kernels(kernels, kw)
                    if q is not None and kw.repacked:
                        module.quantized = q.shape_only()  # keep one copy of the blocks: the kernels'
            embed = self.model.embed_tokens
            if isinstance(embed, QuantizedEmbedding):
                tied = quantized.get("lm_head.weight") is quantized.get("model.embed_tokens.weight")
                kw = self.lm_head.kernel_weight if tied else embed.quantized.to_kernel(kernels)
                embed.use_kernels(kernels, kw)
                if kw.repacked:
                    embed.quantized = embed.quantized.shape_only()
        elif quantized:
            for module in self.modules():
                if isinstance(module, Linear) and module.quantized is not None:
                    bias = None if module.bias is None else module.bias.data
                    module.use_kernels(TorchInt4Kernels, TorchInt4Weight(module.quantized, bias, device))
                    module.quantized = module.quantized.shape_only()  # torch's tiles are the only copy
        self.model.rotary.to(device)
        self.fused_decode = FusedDecoder.build(self)

    def set_activation_bits(self, bits: int) -> None:
        """Rounds int8/int4 products' activations to int16 (16) or keeps them float32 (32), on the eager layers and
        the fused stack alike: the fused stack holds its own copies of the matrices' settings, so it is rebuilt."""
        for m in self.modules():
            if getattr(m, "kernel_weight", None) is not None and hasattr(m.kernel_weight, "act_bits"):
                m.kernel_weight.act_bits = bits
        if self.fused_decode is not None:
            self.fused_decode = FusedDecoder.build(self)

    def _stored_layout(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """q/k projections are stored with rotary pairs adjacent (see RotaryEmbedding)."""
        leaf = name.rsplit(".", 2)[-2]
        heads = {"q_proj": self.config.num_attention_heads, "k_proj": self.config.num_key_value_heads}.get(leaf)
        if heads is None:
            return tensor
        if isinstance(tensor, QuantizedTensor):
            return tensor.map_rows(lambda rows: pairs_adjacent(rows, heads))
        return pairs_adjacent(tensor, heads)

    def _param_for(self, name: str) -> tuple[str, slice | None]:
        """Checkpoint name -> (parameter name, rows inside a merged projection or None)."""
        module_name, _, attr = name.rpartition(".")
        parent_name, _, leaf = module_name.rpartition(".")
        if parent_name:
            try:
                parent = self.get_submodule(parent_name)
            except AttributeError:
                return name, None
            for child_name, child in parent.named_children():
                if isinstance(child, MergedLinear) and leaf in child.shards:
                    return f"{parent_name}.{child_name}.{attr}", child.shard_rows(leaf)
        return name, None
