"""A cache of converted GGUF checkpoints: what load_gguf(keep_blocks=True) makes of a file (config, tokenizer,
tensors as jisu's int8 / int4 blocks), stored once under cache_dir()/converted and memory-mapped on later loads.

NOTE (issue 25): start-up of the default model (SmolLM2-135M Q4_1) spent most of its time before the first forward
reading the GGUF: gguf's reader builds a numpy view per vocabulary entry and merge (~250k of them), then the
tokenizer is built and every matrix converted. A hit here skips all of that and never imports the gguf package: the
header is one JSON document, the tokenizer its own JSON (tokenizers' from_str), and each tensor a page-aligned
range of the file mapped copy-on-write, so its pages are read only when used and go back with the tensor (the
kernels keep their own repacked copy of int4 blocks, and drop the mapped one).

An entry is valid only for the same file: its real path, size, modification time (ns), inode and device, and a
digest of the code that converts files (the loader's GGUF modules, the architecture modules, the block formats)
and the tokenizers version. Anything else (a changed file, a changed jisu, a damaged entry) is a miss: the file is
converted again and the entry rewritten (atomically: written to a temporary file, then renamed). One entry per
source path. JISU_CONVERTED_CACHE=0 turns the cache off; it costs disk about the size of the GGUF file.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import mmap
import os
import struct
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from jisu.loader.checkpoint import Checkpoint, TokenizerSpec
from jisu.models.config import ModelConfig
from jisu.quant.formats import QuantizedTensor

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""The layout of an entry; part of every entry's key (bump it when the layout changes)."""
MIN_FILE_BYTES = 8 << 20
"""Smaller GGUF files are not cached: they load in well under a second, and tests write thousands of them."""
ENV_SWITCH = "JISU_CONVERTED_CACHE"
_MAGIC = b"JISUCKPT"
_ALIGN = mmap.ALLOCATIONGRANULARITY  # each tensor its own mapping, so its pages go back when it does
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
)}  # fmt: skip
_QUANT_PARTS = ("qweight", "scales", "zeros", "outlier_cols", "outlier_weights")
# The code that decides what a file converts to: a change in any of it makes every entry a miss.
_CODE = ("loader/gguf.py", "loader/gguf_blocks.py", "loader/gguf_tokenizer.py", "loader/converted_cache.py",
         "models/config.py", "quant/formats.py")
_code_digest: str | None = None


def enabled(path: Path) -> bool:
    """Whether loads of `path` go through the cache (JISU_CONVERTED_CACHE unset or not '0', file large enough)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        return path.stat().st_size >= MIN_FILE_BYTES
    except OSError:
        return False


def entry_path(path: Path) -> Path:
    """Where the entry for the GGUF file at `path` lives (one per real path)."""
    from jisu.loader.resolve import cache_dir

    real = os.path.realpath(path)
    return cache_dir() / "converted" / f"{hashlib.sha256(real.encode()).hexdigest()[:32]}.jisu"


def load_gguf_cached(path: Path, progress: Callable[[int, int, str], None] | None = None) -> Checkpoint:
    """load_gguf(path, keep_blocks=True), from the cache when it holds this very file, else converted and stored."""
    path = Path(path)
    entry = entry_path(path)
    key = _source_key(path)
    if key is not None:
        hit = read_entry(entry, key, str(path))
        if hit is not None:
            if progress is not None:
                progress(1, 1, f"loading {path.name} (converted, cached)")
            return hit
    from jisu.loader.gguf import load_gguf_with_config

    checkpoint, hf_config, names = load_gguf_with_config(path, progress, keep_blocks=True)
    if key is not None and key == _source_key(path):  # unchanged while it was read
        write_entry(entry, key, checkpoint, hf_config, names)
    return checkpoint


def _source_key(path: Path) -> dict[str, Any] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    import tokenizers

    return {
        "format": FORMAT_VERSION, "code": code_digest(), "tokenizers": tokenizers.__version__,
        "path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
        "dev": st.st_dev,
    }


def code_digest() -> str:
    global _code_digest
    if _code_digest is None:
        root = Path(__file__).resolve().parent.parent
        files = [root / c for c in _CODE] + sorted((root / "models" / "arch").glob("*.py"))
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        _code_digest = h.hexdigest()[:24]
    return _code_digest


# ----------------------------------------------------------------------------- writing


def write_entry(entry: Path, key: dict, checkpoint: Checkpoint, hf_config: dict, names: dict) -> bool:
    """Stores `checkpoint` at `entry`; False (and a log line) where it cannot, e.g. a read-only cache folder."""
    parts: list[torch.Tensor] = []

    def part(t: torch.Tensor | None) -> dict | None:
        if t is None:
            return None
        parts.append(t)
        return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "index": len(parts) - 1}

    tensors: dict[str, Any] = {}
    for name, t in checkpoint.tensors.items():
        if isinstance(t, QuantizedTensor):
            tensors[name] = {"kind": "quantized", "bits": t.bits, "group_size": t.group_size, "origin": t.origin,
                             "fidelity": t.fidelity, **{p: part(getattr(t, p)) for p in _QUANT_PARTS}}
        elif isinstance(t, torch.Tensor) and str(t.dtype).removeprefix("torch.") in _DTYPES:
            tensors[name] = {"kind": "tensor", "data": part(t)}
        else:
            return False  # nothing jisu's GGUF loader makes; not worth a format
    spec = checkpoint.tokenizer
    header = {
        "key": key, "config": hf_config, "field_names": names, "metadata": checkpoint.metadata,
        "tokenizer": {"json": spec.tokenizer.to_str(), "bos_token_id": spec.bos_token_id,
                      "eos_token_ids": list(spec.eos_token_ids), "add_bos_token": spec.add_bos_token,
                      "add_eos_token": spec.add_eos_token, "chat_template": spec.chat_template,
                      "special_tokens": spec.special_tokens},
        "tensors": tensors,
    }
    try:
        head = json.dumps(header).encode()
    except (TypeError, ValueError):
        return False
    # The data follows the header, whose offsets list is written last: room for it is left (48 bytes an entry).
    offsets: list[list[int]] = []
    start = offset = _round_up(len(_MAGIC) + 8 + len(head) + 64 + 48 * len(parts))
    for t in parts:
        offsets.append([offset, t.numel() * t.element_size()])
        offset = _round_up(offset + offsets[-1][1])
    head = json.dumps({**header, "offsets": offsets}).encode()
    if len(_MAGIC) + 8 + len(head) > start:
        return False
    tmp: str | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + struct.pack("<Q", len(head)) + head)
            for t, (off, nbytes) in zip(parts, offsets):
                f.seek(off)
                if nbytes:
                    f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
            f.truncate(offset)
        os.replace(tmp, entry)
        tmp = None
        return True
    except OSError as e:
        log.warning("jisu: cannot store the converted model in %s (%s); it will be converted again next time",
                    entry.parent, e.strerror or e)
        return False
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


_libc: Any = None


def _file_range(f, offset: int, nbytes: int):
    """Bytes [offset, offset + nbytes) of the open file `f`, as a writable buffer: a private (copy-on-write) mapping
    of its own where the C library offers mmap, unmapped when the last tensor over it goes; else read into memory.

    NOTE: one mapping per tensor, not one for the file: the kernels repack int4 blocks into their own layout and
    drop the loaded ones, and a shared mapping would keep every page read once resident for the life of the run.
    Python's mmap.mmap would do, but it keeps a duplicate of the file descriptor per mapping (hundreds per model),
    so libc's mmap is called directly."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.mmap.restype = ctypes.c_void_p
            _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_int64]
            _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        except (OSError, AttributeError, TypeError):  # no C library to call (Windows)
            _libc = False
    if _libc and hasattr(mmap, "MAP_PRIVATE"):
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        addr = _libc.mmap(None, nbytes, prot, mmap.MAP_PRIVATE, f.fileno(), offset)
        if addr is not None and addr != ctypes.c_void_p(-1).value:
            view = memoryview((ctypes.c_ubyte * nbytes).from_address(addr)).cast("B")
            weakref.finalize(view, _libc.munmap, addr, nbytes)  # the view lives as long as the tensor's storage
            return view
    f.seek(offset)
    return _read_exactly(f, nbytes)


# ----------------------------------------------------------------------------- reading


def read_entry(entry: Path, key: dict, source: str) -> Checkpoint | None:
    """The checkpoint stored at `entry` if it was made from the file `key` describes; None otherwise (missing,
    stale, or damaged: every field and range is checked before use)."""
    try:
        f = open(entry, "rb", buffering=0)
    except OSError:
        return None
    try:
        with f:
            size = os.fstat(f.fileno()).st_size
            pre = f.read(len(_MAGIC) + 8)
            if len(pre) != len(_MAGIC) + 8 or pre[: len(_MAGIC)] != _MAGIC:
                return None
            (n,) = struct.unpack("<Q", pre[len(_MAGIC):])
            if n > size:
                return None
            header = json.loads(_read_exactly(f, n))
            if not isinstance(header, dict) or header.get("key") != key:
                return None
            return _checkpoint(f, size, header, source)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as e:
        log.warning("jisu: ignoring a damaged converted-model cache entry %s (%s)", entry, e)
        return None


def _read_exactly(f, n: int) -> bytearray:
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise ValueError(f"the file ends after {got} of {n} bytes")
        got += k
    return data


def _checkpoint(f, size: int, header: dict, source: str) -> Checkpoint:
    from tokenizers import Tokenizer

    offsets = header["offsets"]

    def part(d: dict | None) -> torch.Tensor | None:
        if d is None:
            return None
        dtype = _DTYPES[d["dtype"]]
        shape = [int(s) for s in d["shape"]]
        off, nbytes = (int(x) for x in offsets[int(d["index"])])
        numel = 1
        for s in shape:
            if s < 0:
                raise ValueError(f"negative dimension in {shape}")
            numel *= s
        if numel * dtype.itemsize != nbytes or off % _ALIGN or off < 0 or off + nbytes > size:
            raise ValueError(f"a tensor's range ({off}, {nbytes} bytes) does not fit its shape or the file")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(_file_range(f, off, nbytes), dtype=dtype).view(shape)

    tensors: dict[str, Any] = {}
    for name, d in header["tensors"].items():
        if d["kind"] == "quantized":
            tensors[name] = QuantizedTensor(
                int(d["bits"]), part(d["qweight"]), part(d["scales"]), part(d["zeros"]), int(d["group_size"]),
                str(d["origin"]), part(d["outlier_cols"]), part(d["outlier_weights"]), str(d["fidelity"]),
            )
        elif d["kind"] == "tensor":
            tensors[name] = part(d["data"])
        else:
            raise ValueError(f"unknown tensor kind {d['kind']!r}")
    tok = header["tokenizer"]
    spec = TokenizerSpec(
        tokenizer=Tokenizer.from_str(tok["json"]), bos_token_id=tok["bos_token_id"],
        eos_token_ids=tuple(tok["eos_token_ids"]), add_bos_token=bool(tok["add_bos_token"]),
        add_eos_token=bool(tok["add_eos_token"]), chat_template=tok["chat_template"],
        special_tokens=dict(tok["special_tokens"]),
    )
    config = ModelConfig.from_hf_dict(header["config"], source, header["field_names"])
    return Checkpoint(config=config, tensors=tensors, tokenizer=spec, source=source, metadata=header["metadata"])
