"""Architecture name (config.json "architectures") -> model class, imported only when used."""

from __future__ import annotations


def model_class(architecture: str):
    """The class that runs `architecture` (every architecture runs jisu/models/decoder.py's decoder, switched by
    its ModelConfig); raises UnsupportedModelError for one jisu does not run."""
    from jisu.models.arch import for_hf

    for_hf(architecture)
    from jisu.models.decoder import DecoderForCausalLM

    return DecoderForCausalLM
