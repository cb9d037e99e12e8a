"""Embeddings: a prompt's final hidden states (after the final norm) pooled into one vector.

A pooling request is an ordinary request of max_tokens 0 that carries PoolingParams: the scheduler runs its
prompt like any other (chunked, batched, preempted and recomputed), the runner hands back the hidden rows it
needs (the last position, or every position for a mean), and the engine finishes it once the prompt is computed.
Any loaded decoder model can embed; models trained for it (Qwen3-Embedding: last token, L2-normalised) give
useful vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import torch

from jisu.errors import InvalidRequestError

POOLING_KINDS = ("last", "mean")


@dataclass
class PoolingParams:
    kind: str = "last"
    """'last': the last prompt token's hidden state (decoder embedders such as Qwen3-Embedding); 'mean': the
    average over every prompt token."""
    normalize: bool = True
    """Divide by the L2 norm (cosine similarity becomes a dot product)."""
    dimensions: int | None = None
    """Keep only the first this many dimensions (Matryoshka embeddings), before normalising; None keeps all."""

    def __post_init__(self) -> None:
        if self.kind not in POOLING_KINDS:
            raise InvalidRequestError(f"pooling must be one of {', '.join(POOLING_KINDS)}, got {self.kind!r}")
        if not isinstance(self.normalize, bool):
            raise InvalidRequestError(f"normalize must be true or false, got {self.normalize!r}")
        if self.dimensions is not None and (
            isinstance(self.dimensions, bool) or not isinstance(self.dimensions, Integral) or self.dimensions < 1
        ):
            raise InvalidRequestError(f"dimensions must be an integer >= 1 or null, got {self.dimensions!r}")


def pooled_vector(params: PoolingParams, pooled_sum: torch.Tensor, num_tokens: int, hidden_size: int) -> list[float]:
    """The embedding from the request's running sum (mean) or last row (last), as float32 values."""
    if params.dimensions is not None and params.dimensions > hidden_size:
        raise InvalidRequestError(f"dimensions {params.dimensions} exceeds the model's hidden size {hidden_size}")
    v = pooled_sum / num_tokens if params.kind == "mean" else pooled_sum
    if params.dimensions is not None:
        v = v[: params.dimensions]
    if params.normalize:
        v = v / v.norm().clamp_min(1e-12)
    return v.to(torch.float32).tolist()
