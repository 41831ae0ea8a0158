"""A GGUF file's header without its vocabulary: metadata scalars, short arrays and tensor infos.

gguf-py's GGUFReader turns every array element into numpy objects: a base.gguf holding a
151,936-token vocabulary and its merges costs about 300 MB of Python objects to open, more than
the model's weights, for keys the runtime never reads (libllama loads the vocabulary itself).
This reader walks the header once, keeps scalars, strings and numeric arrays of up to
`MAX_ARRAY` elements, and only counts longer arrays and arrays of strings. Every length and count
is checked against the file's size, so a damaged header is a ShardSetError naming the file, not
a MemoryError or an IndexError. The header's page cache is dropped afterwards (it is not used
again). Tensor data is not touched: `data_offset` is where the runtime maps or reads it.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType, GGUFValueType

from edgemoe.errors import ShardSetError

GGUF_MAGIC = b"GGUF"
MAX_ARRAY = 1 << 16   # numeric arrays longer than this are counted, not kept
MAX_DIMS = 4          # GGML_MAX_DIMS

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class Field:
    """One metadata key. `value`: a scalar, a str, a list (numeric arrays up to MAX_ARRAY), or
    None for an array that was only counted (`count` elements)."""
    name: str
    type: GGUFValueType
    value: object
    count: int = 1

    def contents(self):
        return self.value


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: ggml order of dimensions (`shape`, ne0 first, as GGUFReader gives it), its
    type, its byte size and its absolute offset in the file."""
    name: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    n_bytes: int
    data_offset: int


class GGUFHeader:
    """`fields` {key: Field} and `tensors` [TensorInfo] of the GGUF file at `path`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                if self.file_size < 24:
                    raise ShardSetError(f"{self.path}: {self.file_size} bytes, too short for a "
                                        "GGUF header")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    self._m, self._pos = m, 0
                    try:
                        self._parse()
                    finally:
                        self._m = None
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, self.data_start, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise ShardSetError(f"{self.path}: cannot read ({exc.strerror or exc})") from None

    # -- parsing -------------------------------------------------------------------------------

    def _fail(self, what: str):
        raise ShardSetError(f"{self.path}: not a readable GGUF ({what} at byte {self._pos})")

    def _take(self, n: int) -> int:
        """Advance over n bytes; returns where they start."""
        if n < 0 or self._pos + n > self.file_size:
            self._fail(f"{n} bytes needed, the file ends")
        start = self._pos
        self._pos += n
        return start

    def _unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack_from(fmt, self._m, self._take(size))[0]

    def _string(self) -> str:
        n = self._unpack("<Q")
        start = self._take(n)
        return bytes(self._m[start:start + n]).decode("utf-8", errors="replace")

    def _skip_string(self) -> None:
        self._take(self._unpack("<Q"))

    def _value_type(self) -> GGUFValueType:
        raw = self._unpack("<I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            self._fail(f"unknown value type {raw}")

    def _value(self, vtype: GGUFValueType):
        """(value, count) of one value of type vtype at the cursor."""
        if vtype == GGUFValueType.STRING:
            return self._string(), 1
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype]), 1
        # an array
        etype = self._value_type()
        count = self._unpack("<Q")
        if etype == GGUFValueType.ARRAY:
            self._fail("nested arrays are not supported")
        if etype == GGUFValueType.STRING:
            if count * 8 > self.file_size - self._pos:
                self._fail(f"an array of {count} strings does not fit the file")
            for _ in range(count):
                self._skip_string()
            return None, count
        fmt = _SCALARS[etype]
        size = struct.calcsize(fmt)
        start = self._take(count * size)
        if count > MAX_ARRAY:
            return None, count
        return list(struct.unpack_from(f"<{count}{fmt[1]}", self._m, start)), count

    def _parse(self) -> None:
        if bytes(self._m[0:4]) != GGUF_MAGIC:
            raise ShardSetError(f"{self.path}: not a readable GGUF (magic "
                                f"{bytes(self._m[0:4])!r}, expected {GGUF_MAGIC!r})")
        self._pos = 4
        version = self._unpack("<I")
        if version not in (2, 3):
            self._fail(f"GGUF version {version} (supported: 2, 3)")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        # Each key needs at least 12 bytes, each tensor info at least 24.
        if n_kv * 12 + n_tensors * 24 > self.file_size:
            self._fail(f"{n_kv} keys and {n_tensors} tensors do not fit the file")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = self._string()
            vtype = self._value_type()
            value, count = self._value(vtype)
            self.fields[key] = Field(key, vtype, value, count)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                self._fail(f"tensor {name} has {n_dims} dimensions")
            shape = tuple(self._unpack("<Q") for _ in range(n_dims))
            raw_type = self._unpack("<I")
            offset = self._unpack("<Q")
            try:
                ttype = GGMLQuantizationType(raw_type)
                block, block_bytes = gguf.GGML_QUANT_SIZES[ttype]
            except (ValueError, KeyError):
                self._fail(f"tensor {name} has unknown type {raw_type}")
            if any(d < 1 for d in shape) or shape[0] % block:
                self._fail(f"tensor {name} has shape {list(shape)} (type {ttype.name})")
            n = 1
            for d in shape:
                n *= d
            infos.append((name, shape, ttype, n // block * block_bytes, offset))
        alignment = self.fields.get(gguf.Keys.General.ALIGNMENT)
        align = int(alignment.value) if alignment is not None and alignment.value else 32
        if align & (align - 1):
            self._fail(f"general.alignment {align} is not a power of two")
        self.alignment = align
        self.data_start = -(-self._pos // align) * align
        self.tensors: list[TensorInfo] = []
        for name, shape, ttype, nbytes, offset in infos:
            start = self.data_start + offset
            if offset % align or start + nbytes > self.file_size:
                raise ShardSetError(f"{self.path}: tensor {name} at offset {offset} "
                                    f"({nbytes} bytes) lies outside the file or off alignment")
            self.tensors.append(TensorInfo(name, shape, ttype, nbytes, start))
        spans = sorted(self.tensors, key=lambda t: t.data_offset)
        for a, b in zip(spans, spans[1:]):
            if a.data_offset + a.n_bytes > b.data_offset:
                raise ShardSetError(f"{self.path}: tensors {a.name} and {b.name} overlap")
