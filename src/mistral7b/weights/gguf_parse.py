"""Our own reader of a GGUF file's header: metadata and tensor infos over one memory map.

Layout (GGUF v2/v3, little-endian; ggml's docs/gguf.md):

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv times:       string key | u32 value type | value
    n_tensors times:  string name | u32 n_dims | u64 dims[n_dims] (fastest first) | u32 type
                      | u64 offset (from the start of the data section)
    padding to `general.alignment` (default 32) | tensor data

    string = u64 length | bytes (UTF-8);  array = u32 item type | u64 count | items

Why not `gguf.GGUFReader`: it builds a numpy memmap view per metadata item, about a million
of them for a 49k-token vocabulary (2-5 s, most of the default model's load), and importing
the package costs 0.7 s more. Here numeric arrays are one `np.frombuffer` each and strings
one slice each; the whole header of the default model parses in ~30 ms.

Every length is checked against the bytes left before it is used, so a crafted count can
neither allocate nor loop beyond the file's size (llama.cpp's CVE-2024-21802 and
CVE-2025-53630 were such counts). What is checked is what llama.cpp's `gguf_init_from_file`
checks:

    header     magic, version 2 or 3, tensor and key counts the file could hold
    key/value  unique keys of at most 64 KiB, known value types, string and array lengths,
               arrays nested at most MAX_NESTING deep; `general.alignment` a u32 power of two
    tensors    unique UTF-8 names of at most 256 bytes, 1..4 dimensions, a known type whose
               block divides the row, and the offsets llama.cpp accepts: each tensor starts
               exactly where the one before it ends, rounded up to the alignment (so no gap,
               overlap or unaligned start can hide a tensor whose type id was changed), the
               last ending inside the file

Worked example, alignment 32: tensors of 100 and 64 bytes must sit at offsets 0 and 128
(100 rounded up); the data section starts at the header's end rounded up to 32, and needs
128 + 64 bytes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mistral7b.errors import ModelFileError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4          # GGML_MAX_DIMS
MAX_NESTING = 1       # arrays of arrays, one level (llama.cpp writes none deeper)
MAX_KEY_BYTES = 65535
MAX_NAME_BYTES = 256  # tensor names (llama.cpp: 64)


@dataclass(frozen=True)
class GGMLType:
    """A ggml tensor type: `block_size` values take `type_size` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int


# ggml's type table (ggml.h `enum ggml_type`, ggml.c `type_traits`); tests check it against
# the `gguf` package's GGML_QUANT_SIZES.
GGML_TYPES: dict[int, GGMLType] = {t.id: t for t in (
    GGMLType(0, "F32", 1, 4), GGMLType(1, "F16", 1, 2),
    GGMLType(2, "Q4_0", 32, 18), GGMLType(3, "Q4_1", 32, 20),
    GGMLType(6, "Q5_0", 32, 22), GGMLType(7, "Q5_1", 32, 24),
    GGMLType(8, "Q8_0", 32, 34), GGMLType(9, "Q8_1", 32, 40),
    GGMLType(10, "Q2_K", 256, 84), GGMLType(11, "Q3_K", 256, 110),
    GGMLType(12, "Q4_K", 256, 144), GGMLType(13, "Q5_K", 256, 176),
    GGMLType(14, "Q6_K", 256, 210), GGMLType(15, "Q8_K", 256, 292),
    GGMLType(16, "IQ2_XXS", 256, 66), GGMLType(17, "IQ2_XS", 256, 74),
    GGMLType(18, "IQ3_XXS", 256, 98), GGMLType(19, "IQ1_S", 256, 50),
    GGMLType(20, "IQ4_NL", 32, 18), GGMLType(21, "IQ3_S", 256, 110),
    GGMLType(22, "IQ2_S", 256, 82), GGMLType(23, "IQ4_XS", 256, 136),
    GGMLType(24, "I8", 1, 1), GGMLType(25, "I16", 1, 2), GGMLType(26, "I32", 1, 4),
    GGMLType(27, "I64", 1, 8), GGMLType(28, "F64", 1, 8), GGMLType(29, "IQ1_M", 256, 56),
    GGMLType(30, "BF16", 1, 2), GGMLType(34, "TQ1_0", 256, 54),
    GGMLType(35, "TQ2_0", 256, 66), GGMLType(39, "MXFP4", 32, 17),
)}
TYPE_BY_NAME = {t.name: t for t in GGML_TYPES.values()}

# Metadata value types: id -> (numpy dtype of one item, or None for string / array).
_STRING, _ARRAY = 8, 9
_SCALARS: dict[int, np.dtype] = {
    0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"),
    4: np.dtype("<u4"), 5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("<u1"),  # 7: bool
    10: np.dtype("<u8"), 11: np.dtype("<i8"), 12: np.dtype("<f8"),
}
_BOOL = 7


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLType
    dims: tuple[int, ...]   # as stored: fastest-varying first (dims[0] = columns)
    offset: int             # absolute, in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """PyTorch order (rows, cols)."""
        return tuple(reversed(self.dims))


class _Cursor:
    """Reads little-endian values from `buf`, refusing any read past its end."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(self.path, f"corrupt GGUF header at byte {self.pos}: {what}")

    def take(self, n: int, what: str) -> int:
        if n < 0 or n > self.end - self.pos:
            raise self.fail(f"{what} needs {n} bytes but only {self.end - self.pos} are left: "
                            "it runs past the end of the file")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return int(struct.unpack_from("<I", self.buf, self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack_from("<Q", self.buf, self.take(8, what))[0])

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"{what} length")
        start = self.take(n, what)
        return bytes(self.buf[start:start + n])

    def string(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None


def _value(cur: _Cursor, kind: int, key: str, depth: int = 0) -> Any:
    """One metadata value. Strings that are not UTF-8 come back as `bytes`, so a reader of
    that key can say so (a bad `tokenizer.chat_template` must not hide the weights' error)."""
    if kind in _SCALARS:
        dt = _SCALARS[kind]
        item = np.frombuffer(cur.buf, dt, 1, cur.take(dt.itemsize, key))[0].item()
        return bool(item) if kind == _BOOL else item
    if kind == _STRING:
        raw = cur.raw_string(key)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    if kind == _ARRAY:
        item_kind = cur.u32(f"{key} item type")
        count = cur.u64(f"{key} item count")
        if item_kind in _SCALARS:
            dt = _SCALARS[item_kind]
            if count > (cur.end - cur.pos) // dt.itemsize:
                raise cur.fail(f"{key} claims {count} items, more than the file holds")
            arr = np.frombuffer(cur.buf, dt, count, cur.take(count * dt.itemsize, key))
            return arr.astype(bool).tolist() if item_kind == _BOOL else arr.tolist()
        if item_kind == _STRING:
            if count > (cur.end - cur.pos) // 8:  # each string takes at least its length
                raise cur.fail(f"{key} claims {count} strings, more than the file holds")
            return _strings(cur, count, key)
        if item_kind == _ARRAY:
            if depth >= MAX_NESTING:
                raise cur.fail(f"{key} nests arrays more than {MAX_NESTING} deep")
            if count > (cur.end - cur.pos) // 12:  # each array takes at least 12 bytes
                raise cur.fail(f"{key} claims {count} arrays, more than the file holds")
            return [_value(cur, _ARRAY, key, depth + 1) for _ in range(count)]
        raise cur.fail(f"{key} has unknown array item type {item_kind}")
    raise cur.fail(f"{key} has unknown value type {kind}")


def _strings(cur: _Cursor, count: int, key: str) -> list[str | bytes]:
    """`count` strings (a vocabulary: 32k-131k of them), in one tight loop."""
    buf, pos, end = cur.buf, cur.pos, cur.end
    length = struct.Struct("<Q").unpack_from
    out: list[str | bytes] = []
    append = out.append
    for _ in range(count):
        if end - pos < 8:
            cur.pos = pos
            raise cur.fail(f"{key}: the array runs past the end of the file")
        n = length(buf, pos)[0]
        pos += 8
        if n > end - pos:
            cur.pos = pos
            raise cur.fail(f"{key}: a string of {n} bytes runs past the end of the file")
        raw = buf[pos:pos + n]
        pos += n
        try:
            append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            append(bytes(raw))
    cur.pos = pos
    return out


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]        # every key, values as Python (str | int | float | bool | list)
    types: dict[str, tuple[int, int | None]]   # key -> (GGUF value type, array item type)
    tensors: dict[str, TensorInfo]
    data_offset: int
    file_size: int


def parse_header(buf: Any, path: Path) -> GGUFHeader:
    """Parse the header in `buf` (the whole file: bytes or an mmap)."""
    cur = _Cursor(buf, path)
    if len(buf) < 4 or bytes(buf[:4]) != MAGIC:
        raise ModelFileError(path, f"not a GGUF file (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    if len(buf) < 24:
        raise ModelFileError(path, f"truncated GGUF header ({len(buf)} bytes)")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(path, f"unsupported GGUF version {version} (supported: "
                                   f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
    # Smallest encodings: a key/value 8+1+4+1 bytes, a tensor info 8+1+4+8+4+8.
    room = len(buf) - 24
    if n_kv * 14 > room or n_tensors * 33 > room:
        raise ModelFileError(path, f"header claims {n_tensors} tensors and {n_kv} metadata "
                                   f"entries, more than a {len(buf)}-byte file can hold")
    metadata: dict[str, Any] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for _ in range(n_kv):
        key = _name(cur, "a metadata key", MAX_KEY_BYTES)
        if key in metadata:
            raise cur.fail(f"metadata key {key[:80]!r} appears twice")
        kind = cur.u32(f"{key} type")
        if key == "general.alignment" and kind != 4:
            raise cur.fail(f"general.alignment has value type {kind}, expected 4 (u32)")
        item = None
        if kind == _ARRAY and cur.end - cur.pos >= 4:
            item = int(struct.unpack_from("<I", buf, cur.pos)[0])
        metadata[key] = _value(cur, kind, key)
        types[key] = (kind, item)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment} is not a power of two")
    tensors: dict[str, TensorInfo] = {}
    for i in range(n_tensors):
        name, t, dims, rel, n_bytes = _tensor_info(cur, i)
        if name in tensors:
            raise cur.fail(f"tensor {name!r} appears twice")
        tensors[name] = TensorInfo(name, t, dims, rel, n_bytes)   # offset made absolute below
    data_offset = -(-cur.pos // alignment) * alignment
    expected = 0
    for name, info in tensors.items():
        if info.offset != expected:
            why = "is not aligned" if info.offset % alignment else "leaves a gap or overlaps"
            raise ModelFileError(
                path, f"tensor {name!r} starts at data offset {info.offset}, expected {expected}:"
                      f" it {why} (each tensor must follow the one before it, aligned to "
                      f"{alignment} bytes)")
        end = data_offset + info.offset + info.n_bytes
        if end > len(buf):
            raise ModelFileError(path, f"tensor {name!r} needs bytes up to {end} but the "
                                       f"file has {len(buf)}: the file is truncated")
        expected = -(-(info.offset + info.n_bytes) // alignment) * alignment
        tensors[name] = TensorInfo(name, info.type, info.dims, data_offset + info.offset,
                                   info.n_bytes)
    return GGUFHeader(version, metadata, types, tensors, data_offset, len(buf))


def _name(cur: _Cursor, what: str, limit: int) -> str:
    n = cur.u64(f"{what}'s length")
    if n > limit:
        raise cur.fail(f"{what} claims {n} bytes (at most {limit})")
    cur.pos -= 8
    return cur.string(what)


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, GGMLType, tuple[int, ...], int, int]:
    name = _name(cur, f"tensor {i}'s name", MAX_NAME_BYTES)
    n_dims = cur.u32(f"tensor {name!r}'s dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
    dims = tuple(cur.u64(f"tensor {name!r}'s shape") for _ in range(n_dims))
    kind = cur.u32(f"tensor {name!r}'s type")
    rel = cur.u64(f"tensor {name!r}'s offset")
    if kind not in GGML_TYPES:
        raise ModelFileError(cur.path, f"tensor {name!r}: unknown quantization type {kind}")
    t = GGML_TYPES[kind]
    if any(d < 1 for d in dims):
        raise cur.fail(f"tensor {name!r} has shape {list(dims)}: a dimension of 0")
    if dims[0] % t.block_size:
        raise cur.fail(f"tensor {name!r}: rows of {dims[0]} values are not whole {t.name} "
                       f"blocks of {t.block_size}")
    n_bytes = int(np.prod(dims, dtype=object)) // t.block_size * t.type_size
    if n_bytes > cur.end:
        raise cur.fail(f"tensor {name!r} of shape {list(dims)} needs {n_bytes} bytes, more "
                       f"than the whole file ({cur.end})")
    return name, t, dims, rel, n_bytes


def open_gguf(path: Path) -> tuple[np.ndarray, GGUFHeader]:
    """Map the file copy-on-write (tensors are writable views, the file is never written)
    and parse its header. The header is read from the `mmap` itself: slicing it gives plain
    bytes, where a numpy memmap would build an array object per metadata item."""
    try:
        size = path.stat().st_size
        if size < 24:
            with path.open("rb") as f:
                head = f.read()
            parse_header(head, path)  # raises the precise error
        with path.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise ModelFileError(path, "file not found") from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(path, f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    return np.frombuffer(mapped, dtype=np.uint8), parse_header(mapped, path)


# Float tensor types -> the numpy dtype their bytes are viewed as (BF16 as its raw 16 bits).
_FLOAT_VIEWS = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def tensor_view(data: np.ndarray, info: TensorInfo) -> np.ndarray:
    """The tensor's bytes in the map: floats as (rows, cols) arrays of their dtype (BF16 as
    uint16), quantized blocks as a flat uint8 array."""
    raw = data[info.offset: info.offset + info.n_bytes]
    if info.type.name in _FLOAT_VIEWS:
        return raw.view(_FLOAT_VIEWS[info.type.name]).reshape(info.shape)
    return raw
