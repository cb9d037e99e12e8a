"""Speculative decoding: proposers of draft tokens (prompt lookup, a draft model) and their verification by the
target model in one batched forward, with rejection sampling (jisu/spec_decode/rejection.py).

SpeculativeConfig takes vLLM's `speculative_config` names; Speculator is what the engine drives each step.
"""

from jisu.spec_decode.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
