"""ggml tensor types: sizes, and quantize / dequantize through ggml itself.

The bytes we write must be exactly what llama.cpp would produce, so quantization goes through
`ggml_quantize_chunk` of the libggml-base that llama-cpp-python ships, and dequantization through
that type's `to_float` from `ggml_get_type_traits`. Type names are llama.cpp's spelling (Q4_K, F16,
...) matched case-insensitively; numeric ids come from gguf-py's GGMLQuantizationType, and on first
use we check that ggml agrees with gguf-py about every supported type's block and byte sizes, so a
mismatched library fails loudly instead of writing garbage.

Shapes follow numpy order (outermost first); a "row" is the last numpy axis, which is ggml's ne[0].
"""
from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgemoe import _lib
from edgemoe.errors import EdgeMoeError

GGMLType = GGMLQuantizationType

# Types we quantize to: every one ggml can produce without an importance matrix among the
# classic and K families, and MXFP4 (gpt-oss's published expert type). Others (IQ*, TQ*) need an
# imatrix or are experimental.
SUPPORTED = tuple(GGMLType[n] for n in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4"))

# When a row length is not a multiple of a K-quant's 256-element super-block, use the 32-block
# type of at least the same bits per weight (the substitution llama.cpp's quantizer makes);
# when even 32 does not divide the row, F16 (block 1) always fits.
_ROW_FALLBACK = {
    GGMLType.Q2_K: GGMLType.Q4_0, GGMLType.Q3_K: GGMLType.Q4_0, GGMLType.Q4_K: GGMLType.Q5_0,
    GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0,
}

# Rows quantized per ggml call when splitting a tensor across threads.
_MIN_ROWS_PER_TASK = 64


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _Ggml:
    """The handful of libggml-base functions this module uses, bound once."""

    def __init__(self) -> None:
        lib = _lib.ggml_base()
        self.quantize_chunk = lib.ggml_quantize_chunk
        self.quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
        self.quantize_chunk.restype = ctypes.c_size_t
        self.quantize_init = lib.ggml_quantize_init
        self.quantize_init.argtypes = [ctypes.c_int]
        self.quantize_init.restype = None
        self.requires_imatrix = lib.ggml_quantize_requires_imatrix
        self.requires_imatrix.argtypes = [ctypes.c_int]
        self.requires_imatrix.restype = ctypes.c_bool
        self.get_type_traits = lib.ggml_get_type_traits
        self.get_type_traits.argtypes = [ctypes.c_int]
        self.get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        self.row_size = lib.ggml_row_size
        self.row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self.row_size.restype = ctypes.c_size_t
        self.blck_size = lib.ggml_blck_size
        self.blck_size.argtypes = [ctypes.c_int]
        self.blck_size.restype = ctypes.c_int64
        self.type_size = lib.ggml_type_size
        self.type_size.argtypes = [ctypes.c_int]
        self.type_size.restype = ctypes.c_size_t
        self.to_float: dict[int, _TO_FLOAT] = {}
        for t in SUPPORTED:
            block, size = GGML_QUANT_SIZES[t]
            if (self.blck_size(t), self.type_size(t)) != (block, size):
                raise EdgeMoeError(
                    f"libggml disagrees with gguf-py on {t.name}: block/bytes "
                    f"{self.blck_size(t)}/{self.type_size(t)} vs {block}/{size}; "
                    f"install llama-cpp-python=={_lib.LLAMA_CPP_PYTHON_VERSION}")
            if self.requires_imatrix(t):
                raise EdgeMoeError(f"libggml says {t.name} needs an importance matrix")
            traits = self.get_type_traits(t).contents
            if t != GGMLType.F32:
                if not traits.to_float:
                    raise EdgeMoeError(f"libggml has no to_float for {t.name}")
                self.to_float[t] = _TO_FLOAT(traits.to_float)


@lru_cache(maxsize=None)
def _ggml() -> _Ggml:
    return _Ggml()


def parse_type(name: str | GGMLType) -> GGMLType:
    """A supported ggml type from llama.cpp's spelling, case-insensitive ('q4_k' -> Q4_K)."""
    if isinstance(name, GGMLType):
        t = name
    else:
        try:
            t = GGMLType[str(name).strip().upper()]
        except KeyError:
            t = None
    if t not in SUPPORTED:
        raise EdgeMoeError(f"unsupported tensor type '{name}'; supported: "
                           + ", ".join(s.name for s in SUPPORTED))
    return t


def block_size(t: GGMLType) -> int:
    return GGML_QUANT_SIZES[t][0]


def type_size(t: GGMLType) -> int:
    """Bytes of one block."""
    return GGML_QUANT_SIZES[t][1]


def row_size(t: GGMLType, n_per_row: int) -> int:
    block, size = GGML_QUANT_SIZES[t]
    if n_per_row % block:
        raise EdgeMoeError(f"a row of {n_per_row} elements is not a multiple of the "
                           f"{t.name} block ({block})")
    return n_per_row // block * size


def nbytes(t: GGMLType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of numpy `shape` (last axis = row) stored as `t`."""
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * row_size(t, shape[-1])


def fits(t: GGMLType, n_per_row: int) -> bool:
    return n_per_row % block_size(t) == 0


def choose_type(requested: GGMLType, n_per_row: int) -> tuple[GGMLType, str | None]:
    """The type to use for rows of `n_per_row`: `requested` if it fits, else a fallback and why."""
    if fits(requested, n_per_row):
        return requested, None
    used = _ROW_FALLBACK.get(requested, GGMLType.F16)
    if not fits(used, n_per_row):
        used = GGMLType.F16
    why = (f"row of {n_per_row} elements is not a multiple of the {requested.name} block "
           f"({block_size(requested)})")
    return used, why


def _threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


@lru_cache(maxsize=None)
def _pool() -> ThreadPoolExecutor:
    # One pool for the process: starting threads per tensor costs more than small tensors take.
    return ThreadPoolExecutor(_threads(), thread_name_prefix="edgemoe-quant")


def quantize(data: np.ndarray, t: GGMLType) -> np.ndarray:
    """Quantize a float32 array (rows along the last axis) to `t`; returns its bytes as uint8."""
    t = parse_type(t)
    src = np.ascontiguousarray(data, dtype=np.float32)
    if src.ndim == 0 or src.size == 0:
        raise EdgeMoeError(f"cannot quantize an empty tensor of shape {data.shape}")
    n_per_row = src.shape[-1]
    nrows = src.size // n_per_row
    out = np.empty(nbytes(t, src.shape), dtype=np.uint8)
    if t == GGMLType.F32:
        out[:] = src.reshape(-1).view(np.uint8)
        return out
    ggml = _ggml()
    # Table set-up happens once here, not concurrently inside the worker calls.
    ggml.quantize_init(t)
    src_ptr, dst_ptr = src.ctypes.data, out.ctypes.data

    def run(first_row: int, rows: int) -> int:
        # ggml takes `start` in elements and writes row `first_row` at its own offset in dst.
        return ggml.quantize_chunk(t, src_ptr, dst_ptr, first_row * n_per_row, rows, n_per_row,
                                   None)

    n_tasks = min(_threads(), max(1, nrows // _MIN_ROWS_PER_TASK))
    if n_tasks == 1:
        written = run(0, nrows)
    else:
        # ctypes drops the GIL during each call, so row chunks quantize in parallel.
        step = -(-nrows // n_tasks)
        written = sum(_pool().map(lambda r0: run(r0, min(step, nrows - r0)),
                                  range(0, nrows, step)))
    if written != out.size:
        raise EdgeMoeError(f"ggml_quantize_chunk wrote {written} bytes for {t.name}, "
                           f"expected {out.size}")
    return out


def dequantize(raw: np.ndarray | bytes | memoryview, t: GGMLType,
               shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of numpy `shape` from the bytes of a tensor stored as `t`."""
    t = parse_type(t)
    buf = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw
    buf = np.ascontiguousarray(buf.reshape(-1).view(np.uint8))
    expected = nbytes(t, tuple(shape))
    if buf.size != expected:
        raise EdgeMoeError(f"{t.name} tensor of shape {tuple(shape)} needs {expected} bytes, "
                           f"got {buf.size}")
    if t == GGMLType.F32:
        return buf.view(np.float32).reshape(shape).copy()
    out = np.empty(shape, dtype=np.float32)
    _ggml().to_float[t](buf.ctypes.data, out.ctypes.data, out.size)
    return out
