"""A bounded walk over a GGUF file's structure, run before gguf.GGUFReader parses it.

GGUFReader trusts the counts and lengths it reads: a metadata array that claims a billion elements makes
it build a billion numpy views, and a short, overlapping or garbled file comes out as an IndexError or a
numpy reshape error. This walk reads only fixed-size fields and lengths, through a memory map, checks
every count and length against the bytes left in the file before it moves on, and every tensor's type,
dimensions and data range against the file, so each problem is reported as a ModelLoadError that says
where the file went wrong. Values themselves (and their ranges) are left to GGUFReader and ModelConfig.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from jisu.errors import ModelLoadError
from jisu.models.config import MAX_VOCAB

_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}  # fmt: skip

MAX_TENSORS = 1 << 20
MAX_KEYS = 1 << 20
MAX_ARRAY = MAX_VOCAB  # the longest arrays are the vocabulary's tokens, scores and types
MAX_NAME = 1 << 16
MAX_DIMS = 4  # GGML_MAX_DIMS
_HEADER = 24  # magic, version, tensor count, metadata key count


def scan_gguf(path: str | Path) -> None:
    """Raise ModelLoadError for the first structural problem in the GGUF file at `path`: truncation at any
    boundary, counts or lengths the file cannot hold, unknown value or tensor types, duplicate keys or
    tensor names, dimensions that overflow, tensor data outside the file or overlapping."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < _HEADER:
            raise ModelLoadError(f"{path} is truncated: {size} bytes is shorter than a GGUF header ({_HEADER} bytes)")
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            _Scan(m, size, path).run()
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {path}: {e.strerror or e}") from None


class _Scan:
    def __init__(self, m: mmap.mmap, size: int, path: Path):
        self.m, self.size, self.path, self.pos = m, size, path, 0

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path} is corrupt: {what}")

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise ModelLoadError(
                f"{self.path} is truncated: {what} at byte {self.pos} needs {n} bytes, but the file ends at "
                f"byte {self.size}"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = struct.unpack_from("<I", self.m, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = struct.unpack_from("<Q", self.m, self.pos)
        self.pos += 8
        return v

    def string(self, what: str, limit: int) -> str:
        n = self.u64(f"the length of {what}")
        if n > limit:
            raise self.fail(f"{what} claims {n} bytes; at most {limit} allowed")
        self.need(n, what)
        raw = self.m[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8: {raw[:40]!r}") from None

    def skip_string(self, what: str) -> None:
        n = self.u64(f"the length of {what}")
        self.need(n, what)  # checked before anything of that length exists
        self.pos += n

    def run(self) -> None:
        self.pos = 8  # magic and version: checked by the loader before this runs
        n_tensors = self.u64("the tensor count")
        n_keys = self.u64("the metadata key count")
        # Each key takes at least 13 bytes (length, type, one-byte value), each tensor info at least 32.
        self.count(n_keys, MAX_KEYS, 13, "metadata keys")
        alignment = 32
        keys: set[str] = set()
        for i in range(n_keys):
            key = self.string(f"the name of metadata key #{i}", MAX_NAME)
            if key in keys:
                raise self.fail(f"metadata key {key!r} appears twice")
            keys.add(key)
            vtype = self.value_type(f"metadata key {key!r}")
            if key == "general.alignment":
                alignment = self.alignment(vtype)
            else:
                self.skip_value(vtype, f"metadata key {key!r}")
        self.count(n_tensors, MAX_TENSORS, 32, "tensors")
        tensors = [self.tensor_info(i) for i in range(n_tensors)]
        names = set()
        for name, *_ in tensors:
            if name in names:
                raise self.fail(f"tensor {name!r} appears twice")
            names.add(name)
        data_start = -(-self.pos // alignment) * alignment
        if tensors and data_start > self.size:
            raise ModelLoadError(
                f"{self.path} is truncated: the tensor data should start at byte {data_start} (after the "
                f"alignment padding), but the file ends at byte {self.size}"
            )
        self.tensor_data(tensors, data_start, alignment)

    def count(self, n: int, limit: int, min_bytes: int, what: str) -> None:
        left = self.size - self.pos
        if n > limit:
            raise self.fail(f"the header claims {n} {what}; at most {limit} allowed")
        if n * min_bytes > left:
            raise ModelLoadError(
                f"{self.path} is truncated or corrupt: the header claims {n} {what}, which need at least "
                f"{n * min_bytes} bytes, but only {left} bytes follow"
            )

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(f"the value type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {raw}") from None

    def skip_value(self, vtype: GGUFValueType, what: str) -> None:
        if vtype == GGUFValueType.STRING:
            self.skip_string(f"the value of {what}")
            return
        if vtype in _SCALAR_SIZES:
            self.need(_SCALAR_SIZES[vtype], f"the value of {what}")
            self.pos += _SCALAR_SIZES[vtype]
            return
        # An array: element type, element count, elements.
        item = self.value_type(f"{what} (its elements)")
        n = self.u64(f"the element count of {what}")
        if item == GGUFValueType.ARRAY:  # llama.cpp reads no nested arrays, and nor does jisu
            raise self.fail(f"{what} is an array of arrays, which GGUF readers do not support")
        if n > MAX_ARRAY:
            raise self.fail(f"{what} claims {n} elements; at most {MAX_ARRAY} allowed")
        per_item = _SCALAR_SIZES.get(item, 8)  # a string is at least its 8-byte length
        if n * per_item > self.size - self.pos:
            raise ModelLoadError(
                f"{self.path} is truncated or corrupt: {what} claims {n} elements ({n * per_item} bytes or "
                f"more), but only {self.size - self.pos} bytes follow"
            )
        if item == GGUFValueType.STRING:
            for i in range(n):
                self.skip_string(f"element {i} of {what}")
        else:
            self.pos += n * per_item

    def alignment(self, vtype: GGUFValueType) -> int:
        if vtype != GGUFValueType.UINT32:
            raise self.fail(f"general.alignment has value type {vtype.name}; it must be UINT32")
        value = self.u32("the value of general.alignment")
        if value == 0 or value & (value - 1) or value > 1 << 20:
            raise self.fail(f"general.alignment is {value}; allowed: a power of two up to {1 << 20}")
        return value

    def tensor_info(self, i: int) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int, int]:
        name = self.string(f"the name of tensor #{i}", MAX_NAME)
        what = f"tensor {name!r}"
        n_dims = self.u32(f"the dimension count of {what}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.fail(f"{what} has {n_dims} dimensions; allowed: 1 to {MAX_DIMS}")
        dims = tuple(self.u64(f"dimension {d} of {what}") for d in range(n_dims))
        raw_type = self.u32(f"the type of {what}")
        offset = self.u64(f"the data offset of {what}")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise self.fail(f"{what} has unknown GGML type {raw_type}") from None
        elements = 1
        for d in dims:
            elements *= d  # Python ints: the product cannot wrap around as a C or numpy one would
        if 0 in dims or elements >= 1 << 63:
            raise self.fail(f"{what} has dimensions {list(dims)}: {elements} elements; allowed: 1 to 2^63 - 1")
        if dims[0] % block:
            raise self.fail(f"{what} has rows of {dims[0]} values, not a multiple of the {qtype.name} block ({block})")
        return name, qtype, dims, offset, elements // block * block_bytes

    def tensor_data(self, tensors: list, data_start: int, alignment: int) -> None:
        data_size = self.size - data_start
        end_of_previous, previous = 0, None
        for name, qtype, dims, offset, n_bytes in sorted(tensors, key=lambda t: t[3]):
            if offset % alignment:
                raise self.fail(f"tensor {name!r} has data offset {offset}, not a multiple of the alignment {alignment}")
            if offset + n_bytes > data_size:
                raise ModelLoadError(
                    f"{self.path} is truncated or corrupt: tensor {name!r} ({qtype.name}, dimensions {list(dims)}, "
                    f"{n_bytes} bytes at data offset {offset}) ends at byte {data_start + offset + n_bytes}, past the "
                    f"end of the file (byte {self.size})"
                )
            if offset < end_of_previous:
                raise self.fail(f"the data of tensors {previous!r} and {name!r} overlap")
            end_of_previous, previous = offset + n_bytes, name
