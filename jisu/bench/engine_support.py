"""What `jisu bench compare`'s engines share: the exception for an engine that cannot run a model, and the
roofline's weight format of a GGUF file as stored (for the engines that run it as it is)."""

from __future__ import annotations

from pathlib import Path


class EngineSkipped(Exception):
    """An engine that is installed but cannot run this model."""


def gguf_weight_format(path: Path):
    from jisu.loader.gguf import hf_tensor_name, open_gguf, read_metadata
    from jisu.models.arch import for_gguf
    from jisu.profile.roofline import WeightFormat

    reader = open_gguf(path)
    table = for_gguf(str(read_metadata(reader).get("general.architecture"))).gguf_tensors
    rows = [(hf_tensor_name(t.name, table), int(t.n_elements), int(t.n_bytes)) for t in reader.tensors]
    tied = not any(name == "lm_head.weight" for name, _, _ in rows)
    return WeightFormat.from_tensors([r for r in rows if r[0]], tied, name="GGUF as stored")
