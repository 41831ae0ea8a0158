"""Memory-mapped safetensors reading with numpy only (no torch), one block of rows at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor names to
{dtype, shape, data_offsets}, then the raw data. We validate the whole header up front so a
truncated or corrupt file fails with its name before any output is written, and we read rows
through mmap, dropping the pages after each block so resident memory stays near one block.
"""
from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.errors import ConvertError

INDEX_FILE = "model.safetensors.index.json"
# A header larger than this is not a real checkpoint's (they are a few MB at most).
_MAX_HEADER = 256 << 20

# dtypes we convert to float32; bfloat16 is the high half of a float32 bit pattern.
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


@dataclass(frozen=True)
class StTensor:
    name: str
    file: Path
    dtype: str                # safetensors spelling: F32, F16, BF16
    shape: tuple[int, ...]
    start: int                # absolute byte offset in the file
    nbytes: int


def _parse_header(path: Path) -> dict[str, StTensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ConvertError(f"{path}: corrupt or truncated safetensors header (header length "
                               f"{n} bytes, file is {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    data_size = size - data_start
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                        "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(dtype)
            count = int(np.prod(shape, dtype=np.int64))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConvertError(f"{path}: corrupt safetensors header entry for tensor {name}") \
                from exc
        if itemsize is not None and end - begin != count * itemsize:
            raise ConvertError(f"{path}: tensor {name}: {end - begin} bytes for {dtype} shape "
                               f"{list(shape)}, expected {count * itemsize}")
        if not 0 <= begin <= end <= data_size:
            raise ConvertError(f"{path}: truncated: tensor {name} needs data bytes "
                               f"[{begin}, {end}) but the file holds only {data_size}")
        tensors[name] = StTensor(name=name, file=path, dtype=dtype, shape=shape,
                                 start=data_start + begin, nbytes=end - begin)
    return tensors


class SafetensorsCheckpoint:
    """Every tensor of a checkpoint directory (one file, or many with their index)."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
                raise ConvertError(f"{index}: unreadable index ({exc})") from exc
            files = sorted({self.dir / f for f in weight_map.values()})
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise ConvertError(f"{index}: lists {missing[0].name}, which does not exist")
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise ConvertError(f"{self.dir}: no *.safetensors files")
            weight_map = None
        self.tensors: dict[str, StTensor] = {}
        for path in files:
            for name, t in _parse_header(path).items():
                if name in self.tensors:
                    raise ConvertError(f"tensor {name} appears in both {self.tensors[name].file.name}"
                                       f" and {path.name}")
                if weight_map is not None and weight_map.get(name) != path.name:
                    raise ConvertError(f"{path}: holds tensor {name}, which {INDEX_FILE} places in "
                                       f"{weight_map.get(name)}")
                self.tensors[name] = t
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.tensors))
            if absent:
                raise ConvertError(f"tensor {absent[0]}: listed in {INDEX_FILE} under "
                                   f"{weight_map[absent[0]]} but not in that file")
        self._maps: dict[Path, mmap.mmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def check_dtype(self, name: str) -> None:
        t = self.tensors[name]
        if t.dtype not in _DTYPES:
            raise ConvertError(f"{t.file}: tensor {name} has unsupported dtype {t.dtype} "
                               f"(supported: {', '.join(_DTYPES)})")

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    def read_rows(self, name: str, first: int, stop: int) -> np.ndarray:
        """Rows [first, stop) of tensor `name` (rows = last axis) as a float32 (rows, n) array."""
        self.check_dtype(name)
        t = self.tensors[name]
        n_per_row = t.shape[-1] if t.shape else 1
        dtype = _DTYPES[t.dtype]
        m = self._map(t.file)
        offset = t.start + first * n_per_row * dtype.itemsize
        count = (stop - first) * n_per_row
        raw = np.frombuffer(m, dtype=dtype, count=count, offset=offset)
        if t.dtype == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.astype(np.float32)
        del raw
        # The rows are copied out; let the kernel drop their pages from our resident set.
        page = mmap.PAGESIZE
        lo = offset // page * page
        hi = offset + count * dtype.itemsize
        if hasattr(m, "madvise") and hi > lo:
            m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        return out.reshape(stop - first, n_per_row)


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConvertError(f"{model_dir}: no config.json (expected a Hugging Face checkpoint "
                           "directory or a .gguf file)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise ConvertError(f"{path}: not a JSON object")
    return config

