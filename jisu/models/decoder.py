"""The decoder every architecture runs: embedding, N x (attention with a paged KV cache, MLP), final norm, output
layer. ModelConfig's fields switch what varies (q/k norms, sandwich norms, the MLP's activation, sliding-window
layers, soft-capping, scaled embeddings, partial rotary); jisu/models/arch/ maps each architecture onto them."""

from __future__ import annotations

import torch
from torch import nn

from jisu.models.config import ModelConfig
from jisu.models.fused_decode import FusedDecoder
from jisu.models.layers import Linear, MergedLinear, make_mlp, make_norm
from jisu.models.rotary import ApplyRotary, RotaryEmbedding
from jisu.models.weights import load_weights
from jisu.runner.attention import AttentionMetadata, PagedAttention, prefill_kernels


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
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
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = make_norm(config, self.head_dim)
            self.k_norm = make_norm(config, self.head_dim)
        self.qk_norm = config.qk_norm
        self.rope = config.layer_rope(layer)
        """Which of the step's rotations this layer applies ('global', 'local'), or None."""
        self.rotary = ApplyRotary()
        self.attn = PagedAttention(config.scale, config.attn_softcap, config.layer_window(layer))
        self.qk_size = q_size + kv_size

    def forward(self, x, rotations: dict, meta: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor]):
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.qk_size].view(t, -1, self.head_dim)
        if self.qk_norm:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        if self.rope is not None:
            # q and k of every head rotate together (their rows are stored with rotary pairs adjacent).
            qk = self.rotary(qk, rotations[self.rope])
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.qk_size :].view(t, self.num_kv_heads, self.head_dim)
        o = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(o.reshape(t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer)
        # Llama's post_attention_layernorm is the MLP's input norm; Gemma's follows attention, before the residual
        # add, and Gemma has a pre- and a post-MLP norm besides (names as in the checkpoints).
        self.post_attention_layernorm = make_norm(config)
        self.sandwich = config.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = make_norm(config)
            self.post_feedforward_layernorm = make_norm(config)
        self.mlp = make_mlp(config, layer)

    def norms(self) -> tuple[nn.Module, nn.Module | None, nn.Module, nn.Module | None]:
        """(before attention, after attention, before the MLP, after the MLP); None where there is none."""
        if self.sandwich:
            return (self.input_layernorm, self.post_attention_layernorm, self.pre_feedforward_layernorm,
                    self.post_feedforward_layernorm)
        return self.input_layernorm, None, self.post_attention_layernorm, None

    def forward(self, x, rotations, meta, kv_cache):
        pre_attn, post_attn, pre_mlp, post_mlp = self.norms()
        h = self.self_attn(pre_attn(x), rotations, meta, kv_cache)
        x = x + (post_attn(h) if post_attn is not None else h)
        h = self.mlp(pre_mlp(x))
        return x + (post_mlp(h) if post_mlp is not None else h)


def _meta_embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding on the meta device, its weight left uninitialised (the loader fills it).
    NOTE: nn.Embedding(..., device="meta") runs init.normal_ on the meta tensor, whose Python reference
    implementation imports torch._dynamo: about 1-2 s of every start-up for nothing (issue 25)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim, device="meta"))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = _meta_embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.embed_scale
        self.embed_positions = None
        if config.learned_positions:  # GPT-2's absolute positions, added to the token embeddings
            self.embed_positions = _meta_embedding(config.max_position_embeddings, config.hidden_size)
        self.rotary = RotaryEmbedding(config, max_positions)
        uses = {config.layer_rope(i) for i in range(config.num_hidden_layers)}
        self.rotary_local = None
        if "local" in uses:  # Gemma 3's sliding layers: their own base, no scaling
            local = config.with_rope(theta=config.rope_local_theta, scaling=None)
            self.rotary_local = RotaryEmbedding(local, max_positions)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)

    def rotations(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's rotations, one table lookup per kind of layer."""
        out = {"global": self.rotary.for_positions(positions)}
        if self.rotary_local is not None:
            out["local"] = self.rotary_local.for_positions(positions)
        return out


class DecoderForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, max_positions or config.max_position_embeddings)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.fused_decode = None
        """A FusedDecoder once weights are loaded on CPU kernels (None: every step runs layer by layer)."""
        self.use_fused_decode = True
        """Off while per-operator hooks are installed: the fused path runs no Python modules to hook."""
        self.attention_kernels = None
        """jisu's C++ kernels once weights are loaded where prefill chunks can attend in them (CPU, float32,
        cpu_kernels on); the runner passes them to attention in each step's metadata."""

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        """Flattened tokens of a step -> final hidden states [T, hidden] (logits are computed separately,
        only for the rows that are sampled)."""
        x = self.model.embed_tokens(input_ids)
        if self.model.embed_scale is not None:
            x = x * self.model.embed_scale
        if self.model.embed_positions is not None:
            x = x + self.model.embed_positions(positions)
        rotations = self.model.rotations(positions)
        fused = self.fused_decode
        if fused is not None and self.use_fused_decode and fused.applies(meta, x.shape[0], kv_caches):
            # A pure decode step of few sequences: every layer and the final norm in one C++ call (see
            # jisu/models/fused_decode.py).
            return fused(x, rotations, meta, kv_caches, final_norm=self.model.norm)
        for layer, kv in zip(self.model.layers, kv_caches):
            x = layer(x, rotations, meta, kv)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(
        self, tensors: dict, dtype: torch.dtype, device: torch.device, cpu_kernels: bool = True, act_bits: int = 16
    ) -> None:
        """Materialises every parameter from checkpoint tensors (see jisu/models/weights.py)."""
        load_weights(self, tensors, dtype, device, cpu_kernels, act_bits)
        self.fused_decode = FusedDecoder.build(self)
        self.attention_kernels = prefill_kernels(device, dtype, cpu_kernels)

    def set_activation_bits(self, bits: int) -> None:
        """Rounds int8/int4 products' activations to int16 (16), int4's to int8 (8), or keeps them float32 (32), on
        the eager layers and the fused stack alike: the fused stack holds its own copies of the matrices' settings,
        so it is rebuilt."""
        for m in self.modules():
            if getattr(m, "kernel_weight", None) is not None and hasattr(m.kernel_weight, "act_bits"):
                m.kernel_weight.act_bits = bits
        if self.fused_decode is not None:
            self.fused_decode = FusedDecoder.build(self)
