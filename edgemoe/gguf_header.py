"""A GGUF file's header, read within bounds: the runtime's view of base.gguf (metadata scalars,
short arrays and tensor infos, without its vocabulary) and the check of every expert's header.

gguf-py's GGUFReader trusts the counts and types it reads (a crafted key count spins and then
exhausts memory, a bad type byte ends in an IndexError deep inside it) and turns every array
element into numpy objects (about 300 MB of Python objects for a 151,936-token vocabulary, for
keys the runtime never reads: libllama loads the vocabulary itself). Here the header is walked
once: every count and length is checked against the bytes that remain before anything is
allocated, every type against the ones GGUF defines, every tensor against its type's block size
and the file's data section, every scalar string must be UTF-8; scalars, strings and numeric
arrays of up to `MAX_ARRAY` elements are kept, longer arrays and arrays of strings only counted.
A damaged header is one ShardSetError naming the file and what is wrong. Tensor data is not
touched: `data_offset` is where the runtime maps or reads it.
"""
from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from edgemoe.errors import ShardSetError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                  # GGML_MAX_DIMS
MAX_NAME = 63                 # GGML_MAX_NAME (64) less the terminating NUL
MAX_KEY = 1 << 16
# Numeric arrays up to this many elements are kept (edgemoe.expert_layers, ...); longer ones
# (token scores, types) are checked and counted.
MAX_ARRAY = 1 << 16

# GGUF value types: code -> (struct format, size); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_SIZES = {code: struct.calcsize("<" + fmt) for code, fmt in _SCALARS.items()}
STRING, ARRAY = 8, 9
_U64 = struct.Struct("<Q")
INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
FLOAT_TYPES = frozenset({6, 12})


@dataclass(frozen=True)
class TensorHeader:
    name: str
    ne: tuple[int, ...]   # ggml order, innermost first
    type: int             # ggml type id
    offset: int           # absolute byte offset in the file
    nbytes: int


@dataclass
class Header:
    version: int
    alignment: int
    data_start: int       # absolute offset of the tensor data section
    kv: dict[str, Any] = field(default_factory=dict)   # scalars; small numeric arrays as lists
    kv_types: dict[str, int] = field(default_factory=dict)
    array_info: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (type, count)
    tensors: list[TensorHeader] = field(default_factory=list)


def type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def tensor_nbytes(ggml_type: int, ne: tuple[int, ...]) -> int | None:
    """Bytes of a tensor of `ggml_type` and shape `ne`; None when the type is unknown or ne[0]
    is not a whole number of its blocks (ggml would abort on either)."""
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None
    if not ne or ne[0] % block:
        return None
    n = ne[0] // block * size
    for d in ne[1:]:
        n *= d
    return n


class _Cursor:
    def __init__(self, buf, path, limit: int):
        self.buf, self.path, self.pos, self.limit = buf, path, 0, limit

    def fail(self, what: str):
        raise ShardSetError(f"{self.path}: corrupt GGUF header at byte {self.pos}: {what}")

    def left(self) -> int:
        return self.limit - self.pos

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if n > self.left():
            self.fail("truncated")
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def count(self, what: str, min_item: int) -> int:
        n = self.take("Q")
        if n * max(min_item, 1) > self.left():
            self.fail(f"{what} {n} does not fit the file ({self.left()} bytes left)")
        return n

    def raw_string(self, what: str, max_len: int | None = None) -> bytes:
        n = self.count(f"{what} length", 1)
        if max_len is not None and n > max_len:
            self.fail(f"{what} of {n} bytes (at most {max_len})")
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return data

    def name(self, what: str, max_len: int) -> str:
        """A key or tensor name: printable ASCII (what llama.cpp and gguf-py write)."""
        data = self.raw_string(what, max_len)
        if not data.isascii() or not data.decode("ascii").isprintable():
            self.fail(f"{what} {data[:40]!r} is not printable ASCII")
        return data.decode("ascii")

    def string(self, what: str, max_len: int | None = None) -> str:
        data = self.raw_string(what, max_len)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} {data[:40]!r} is not UTF-8")


def parse(buf, path, file_size: int | None = None) -> Header:
    """The header of the GGUF whose first bytes are `buf` (all of the header must be in it).
    file_size: the whole file's size, for the tensors' data bounds (default len(buf))."""
    size = len(buf) if file_size is None else file_size
    c = _Cursor(buf, path, len(buf))
    if len(buf) < 4 or bytes(buf[:4]) != MAGIC:
        raise ShardSetError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected "
                            f"{MAGIC!r})")
    c.pos = 4
    version = c.take("I")
    if version not in VERSIONS:
        c.fail(f"GGUF version {version} (this edgemoe reads {', '.join(map(str, VERSIONS))})")
    n_tensors = c.take("Q")
    n_kv = c.take("Q")
    # Each key-value takes at least 13 bytes, each tensor info at least 32: counts beyond what
    # the file can hold are refused before anything is allocated for them.
    if n_kv * 13 + n_tensors * 32 > c.left():
        c.fail(f"{n_kv} keys and {n_tensors} tensors do not fit the file ({c.left()} bytes "
               "left)")
    h = Header(version=version, alignment=DEFAULT_ALIGNMENT, data_start=0)
    for _ in range(n_kv):
        key = c.name("key", MAX_KEY)
        if key in h.kv_types:
            c.fail(f"key '{key}' appears twice")
        vtype = c.take("I")
        h.kv_types[key] = vtype
        h.kv[key] = _value(c, key, vtype, h.array_info)
    if "general.alignment" in h.kv:
        align = h.kv["general.alignment"]
        if h.kv_types["general.alignment"] != 4 or align == 0 or align & (align - 1):
            c.fail(f"general.alignment {align!r} is not a power of two (uint32)")
        h.alignment = align
    names = set()
    for _ in range(n_tensors):
        name = c.name("tensor name", MAX_NAME)
        if name in names:
            c.fail(f"tensor {name} appears twice")
        names.add(name)
        n_dims = c.take("I")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS})")
        ne = tuple(c.take("Q") for _ in range(n_dims))
        if any(d < 1 or d >= 1 << 62 for d in ne):
            c.fail(f"tensor {name} has dimensions {list(ne)}")
        ggml_type = c.take("I")
        offset = c.take("Q")
        nbytes = tensor_nbytes(ggml_type, ne)
        if nbytes is None:
            c.fail(f"tensor {name}: {type_name(ggml_type)} cannot hold ne {list(ne)}")
        h.tensors.append(TensorHeader(name, ne, ggml_type, offset, nbytes))
    h.data_start = -(-c.pos // h.alignment) * h.alignment
    end = h.data_start
    for t in sorted(h.tensors, key=lambda t: t.offset):
        if t.offset % h.alignment:
            c.fail(f"tensor {t.name} offset {t.offset} is not a multiple of {h.alignment}")
        if h.data_start + t.offset < end:
            c.fail(f"tensor {t.name} overlaps the tensor before it")
        end = h.data_start + t.offset + t.nbytes
        if end > size:
            raise ShardSetError(f"{path}: tensor {t.name} ends at byte {end}, past the end of the "
                                f"{size}-byte file (truncated?)")
    h.tensors = [TensorHeader(t.name, t.ne, t.type, h.data_start + t.offset, t.nbytes)
                 for t in h.tensors]
    return h


def _value(c: _Cursor, key: str, vtype: int, arrays: dict):
    if vtype == STRING:
        return c.string(f"value of {key}")
    if vtype in _SCALARS:
        return c.take(_SCALARS[vtype])
    if vtype != ARRAY:
        c.fail(f"key '{key}' has unknown value type {vtype}")
    etype = c.take("I")
    if etype == STRING:
        n = c.count(f"array {key}", 8)
        arrays[key] = (etype, n)
        # checked, not kept (token lists are libllama's to read); inlined: 150k strings
        buf, pos, limit, length = c.buf, c.pos, c.limit, _U64.unpack_from
        for i in range(n):
            if pos + 8 > limit:
                c.pos = pos
                c.fail(f"array {key} truncated at element {i}")
            pos += 8 + length(buf, pos)[0]
            if pos > limit:
                c.pos = limit
                c.fail(f"element {i} of {key} runs past the end")
        c.pos = pos
        return None
    if etype not in _SCALARS:
        c.fail(f"array '{key}' has element type {etype}" + (" (nested arrays are not supported)"
                                                             if etype == ARRAY else ""))
    size = _SIZES[etype]
    n = c.count(f"array {key}", size)
    arrays[key] = (etype, n)
    start = c.pos
    c.pos += n * size
    if n > MAX_ARRAY:
        return None
    return list(struct.unpack_from(f"<{n}{_SCALARS[etype]}", c.buf, start))


def read_header(path: str | os.PathLike) -> Header:
    """Check the header of the GGUF file at `path` (mapped, not read whole)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ShardSetError(f"{path}: {size} bytes, too short for a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    return parse(view, path, size)
                finally:
                    view.release()
    except OSError as exc:
        raise ShardSetError(f"{path}: cannot read ({exc.strerror or exc})") from None


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
    """`fields` {key: Field} and `tensors` [TensorInfo] of the GGUF file at `path`, with
    `data_start` (where tensor data begins), `alignment`, `file_size` and `header_crc32` (of
    every byte before the data). The header's page cache is dropped afterwards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                if self.file_size < 24:
                    raise ShardSetError(f"{self.path}: {self.file_size} bytes, too short for a "
                                        "GGUF header")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    view = memoryview(m)
                    try:
                        h = parse(view, self.path, self.file_size)
                        self.header_crc32 = zlib.crc32(view[:h.data_start])
                    finally:
                        view.release()
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, h.data_start, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise ShardSetError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        self.alignment, self.data_start = h.alignment, h.data_start
        self.fields: dict[str, Field] = {}
        for key, value in h.kv.items():
            etype_count = h.array_info.get(key)
            self.fields[key] = Field(key, GGUFValueType(h.kv_types[key]), value,
                                     etype_count[1] if etype_count else 1)
        self.tensors = [TensorInfo(t.name, t.ne, GGMLQuantizationType(t.type), t.nbytes, t.offset)
                        for t in h.tensors]


def gguf_reader(path: str | os.PathLike, error: type = ShardSetError):
    """gguf-py's GGUFReader for `path` (the converter reads its sources' vocabularies with it),
    after `read_header` accepted the file; every failure is one `error` naming the file."""
    from gguf import GGUFReader

    try:
        read_header(path)
    except ShardSetError as exc:
        raise error(str(exc)) from None
    try:
        return GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - whatever gguf-py raises, the file is the cause
        raise error(f"{path}: not a readable GGUF ({type(exc).__name__}: {exc})") from None
