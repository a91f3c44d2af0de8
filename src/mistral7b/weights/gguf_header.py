"""A bounded walk over a GGUF header, run before `gguf.GGUFReader` is let near the file.

A GGUF file is attack input (llama.cpp's CVE-2024-21802, CVE-2025-49847 and CVE-2025-53630
were all header parsing bugs). Every length in the header is a count the file chooses: a
string of 2^60 bytes, an array of 2^40 items, a tensor of 2^50 elements. This walk reads
the header once with `struct` over a memory map and checks each count against the bytes left
*before* stepping over it, so its cost is bounded by the file's size whatever the counts say.
What it checks is what llama.cpp's `gguf_init_from_file` checks:

    header     magic, version 2 or 3, tensor and key counts the file could hold
    key/value  key lengths, known value types, string and array lengths, arrays nested at
               most _MAX_ARRAY_DEPTH deep; `general.alignment` a u32 power of two
    tensors    unique names, 1..4 dimensions, a known type whose block divides the row,
               and the offsets llama.cpp accepts: each tensor starts exactly where the one
               before it ends, rounded up to the alignment (so no gap, overlap or unaligned
               start can hide a tensor whose type id was changed), the last ending inside
               the file

Worked example, alignment 32: tensors of 100 and 64 bytes must sit at offsets 0 and 128
(100 rounded up); the data section starts at the header's end rounded up to 32, and needs
128 + 64 bytes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from mistral7b.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4                    # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 2             # arrays of arrays (llama.cpp writes none deeper)
_MAX_NAME_BYTES = 256            # tensor names (llama.cpp: 64)
# value type id -> (struct format, size) of the scalar types; 8 = string, 9 = array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4),
            5: ("<i", 4), 6: ("<f", 4), 7: ("<B", 1), 10: ("<Q", 8), 11: ("<q", 8),
            12: ("<d", 8)}
_STRING, _ARRAY = 8, 9
# Smallest possible encodings: a key/value (key length u64, 1-byte key, type u32, 1-byte value)
# and a tensor info (name length u64, 1-byte name, n_dims u32, one dim u64, type u32, offset u64).
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]        # GGUF order: fastest-varying first
    type_id: int
    offset: int                  # from the start of the data section
    n_bytes: int


@dataclass(frozen=True)
class Header:
    size: int                    # the file's size in bytes
    n_tensors: int
    n_kv: int
    alignment: int
    data_start: int              # absolute offset of the data section
    tensors: tuple[TensorInfo, ...]


class _Cursor:
    """Reads little-endian values from the map, refusing to step past its end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.size = len(buf)
        self.at = 0
        self.path = path

    def fail(self, problem: str) -> ModelFileError:
        return ModelFileError(self.path, f"corrupt GGUF header at byte {self.at}: {problem}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.at:
            raise self.fail(f"{what} needs {n} bytes but only {self.size - self.at} are left")

    def scalar(self, fmt: str, size: int, what: str) -> int | float:
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.at)[0]
        self.at += size
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", 8, what))

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.u64(f"{what}'s length")
        if limit is not None and n > limit:
            raise self.fail(f"{what} claims {n} bytes (at most {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.at: self.at + n])
        self.at += n
        return raw

    def skip_strings(self, count: int, what: str) -> None:
        buf, at, size = self.buf, self.at, self.size
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if size - at < 8:
                self.at = at
                raise self.fail(f"{what}: the array ends past the end of the file")
            n = unpack(buf, at)[0]
            at += 8
            if n > size - at:
                self.at = at
                raise self.fail(f"{what}: a string of {n} bytes runs past the end of the file")
            at += n
        self.at = at


def read_header(path: Path) -> Header:
    """Walk and check the header of the GGUF file at `path` (see the module docstring)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(24)
            if len(head) < 24 or head[:4] != GGUF_MAGIC:
                _check_start(path, head, size)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk(buf, path, size)
    except FileNotFoundError:
        raise ModelFileError(path, "file not found") from None
    except OSError as exc:
        raise ModelFileError(path, f"cannot read: {exc.strerror or exc}") from None


def _check_start(path: Path, head: bytes, size: int) -> None:
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(path, f"not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    raise ModelFileError(path, f"truncated GGUF header ({size} bytes)")


def _walk(buf: mmap.mmap, path: Path, size: int) -> Header:
    cur = _Cursor(buf, path)
    cur.at = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(path, f"unsupported GGUF version {version} (supported: "
                                   f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("key count")
    room = size - 24
    if n_kv * _MIN_KV_BYTES > room or n_tensors * _MIN_TENSOR_INFO_BYTES > room:
        raise ModelFileError(path, f"header claims {n_tensors} tensors and {n_kv} metadata "
                                   f"entries, more than a {size}-byte file can hold")
    alignment = DEFAULT_ALIGNMENT
    keys: set[bytes] = set()
    for _ in range(n_kv):
        key = cur.string("a metadata key", limit=65535)
        if key in keys:
            raise cur.fail(f"metadata key {key[:80]!r} appears twice")
        keys.add(key)
        kind = cur.u32(f"the type of {key[:80]!r}")
        if key == b"general.alignment":
            if kind != 4:
                raise cur.fail(f"general.alignment has value type {kind}, expected 4 (u32)")
            alignment = cur.u32("general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise cur.fail(f"general.alignment {alignment} is not a power of two")
            continue
        _skip_value(cur, kind, key, depth=0)
    tensors = _tensor_infos(cur, n_tensors)
    data_start = -(-cur.at // alignment) * alignment
    _check_offsets(path, tensors, alignment, data_start, size)
    return Header(size, n_tensors, n_kv, alignment, data_start, tuple(tensors))


def _skip_value(cur: _Cursor, kind: int, key: bytes, depth: int) -> None:
    what = f"metadata {key[:80].decode('utf-8', 'replace')!r}"
    if kind in _SCALARS:
        cur.need(_SCALARS[kind][1], what)
        cur.at += _SCALARS[kind][1]
    elif kind == _STRING:
        cur.need(8, what)
        cur.skip_strings(1, what)
    elif kind == _ARRAY:
        item = cur.u32(f"{what}'s item type")
        count = cur.u64(f"{what}'s item count")
        if item in _SCALARS:
            cur.need(count * _SCALARS[item][1], f"{what} ({count} items)")
            cur.at += count * _SCALARS[item][1]
        elif item == _STRING:
            cur.need(count * 8, f"{what} ({count} strings)")
            cur.skip_strings(count, what)
        elif item == _ARRAY and depth + 1 < _MAX_ARRAY_DEPTH:
            cur.need(count * 12, f"{what} ({count} arrays)")
            for _ in range(count):
                _skip_value(cur, _ARRAY, key, depth + 1)
        else:
            raise cur.fail(f"{what} is an array of unknown or too deeply nested type {item}")
    else:
        raise cur.fail(f"{what} has unknown value type {kind}")


def _tensor_infos(cur: _Cursor, n_tensors: int) -> list[TensorInfo]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    sizes = {int(t): bs for t, bs in GGML_QUANT_SIZES.items()}
    names: set[str] = set()
    out = []
    for i in range(n_tensors):
        raw = cur.string(f"tensor {i}'s name", limit=_MAX_NAME_BYTES)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise cur.fail(f"tensor {i}'s name {raw!r} is not UTF-8") from None
        if name in names:
            raise cur.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.u32(f"tensor {name!r}'s dimension count")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS})")
        dims = tuple(cur.u64(f"tensor {name!r}'s shape") for _ in range(n_dims))
        type_id = cur.u32(f"tensor {name!r}'s type")
        offset = cur.u64(f"tensor {name!r}'s offset")
        if type_id not in sizes:
            raise ModelFileError(cur.path, f"tensor {name!r}: unknown quantization type "
                                           f"{type_id}; this reader knows the types of gguf "
                                           f"{gguf_version()}")
        block, block_bytes = sizes[type_id]
        elements = 1
        for d in dims:
            if d < 1:
                raise cur.fail(f"tensor {name!r} has shape {list(dims)}: a dimension of 0")
            elements *= d
        if dims[0] % block:
            kind = GGMLQuantizationType(type_id).name
            raise cur.fail(f"tensor {name!r}: rows of {dims[0]} values are not whole "
                           f"{kind} blocks of {block}")
        n_bytes = elements // block * block_bytes
        if n_bytes > cur.size:
            raise cur.fail(f"tensor {name!r} of shape {list(dims)} needs {n_bytes} bytes, "
                           f"more than the whole file ({cur.size})")
        out.append(TensorInfo(name, dims, type_id, offset, n_bytes))
    return out


def _check_offsets(path: Path, tensors: list[TensorInfo], alignment: int, data_start: int,
                   size: int) -> None:
    expected = 0
    for t in tensors:
        if t.offset != expected:
            why = "is not aligned" if t.offset % alignment else "leaves a gap or overlaps"
            raise ModelFileError(
                path, f"tensor {t.name!r} starts at data offset {t.offset}, expected {expected}:"
                      f" it {why} (each tensor must follow the one before it, aligned to "
                      f"{alignment} bytes)")
        end = data_start + t.offset + t.n_bytes
        if end > size:
            raise ModelFileError(path, f"tensor {t.name!r} needs bytes up to {end} but the "
                                       f"file has {size}: the file is truncated")
        expected = -(-(t.offset + t.n_bytes) // alignment) * alignment


def gguf_version() -> str:
    """The installed `gguf` package's version (its type table decides what is known)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"
