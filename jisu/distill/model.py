"""A trainable copy of a Llama-family decoder: the same arithmetic as the engine's float path, written for
whole [batch, time] sequences with autograd instead of a paged KV cache.

Distillation needs gradients through every layer, which the engine's inference modules (fused kernels, paged
attention, in-place buffers) do not give. This module holds the weights under their Hugging Face names (its
state_dict keys are those names), so a trained student goes straight back into a Checkpoint and from there
into every jisu command. tests/test_distill.py checks its logits against the engine's on the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jisu.errors import UnsupportedModelError
from jisu.models.config import ModelConfig
from jisu.models.rotary import inverse_frequencies

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# ModelConfig fields whose non-default values this module does not implement, with the default it needs.
_PLAIN = {"sandwich_norm": False, "norm_unit_offset": False, "embed_scale": None, "attn_softcap": None,
          "final_softcap": None, "rope_local_theta": None, "rotary_dim": None, "rope_layers": (), "o_bias": False,
          "mlp_bias": False, "norm_type": "rms", "gated_mlp": True, "learned_positions": False, "num_experts": 0}
_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def check_trainable(config: ModelConfig, role: str = "model") -> None:
    """Raises UnsupportedModelError naming what this trainer cannot run."""
    if config.architecture not in SUPPORTED:
        raise UnsupportedModelError(f"jisu distill trains {', '.join(SUPPORTED)} models; the {role} is "
                                    f"{config.architecture}")
    for name, plain in _PLAIN.items():
        if getattr(config, name) != plain:
            raise UnsupportedModelError(f"jisu distill cannot train the {role}: its config sets {name}="
                                        f"{getattr(config, name)!r}, which the trainer does not implement")
    if config.hidden_act not in _ACTIVATIONS:
        raise UnsupportedModelError(f"jisu distill cannot train the {role}: activation {config.hidden_act!r}; "
                                    f"supported: {', '.join(_ACTIVATIONS)}")


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _linear(tensors: dict, name: str, bias: bool = False) -> nn.Linear:
    w = tensors[f"{name}.weight"]
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias, device="meta")
    layer.weight = nn.Parameter(w)
    if bias:
        layer.bias = nn.Parameter(tensors[f"{name}.bias"])
    return layer


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tensors: dict, prefix: str, window: int | None):
        super().__init__()
        bias = config.attention_bias
        self.q_proj = _linear(tensors, prefix + "q_proj", bias)
        self.k_proj = _linear(tensors, prefix + "k_proj", bias)
        self.v_proj = _linear(tensors, prefix + "v_proj", bias)
        self.o_proj = _linear(tensors, prefix + "o_proj")
        if config.qk_norm:
            self.q_norm = RMSNorm(tensors[prefix + "q_norm.weight"], config.rms_norm_eps)
            self.k_norm = RMSNorm(tensors[prefix + "k_norm.weight"], config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scale = config.scale
        self.window = window

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = _rotate(q.transpose(1, 2), cos, sin)
        k = _rotate(k.transpose(1, 2), cos, sin)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        if self.window is not None and t > self.window:
            i = torch.arange(t, device=x.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Hugging Face layout: dimension i pairs with i + head_dim/2 ("rotate half").
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tensors: dict, prefix: str):
        super().__init__()
        self.gate_proj = _linear(tensors, prefix + "gate_proj")
        self.up_proj = _linear(tensors, prefix + "up_proj")
        self.down_proj = _linear(tensors, prefix + "down_proj")
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, config: ModelConfig, tensors: dict, n: int):
        super().__init__()
        p = f"model.layers.{n}."
        self.input_layernorm = RMSNorm(tensors[p + "input_layernorm.weight"], config.rms_norm_eps)
        self.self_attn = Attention(config, tensors, p + "self_attn.", config.layer_window(n))
        self.post_attention_layernorm = RMSNorm(tensors[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
        self.mlp = MLP(config, tensors, p + "mlp.")

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, config: ModelConfig, tensors: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(tensors["model.embed_tokens.weight"], freeze=False)
        self.layers = nn.ModuleList(Layer(config, tensors, n) for n in range(config.num_hidden_layers))
        self.norm = RMSNorm(tensors["model.norm.weight"], config.rms_norm_eps)


class TrainableLM(nn.Module):
    """forward(ids [B, T]) -> logits [B, T, vocab] (and, on request, each layer's output hidden state)."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], role: str = "model"):
        super().__init__()
        check_trainable(config, role)
        # Own float32 copies: training writes into them, and the source checkpoint must stay as it was.
        tensors = {n: t.detach().to(torch.float32, copy=True) for n, t in tensors.items()}
        self.config = config
        self.model = Body(config, tensors)
        self.tied = config.output_is_tied(tensors)
        if not self.tied:
            self.lm_head = _linear(tensors, "lm_head")
        inv_freq, self.attention_factor = inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.tied else self.lm_head.weight

    def forward(self, ids: torch.Tensor, hidden_states: bool = False):
        t = ids.shape[1]
        angles = torch.outer(torch.arange(t, dtype=torch.float32, device=ids.device), self.inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
        x = self.model.embed_tokens(ids)
        hiddens = []
        for layer in self.model.layers:
            x = layer(x, cos, sin)
            if hidden_states:
                hiddens.append(x)
        logits = F.linear(self.model.norm(x), self.output_weight())
        return (logits, hiddens) if hidden_states else logits

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """The weights under their Hugging Face names, detached (a tied output layer is the embedding)."""
        return {name: p.detach().clone() for name, p in self.state_dict().items()}
