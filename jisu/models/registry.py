"""Architecture name (config.json "architectures") -> model class, imported only when used."""

from __future__ import annotations

import importlib

from jisu.errors import UnsupportedModelError

_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "jisu.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "jisu.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "jisu.models.llama:LlamaForCausalLM",
}


def model_class(architecture: str):
    try:
        module, _, name = _MODELS[architecture].partition(":")
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture {architecture!r}; jisu runs: {', '.join(_MODELS)}"
        ) from None
    return getattr(importlib.import_module(module), name)
