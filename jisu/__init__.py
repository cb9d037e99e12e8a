"""jisu (极速): an LLM inference engine that shows where every millisecond goes."""

from jisu.errors import InvalidRequestError, JisuError, ModelLoadError, UnsupportedModelError

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "PoolingParams", "JisuError", "ModelLoadError", "UnsupportedModelError", "InvalidRequestError"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import jisu` (and `jisu --help`) does not pay for importing torch.
    if name == "LLM":
        from jisu.llm import LLM

        return LLM
    if name == "SamplingParams":
        from jisu.sampling_params import SamplingParams

        return SamplingParams
    if name == "StructuredOutputsParams":
        from jisu.structured import StructuredOutputsParams

        return StructuredOutputsParams
    if name == "PoolingParams":
        from jisu.pooling import PoolingParams

        return PoolingParams
    raise AttributeError(f"module 'jisu' has no attribute {name!r}")
