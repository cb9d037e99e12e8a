"""What a loader hands to the engine: a model config, tensors under Hugging Face names, a tokenizer spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer

from jisu.models.config import ModelConfig


@dataclass
class TokenizerSpec:
    """Everything needed to tokenize exactly as the model's own tokenizer does."""

    tokenizer: HFTokenizer
    """A `tokenizers` object whose encode(text, add_special_tokens=False) gives the model's token ids."""
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos_token: bool
    """Prepend BOS to a plain prompt (as the model's own tokenizer does by default)."""
    add_eos_token: bool = False
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    """Named special token strings for the chat template: bos_token, eos_token, unk_token, pad_token."""


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    """Hugging Face parameter names -> tensors (float32, float16 or bfloat16; quantized GGUF is dequantized)."""
    tokenizer: TokenizerSpec
    source: str
    """Path the checkpoint came from, for messages."""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ties_output(self) -> bool:
        """Whether the output layer multiplies by the embedding matrix (the config says so, or there is no
        lm_head.weight); ModelConfig.output_is_tied is the one rule."""
        return self.config.output_is_tied(self.tensors)
