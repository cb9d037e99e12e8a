"""Write a model as a Hugging Face folder that jisu's own loader (and transformers) reads back.

The folder holds what `save_pretrained` writes for a Llama-family model:

- config.json: every field ModelConfig.from_hf_dict reads (head_dim, rope settings, tie_word_embeddings and
  the eos/bos ids always explicit, so a pruned model whose head count no longer divides hidden_size reads back
  unchanged), plus model_type / torch_dtype / hidden_act for transformers; `extra_config` is merged in last
  (e.g. a quantization_config).
- model.safetensors: the tensors exactly as given (any dtype, any name: quantized layers may be stored as
  X.qweight / X.scales / X.zeros), with `metadata` (string -> string) in the safetensors header. A tied
  lm_head is not written (the embedding is the output layer).
- tokenizer.json, tokenizer_config.json (add_bos_token / add_eos_token, the special token strings, the chat
  template) and generation_config.json (bos / eos ids).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, processors

from jisu.errors import InvalidRequestError, ModelLoadError
from jisu.loader.checkpoint import Checkpoint, TokenizerSpec
from jisu.models.config import ModelConfig

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
WEIGHTS_NAME = "model.safetensors"
# Files a loader would read from the folder besides the ones written here; overwrite=True removes them so
# nothing stale (another shard, an index, a chat template file that wins over tokenizer_config) survives.
_STALE = ("model.safetensors.index.json", "chat_template.jinja", "chat_template.json", "special_tokens_map.json")
_WRITTEN = ("config.json", WEIGHTS_NAME, "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    checkpoint: Checkpoint,
    metadata: dict[str, str] | None = None,
    extra_config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """save_hf_folder for a whole Checkpoint."""
    return save_hf_folder(
        out_dir, checkpoint.config, checkpoint.tensors, checkpoint.tokenizer, metadata, extra_config, overwrite
    )


def save_hf_folder(
    out_dir: str | os.PathLike[str],
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    tokenizer: TokenizerSpec,
    metadata: dict[str, str] | None = None,
    extra_config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and generation_config.json
    into `out_dir` (created if missing) and returns its path.

    `metadata` goes into the safetensors header (keys and values must be strings; "format": "pt" is added
    as transformers expects). A folder that already holds a model is refused unless `overwrite`, which then
    also removes the files a loader would otherwise pick up beside the new ones (other *.safetensors shards,
    an index, chat_template.jinja / .json, special_tokens_map.json).
    """
    out = Path(out_dir)
    header = _check_metadata(metadata)
    if extra_config is not None and not isinstance(extra_config, dict):
        raise InvalidRequestError(f"extra_config must be a dict, got {type(extra_config).__name__}")
    weights = _weights_to_write(config, tensors)

    config_dict = hf_config_dict(config, _dominant_float_dtype(weights))
    tok_cfg = tokenizer_config_dict(tokenizer, config)
    # jisu's HF loader takes BOS/EOS from the tokenizer files first and config.json after; keep them agreeing.
    if "bos_token" not in tok_cfg and tokenizer.bos_token_id is not None:
        config_dict["bos_token_id"] = tokenizer.bos_token_id
    eos = list(dict.fromkeys(tuple(tokenizer.eos_token_ids) + tuple(config.eos_token_ids)))
    config_dict["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    config_dict.update(extra_config or {})
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": list(tokenizer.eos_token_ids)}
    _prepare_folder(out, overwrite)

    from safetensors.torch import save_file

    tmp = out / (WEIGHTS_NAME + ".tmp")
    try:
        save_file(weights, str(tmp), metadata=header)
        os.replace(tmp, out / WEIGHTS_NAME)
    finally:
        tmp.unlink(missing_ok=True)
    _write_json(out / "config.json", config_dict)
    _tokenizer_for_saving(tokenizer).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tok_cfg)
    _write_json(out / "generation_config.json", generation)
    return out


# ----------------------------------------------------------------------------- config.json


def hf_config_dict(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """config.json for `config`: ModelConfig.from_hf_dict of it gives `config` back exactly."""
    if config.architecture not in _MODEL_TYPES:
        raise InvalidRequestError(
            f"cannot save architecture {config.architecture!r}; jisu saves {', '.join(_MODEL_TYPES)}"
        )
    eos = list(config.eos_token_ids)
    d: dict[str, Any] = {
        "architectures": [config.architecture],
        "model_type": _MODEL_TYPES[config.architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": False,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "torch_dtype": torch_dtype,
    }
    if config.architecture == "MistralForCausalLM":
        d["sliding_window"] = config.sliding_window
    if config.architecture == "Qwen2ForCausalLM":
        d["use_sliding_window"] = False
        d["sliding_window"] = None
    return d


def _dominant_float_dtype(tensors: dict[str, torch.Tensor]) -> str:
    counts: Counter[str] = Counter()
    for t in tensors.values():
        if t.dtype in _DTYPE_NAMES:
            counts[_DTYPE_NAMES[t.dtype]] += t.numel()
    return counts.most_common(1)[0][0] if counts else "float32"


# ----------------------------------------------------------------------------- tokenizer files


def tokenizer_config_dict(spec: TokenizerSpec, config: ModelConfig | None = None) -> dict[str, Any]:
    """tokenizer_config.json: explicit add_bos_token / add_eos_token (jisu's HF loader and transformers both
    let these win over tokenizer.json's post-processor), the special token strings and the chat template."""
    d: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(spec.add_bos_token),
        "add_eos_token": bool(spec.add_eos_token),
        "clean_up_tokenization_spaces": False,
    }
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if spec.special_tokens.get(name):
            d[name] = spec.special_tokens[name]
    if spec.chat_template is not None:
        d["chat_template"] = spec.chat_template
    if config is not None:
        d["model_max_length"] = config.max_position_embeddings
    return d


def _tokenizer_for_saving(spec: TokenizerSpec) -> Tokenizer:
    """A copy of the tokenizer whose post-processor adds BOS/EOS as add_bos_token/add_eos_token say, so that
    transformers' tokenizer(text) gives the engine's ids too (jisu's loader drops the post-processor and reads
    the flags). The spec's own tokenizer is left as it is."""
    tok = Tokenizer.from_str(spec.tokenizer.to_str())
    bos = _token_text(tok, spec.bos_token_id) if spec.add_bos_token else None
    eos_id = spec.eos_token_ids[0] if spec.add_eos_token and spec.eos_token_ids else None
    eos = _token_text(tok, eos_id)
    if bos is None and eos is None:
        tok.post_processor = None
        return tok
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    specials = [(t, i) for t, i in ((bos, spec.bos_token_id), (eos, eos_id)) if t is not None]
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=list(dict.fromkeys(specials))
    )
    return tok


def _token_text(tok: Tokenizer, token_id: int | None) -> str | None:
    return tok.id_to_token(token_id) if token_id is not None else None


# ----------------------------------------------------------------------------- tensors and files


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    header = {"format": "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequestError(
                f"safetensors metadata must map strings to strings; {key!r} -> {value!r} is "
                f"{type(key).__name__} -> {type(value).__name__}"
            )
        header[key] = value
    return header


def _weights_to_write(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors wants them: CPU, contiguous, each owning its storage (safetensors refuses
    tensors that share memory, e.g. slices of one matrix or an lm_head that is the embedding)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise InvalidRequestError(f"tensors must map names to torch tensors; got {name!r} -> {type(t).__name__}")
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the embedding is the output layer, written once
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        whole = storage.nbytes() == t.numel() * t.element_size() and t.storage_offset() == 0
        if not whole or storage.data_ptr() in seen:
            t = t.clone()
            storage = t.untyped_storage()
        seen.add(storage.data_ptr())
        out[name] = t
    return out


def check_output_folder(out_dir: str | os.PathLike[str], overwrite: bool = False) -> list[Path]:
    """Raise ModelLoadError if save_hf_folder would refuse `out_dir`; returns the model files already there."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ModelLoadError(f"cannot save the model to {out}: it exists and is not a folder")
    if not out.is_dir():
        return []
    present = [p for p in out.iterdir() if p.name in _WRITTEN or p.name in _STALE or p.suffix == ".safetensors"]
    if present and not overwrite:
        raise ModelLoadError(
            f"{out} already holds a model ({', '.join(sorted(p.name for p in present))}); choose another folder "
            "or overwrite it (overwrite=True; --overwrite on the command line)"
        )
    return present


def _prepare_folder(out: Path, overwrite: bool) -> None:
    present = check_output_folder(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for p in present:
        if p.name in _STALE or p.suffix == ".safetensors":
            p.unlink()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
