"""Every architecture jisu runs, one module each (config mapping, GGUF name table, fix-ups); looked up by the
name a config.json or a GGUF file gives. Modules are imported only when their architecture is asked for."""

from __future__ import annotations

import importlib

from jisu.errors import UnsupportedModelError
from jisu.models.arch.base import Architecture

# config.json "architectures" entry -> module under jisu.models.arch.
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma",
    "Gemma3ForCausalLM": "gemma",
    "GPT2LMHeadModel": "gpt2",
    "Phi3ForCausalLM": "phi3",
    "SmolLM3ForCausalLM": "smollm3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
# GGUF general.architecture -> module.
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "llama",
    "qwen3": "qwen3",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gpt2": "gpt2",
    "phi3": "phi3",
    "smollm3": "smollm3",
    "qwen3moe": "qwen3_moe",
}
# GGUF general.architecture values llama.cpp also writes for a mixture-of-experts model, which it tells apart by
# `{arch}.expert_count` being set -> that model's config.json architecture.
GGUF_MOE_ARCHITECTURES: dict[str, str] = {
    "llama": "MixtralForCausalLM",
}


def _module(name: str):
    return importlib.import_module(f"jisu.models.arch.{name}")


def for_hf(architecture: str) -> Architecture:
    """The Architecture of a config.json "architectures" entry."""
    module = HF_ARCHITECTURES.get(architecture)
    if module is None:
        raise UnsupportedModelError(
            f"unsupported architecture {architecture!r}; jisu runs: {', '.join(HF_ARCHITECTURES)}"
        )
    return _module(module).ARCHITECTURES[architecture]


def for_gguf(gguf_architecture: str, metadata: dict | None = None) -> Architecture:
    """The Architecture of a GGUF general.architecture value; with the file's `metadata`, a "llama" file holding
    experts is Mixtral."""
    module = GGUF_ARCHITECTURES.get(gguf_architecture)
    if module is None:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {gguf_architecture!r}; jisu runs GGUF architectures "
            f"{', '.join(GGUF_ARCHITECTURES)}"
        )
    moe = GGUF_MOE_ARCHITECTURES.get(gguf_architecture)
    if moe is not None and metadata and metadata.get(f"{gguf_architecture}.expert_count"):
        return for_hf(moe)
    return _module(module).GGUF[gguf_architecture]
