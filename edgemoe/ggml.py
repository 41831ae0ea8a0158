"""ctypes bindings of the part of ggml's C API the runtime uses, and objects that own its handles.

Tensors, graphs and contexts are opaque pointers (Python ints): we never mirror ggml's structs,
because their layout moves between releases; shapes are known to the code that builds a graph
and byte sizes come from ggml's own accessors (ggml_row_size, ggml_nbytes). The ABI followed is
the one of llama-cpp-python pinned in edgemoe._lib.

Three layers:
- `lib`: the raw functions, each with argtypes/restype set (bound once, on first use);
- owned handles: `Context` (a no_alloc ggml_context that holds tensor/graph metadata),
  `Buffer` (backend memory holding a context's tensors), `Backend` (a device and its stream),
  `Scheduler` (ggml_backend_sched: compute-buffer reuse and splitting across backends);
- `Ops`: graph-building helpers bound to one context, named after the ggml ops.
Nothing above this module knows which device runs the graph.
"""
from __future__ import annotations

import ctypes
import os
import socket
import struct
import sys
import threading
import time
from ctypes import POINTER, c_bool, c_char_p, c_float, c_int, c_int64, c_size_t, c_void_p

import numpy as np
from gguf.constants import GGMLQuantizationType as GGMLType

from edgemoe import _lib
from edgemoe.errors import EdgeMoeError

__all__ = ["GGMLType", "lib", "Context", "Buffer", "MappedBuffer", "Backend", "Scheduler", "Ops",
           "row_size", "tensor_set", "tensor_get", "list_devices", "ROPE_NORM", "ROPE_NEOX"]

# ggml.h: GGML_ROPE_TYPE_NORMAL / GGML_ROPE_TYPE_NEOX
ROPE_NORM = 0
ROPE_NEOX = 2
# ggml-backend.h: enum ggml_backend_dev_type
DEV_CPU, DEV_GPU, DEV_IGPU, DEV_ACCEL = 0, 1, 2, 3
_DEV_TYPE_NAMES = {DEV_CPU: "cpu", DEV_GPU: "gpu", DEV_IGPU: "igpu", DEV_ACCEL: "accel"}
# ggml.h: enum ggml_status
_STATUS = {-2: "allocation failed", -1: "failed", 1: "aborted"}

T = c_void_p  # struct ggml_tensor *


class _InitParams(ctypes.Structure):
    # struct ggml_init_params: the one struct passed by value; it is part of the stable API.
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


# name -> (library getter, restype, argtypes)
_SIGNATURES = {
    # context and tensors
    "ggml_init": (_lib.ggml_base, c_void_p, [_InitParams]),
    "ggml_free": (_lib.ggml_base, None, [c_void_p]),
    "ggml_tensor_overhead": (_lib.ggml_base, c_size_t, []),
    "ggml_graph_overhead_custom": (_lib.ggml_base, c_size_t, [c_size_t, c_bool]),
    "ggml_new_tensor_1d": (_lib.ggml_base, T, [c_void_p, c_int, c_int64]),
    "ggml_new_tensor_2d": (_lib.ggml_base, T, [c_void_p, c_int, c_int64, c_int64]),
    "ggml_new_tensor_3d": (_lib.ggml_base, T, [c_void_p, c_int, c_int64, c_int64, c_int64]),
    "ggml_set_name": (_lib.ggml_base, T, [T, c_char_p]),
    "ggml_set_input": (_lib.ggml_base, None, [T]),
    "ggml_set_output": (_lib.ggml_base, None, [T]),
    "ggml_nbytes": (_lib.ggml_base, c_size_t, [T]),
    "ggml_row_size": (_lib.ggml_base, c_size_t, [c_int, c_int64]),
    # ops
    "ggml_add": (_lib.ggml_base, T, [c_void_p, T, T]),
    "ggml_mul": (_lib.ggml_base, T, [c_void_p, T, T]),
    "ggml_div": (_lib.ggml_base, T, [c_void_p, T, T]),
    "ggml_mul_mat": (_lib.ggml_base, T, [c_void_p, T, T]),
    "ggml_mul_mat_id": (_lib.ggml_base, T, [c_void_p, T, T, T]),
    "ggml_rms_norm": (_lib.ggml_base, T, [c_void_p, T, c_float]),
    "ggml_norm": (_lib.ggml_base, T, [c_void_p, T, c_float]),
    "ggml_sub": (_lib.ggml_base, T, [c_void_p, T, T]),
    "ggml_abs": (_lib.ggml_base, T, [c_void_p, T]),
    "ggml_neg": (_lib.ggml_base, T, [c_void_p, T]),
    "ggml_relu": (_lib.ggml_base, T, [c_void_p, T]),
    "ggml_step": (_lib.ggml_base, T, [c_void_p, T]),
    "ggml_exp": (_lib.ggml_base, T, [c_void_p, T]),
    "ggml_log": (_lib.ggml_base, T, [c_void_p, T]),
    "ggml_repeat_4d": (_lib.ggml_base, T, [c_void_p, T, c_int64, c_int64, c_int64, c_int64]),
    "ggml_concat": (_lib.ggml_base, T, [c_void_p, T, T, c_int]),
    "ggml_add_id": (_lib.ggml_base, T, [c_void_p, T, T, T]),
    "ggml_swiglu_oai": (_lib.ggml_base, T, [c_void_p, T, T, c_float, c_float]),
    "ggml_flash_attn_ext_add_sinks": (_lib.ggml_base, None, [T, T]),
    "ggml_rope_ext": (_lib.ggml_base, T, [c_void_p, T, T, T, c_int, c_int, c_int, c_float,
                                         c_float, c_float, c_float, c_float, c_float]),
    "ggml_soft_max": (_lib.ggml_base, T, [c_void_p, T]),
    "ggml_flash_attn_ext": (_lib.ggml_base, T, [c_void_p, T, T, T, T, c_float, c_float, c_float]),
    "ggml_get_rows": (_lib.ggml_base, T, [c_void_p, T, T]),
    "ggml_set_rows": (_lib.ggml_base, T, [c_void_p, T, T, T]),
    "ggml_argsort_top_k": (_lib.ggml_base, T, [c_void_p, T, c_int]),
    "ggml_sum_rows": (_lib.ggml_base, T, [c_void_p, T]),
    "ggml_clamp": (_lib.ggml_base, T, [c_void_p, T, c_float, c_float]),
    "ggml_scale": (_lib.ggml_base, T, [c_void_p, T, c_float]),
    "ggml_sqr": (_lib.ggml_base, T, [c_void_p, T]),
    "ggml_sqrt": (_lib.ggml_base, T, [c_void_p, T]),
    "ggml_cpy": (_lib.ggml_base, T, [c_void_p, T, T]),
    "ggml_sigmoid": (_lib.ggml_base, T, [c_void_p, T]),
    "ggml_swiglu_split": (_lib.ggml_base, T, [c_void_p, T, T]),
    "ggml_reshape_2d": (_lib.ggml_base, T, [c_void_p, T, c_int64, c_int64]),
    "ggml_reshape_3d": (_lib.ggml_base, T, [c_void_p, T, c_int64, c_int64, c_int64]),
    "ggml_view_2d": (_lib.ggml_base, T, [c_void_p, T, c_int64, c_int64, c_size_t, c_size_t]),
    "ggml_view_3d": (_lib.ggml_base, T, [c_void_p, T, c_int64, c_int64, c_int64, c_size_t,
                                        c_size_t, c_size_t]),
    "ggml_permute": (_lib.ggml_base, T, [c_void_p, T, c_int, c_int, c_int, c_int]),
    "ggml_cont": (_lib.ggml_base, T, [c_void_p, T]),
    # graphs
    "ggml_new_graph_custom": (_lib.ggml_base, c_void_p, [c_void_p, c_size_t, c_bool]),
    "ggml_build_forward_expand": (_lib.ggml_base, None, [c_void_p, T]),
    # backend: buffers and tensor data
    "ggml_backend_alloc_ctx_tensors_from_buft": (_lib.ggml_base, c_void_p, [c_void_p, c_void_p]),
    "ggml_backend_buffer_free": (_lib.ggml_base, None, [c_void_p]),
    "ggml_backend_buffer_get_size": (_lib.ggml_base, c_size_t, [c_void_p]),
    "ggml_backend_buffer_clear": (_lib.ggml_base, None, [c_void_p, ctypes.c_uint8]),
    "ggml_backend_tensor_set": (_lib.ggml_base, None, [T, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_tensor_get": (_lib.ggml_base, None, [T, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_tensor_alloc": (_lib.ggml_base, c_int, [c_void_p, T, c_void_p]),
    "ggml_backend_dev_buffer_from_host_ptr": (_lib.ggml_base, c_void_p,
                                              [c_void_p, c_void_p, c_size_t, c_size_t]),
    # backend: devices and streams
    "ggml_backend_dev_count": (_lib.ggml, c_size_t, []),
    "ggml_backend_dev_get": (_lib.ggml, c_void_p, [c_size_t]),
    "ggml_backend_dev_name": (_lib.ggml_base, c_char_p, [c_void_p]),
    "ggml_backend_dev_description": (_lib.ggml_base, c_char_p, [c_void_p]),
    "ggml_backend_dev_type": (_lib.ggml_base, c_int, [c_void_p]),
    "ggml_backend_dev_init": (_lib.ggml_base, c_void_p, [c_void_p, c_char_p]),
    "ggml_backend_dev_buffer_type": (_lib.ggml_base, c_void_p, [c_void_p]),
    "ggml_backend_dev_backend_reg": (_lib.ggml_base, c_void_p, [c_void_p]),
    "ggml_backend_reg_get_proc_address": (_lib.ggml_base, c_void_p, [c_void_p, c_char_p]),
    "ggml_backend_free": (_lib.ggml_base, None, [c_void_p]),
    "ggml_backend_dev_memory": (_lib.ggml_base, None, [c_void_p, POINTER(c_size_t),
                                                       POINTER(c_size_t)]),
    "ggml_backend_dev_supports_op": (_lib.ggml_base, c_bool, [c_void_p, T]),
    "ggml_backend_dev_host_buffer_type": (_lib.ggml_base, c_void_p, [c_void_p]),
    "ggml_backend_buft_name": (_lib.ggml_base, c_char_p, [c_void_p]),
    "ggml_backend_buft_is_host": (_lib.ggml_base, c_bool, [c_void_p]),
    "ggml_backend_reg_by_name": (_lib.ggml, c_void_p, [c_char_p]),
    "ggml_backend_reg_dev_count": (_lib.ggml_base, c_size_t, [c_void_p]),
    "ggml_backend_reg_dev_get": (_lib.ggml_base, c_void_p, [c_void_p, c_size_t]),
    "ggml_backend_device_register": (_lib.ggml, None, [c_void_p]),
    "ggml_set_abort_callback": (_lib.ggml_base, c_void_p, [c_void_p]),
    "ggml_backend_view_init": (_lib.ggml_base, c_int, [T]),
    "ggml_log_set": (_lib.ggml_base, None, [c_void_p, c_void_p]),
    # backend: scheduler
    "ggml_backend_sched_new": (_lib.ggml_base, c_void_p, [POINTER(c_void_p), POINTER(c_void_p),
                                                         c_int, c_size_t, c_bool, c_bool]),
    "ggml_backend_sched_free": (_lib.ggml_base, None, [c_void_p]),
    "ggml_backend_sched_reserve": (_lib.ggml_base, c_bool, [c_void_p, c_void_p]),
    "ggml_backend_sched_reset": (_lib.ggml_base, None, [c_void_p]),
    "ggml_backend_sched_alloc_graph": (_lib.ggml_base, c_bool, [c_void_p, c_void_p]),
    "ggml_backend_sched_graph_compute": (_lib.ggml_base, c_int, [c_void_p, c_void_p]),
    "ggml_backend_sched_get_buffer_size": (_lib.ggml_base, c_size_t, [c_void_p, c_void_p]),
    "ggml_backend_sched_set_eval_callback": (_lib.ggml_base, None, [c_void_p, c_void_p, c_void_p]),
    "ggml_op_desc": (_lib.ggml_base, c_char_p, [T]),
}


class _Lib:
    """Attribute access to the bound C functions; each is bound on first use."""

    _lock = threading.Lock()

    def __getattr__(self, name: str):
        try:
            getter, restype, argtypes = _SIGNATURES[name]
        except KeyError:
            raise AttributeError(f"{name} is not bound in edgemoe.ggml") from None
        with self._lock:
            fn = getattr(getter(), name)
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)
        return fn


lib = _Lib()


def row_size(ggml_type: int, ne0: int) -> int:
    """Bytes of one row of `ne0` elements of `ggml_type` (ggml's own arithmetic)."""
    return lib.ggml_row_size(int(ggml_type), ne0)


def _check(ptr, what: str):
    if not ptr:
        raise EdgeMoeError(f"ggml: {what} failed")
    return ptr


class Context:
    """A ggml context holding only tensor and graph metadata (no_alloc): data lives in backend
    buffers. `n_tensors` and `graph_size` bound what it can hold."""

    def __init__(self, n_tensors: int, graph_size: int = 0):
        mem = n_tensors * lib.ggml_tensor_overhead()
        if graph_size:
            mem += lib.ggml_graph_overhead_custom(graph_size, False)
        self.graph_size = graph_size
        self.nbytes = mem  # host memory ggml_init allocates for the metadata
        self.ptr = _check(lib.ggml_init(_InitParams(mem, None, True)), "ggml_init")

    def new_tensor(self, ggml_type: int, ne: tuple[int, ...], name: str | None = None) -> int:
        t = int(ggml_type)
        if len(ne) == 1:
            out = lib.ggml_new_tensor_1d(self.ptr, t, ne[0])
        elif len(ne) == 2:
            out = lib.ggml_new_tensor_2d(self.ptr, t, ne[0], ne[1])
        elif len(ne) == 3:
            out = lib.ggml_new_tensor_3d(self.ptr, t, ne[0], ne[1], ne[2])
        else:
            raise ValueError(f"tensors of {len(ne)} dimensions are not used: {ne}")
        _check(out, f"creating tensor {name or ''} {ne}")
        if name:
            lib.ggml_set_name(out, name.encode())
        return out

    def new_graph(self) -> int:
        return _check(lib.ggml_new_graph_custom(self.ptr, self.graph_size, False), "new graph")

    def close(self) -> None:
        if self.ptr:
            lib.ggml_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


class Buffer:
    """Backend memory holding every tensor of a context (weights, expert slots, KV cache)."""

    ptr = None

    def __init__(self, ctx: Context, buffer_type: int, what: str):
        self.buffer_type = buffer_type
        self.ptr = lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx.ptr, buffer_type)
        if not self.ptr:
            raise EdgeMoeError(f"cannot allocate the backend buffer for {what}")
        self.nbytes = lib.ggml_backend_buffer_get_size(self.ptr)

    def clear(self, value: int = 0) -> None:
        lib.ggml_backend_buffer_clear(self.ptr, value)

    def close(self) -> None:
        if self.ptr:
            lib.ggml_backend_buffer_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = c_void_p
_libc.mmap.argtypes = [c_void_p, c_size_t, c_int, c_int, c_int, ctypes.c_long]
_libc.munmap.restype = c_int
_libc.munmap.argtypes = [c_void_p, c_size_t]
_PROT_READ, _MAP_SHARED, _MAP_FAILED = 1, 1, c_void_p(-1).value


class MappedBuffer:
    """A file mapped read-only and a backend buffer over the mapping, for weights used in place
    (llama.cpp's mmap loading): pages are read from the file on first touch and are page cache,
    counted once and never copied. Tensors of a no_alloc context are placed at file offsets with
    `place`. Only for a device that can use host memory (the CPU)."""

    ptr = None
    addr = None

    def __init__(self, path, device: int, what: str):
        fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(fd).st_size
            addr = _libc.mmap(None, self.size, _PROT_READ, _MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr is None or addr == _MAP_FAILED:
            raise EdgeMoeError(f"cannot map {path} ({os.strerror(ctypes.get_errno())})")
        self.addr = addr
        self.ptr = lib.ggml_backend_dev_buffer_from_host_ptr(device, addr, self.size, self.size)
        if not self.ptr:
            self.close()
            raise EdgeMoeError(f"cannot make a backend buffer over {what}")

    def place(self, tensor: int, offset: int) -> None:
        if lib.ggml_backend_tensor_alloc(self.ptr, tensor, self.addr + offset) != 0:
            raise EdgeMoeError(f"cannot place a tensor at offset {offset} of the mapped file")

    def close(self) -> None:
        if self.ptr:
            lib.ggml_backend_buffer_free(self.ptr)   # does not own the mapping
            self.ptr = None
        if self.addr:
            _libc.munmap(self.addr, self.size)
            self.addr = None

    def __del__(self):
        self.close()


def tensor_set(tensor: int, data, offset: int = 0) -> None:
    """Copy host bytes (a C-contiguous numpy array or buffer) into a backend tensor."""
    arr = np.ascontiguousarray(data) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    lib.ggml_backend_tensor_set(tensor, arr.ctypes.data, offset, arr.nbytes)


def tensor_set_ptr(tensor: int, ptr: int, offset: int, size: int) -> None:
    lib.ggml_backend_tensor_set(tensor, ptr, offset, size)


def copy_bandwidth(backend: "Backend", nbytes: int = 16 << 20, repeats: int = 4) -> float:
    """Bytes per second of host -> device copies into the chosen device's memory
    (ggml_backend_tensor_set of an nbytes tensor, the best of `repeats`), what a slot load
    costs after its read."""
    import time

    ctx = Context(1)
    try:
        t = ctx.new_tensor(GGMLType.I8, (nbytes,))
        buf = Buffer(ctx, backend.weights_buffer_type, "a copy-bandwidth probe")
        try:
            src = np.ones(nbytes, dtype=np.int8)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                tensor_set(t, src)
                best = min(best, time.perf_counter() - start)
        finally:
            buf.close()
    finally:
        ctx.close()
    return nbytes / best


def view_init(view: int) -> None:
    """Give a view (of a tensor already in a backend buffer) its data pointer, and let the
    buffer prepare it (a repacking buffer picks its layout here)."""
    status = lib.ggml_backend_view_init(view)
    if status != 0:
        raise EdgeMoeError(f"ggml_backend_view_init: {_STATUS.get(status, status)}")


def tensor_get(tensor: int, out: np.ndarray, offset: int = 0) -> np.ndarray:
    """Copy a backend tensor's bytes into `out` (C-contiguous) and return it."""
    lib.ggml_backend_tensor_get(tensor, out.ctypes.data, offset, out.nbytes)
    return out


def device_memory(dev: int) -> tuple[int, int]:
    """(free, total) bytes of a device as its backend reports them (the CPU: system RAM)."""
    free, total = c_size_t(0), c_size_t(0)
    lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return int(free.value), int(total.value)


def list_devices() -> list[dict]:
    """The ggml devices this build registered: name, description, kind (cpu/gpu/igpu/accel),
    free and total memory in bytes."""
    _install_logger()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = device_memory(dev)
        out.append({
            "name": lib.ggml_backend_dev_name(dev).decode(),
            "description": lib.ggml_backend_dev_description(dev).decode(),
            "kind": _DEV_TYPE_NAMES.get(lib.ggml_backend_dev_type(dev), "other"),
            "memory_free": free,
            "memory_total": total,
            "handle": dev,
        })
    return out


class _Feature(ctypes.Structure):
    # struct ggml_backend_feature { const char * name; const char * value; } (ggml-backend.h)
    _fields_ = [("name", c_char_p), ("value", c_char_p)]


def backend_features(reg_name: str = "CPU") -> dict[str, str]:
    """What a backend reports of its build and machine (the CPU: AVX2, NEON, DOTPROD,
    REPACK, ... with value 1), through its registry's ggml_backend_get_features."""
    reg = lib.ggml_backend_reg_by_name(reg_name.encode())
    addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features") if reg else None
    if not addr:
        return {}
    items = ctypes.CFUNCTYPE(POINTER(_Feature), c_void_p)(addr)(reg)
    out, i = {}, 0
    while items and items[i].name:
        out[items[i].name.decode()] = (items[i].value or b"").decode()
        i += 1
    return out


# -- llama.cpp's RPC backend: devices of an rpc-server on another machine (or process) --------

_rpc_servers: dict[str, list[str]] = {}   # endpoint -> names of the devices it registered
_rpc_timeouts: dict[str, float] = {}      # endpoint -> seconds a request may go unanswered (0: none)
_rpc_armed: dict[str, float] = {}         # connection ("socket:[inode]") -> when first armed
_rpc_silent: set[str] = set()             # endpoints whose handshake went unanswered
_rpc_guard: list[threading.Thread] = []
RPC_TIMEOUT = 120.0   # the default: far above one graph on a slow peer, far below "forever"
_ABORT_CB = ctypes.CFUNCTYPE(None, c_char_p)
_TCP_ESTABLISHED = 1


def _on_ggml_abort(message: bytes) -> None:
    """ggml is about to abort() the process (its RPC client does on any socket error, a
    timed-out receive included, on a thread of its own): name the peer and exit with an error
    instead of a core dump."""
    text = (message or b"").decode(errors="replace").strip()
    if _rpc_servers and "RPC" in text:
        # A connection still open means the peer went quiet (the timeout fired); a closed one
        # means it went away.
        silent = sorted(_rpc_silent | {endpoint for endpoint, state in _rpc_connections()
                                       if state == _TCP_ESTABLISHED and _rpc_timeouts.get(endpoint)})
        if silent:
            said = ", ".join(f"{e} did not answer within {_rpc_timeouts[e]:g} s" for e in silent)
            sys.stderr.write(f"edgemoe: error: lost the RPC server: {said} (--rpc-timeout; "
                             f"it is stopped, overloaded or unreachable): {text}\n")
        else:
            sys.stderr.write(f"edgemoe: error: lost the RPC server at {', '.join(_rpc_servers)} "
                             f"(it stopped, or refused the connection): {text}\n")
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.write(f"edgemoe: ggml aborted: {text}\n")
    sys.stderr.flush()


_abort_cb = _ABORT_CB(_on_ggml_abort)  # referenced for the life of the process


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgeMoeError(f"RPC endpoint {endpoint!r}: expected HOST:PORT, e.g. 127.0.0.1:50052")
    return host, int(port)


def add_rpc_server(endpoint: str, timeout: float = 5.0, reply_timeout: float = RPC_TIMEOUT
                   ) -> list[str]:
    """Register the devices of llama.cpp's rpc-server at HOST:PORT (ggml-rpc-server from the
    same llama.cpp build) and return their names (RPC0, RPC1, ...). The server is reached with a
    plain TCP connect first, so a dead or refusing peer is an error within `timeout` seconds,
    not an abort inside ggml. ggml's RPC client waits for a reply forever; the connections it
    opens to the server get `reply_timeout` seconds instead (0: none), after which the run ends
    with an error naming the peer: see arm_rpc_sockets."""
    if endpoint in _rpc_servers:
        return _rpc_servers[endpoint]
    if reply_timeout < 0:
        raise EdgeMoeError(f"RPC reply timeout {reply_timeout}: expected seconds >= 0 (0: none)")
    host, port = _parse_endpoint(endpoint)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise EdgeMoeError(f"RPC server {endpoint}: cannot connect ({reason}); start it with "
                           f"`ggml-rpc-server -H {host} -p {port}` on that machine") from None
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    add = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server") if reg else None
    if not add:
        raise EdgeMoeError(f"this ggml build ({_lib.lib_dir()}) has no RPC backend; build one "
                           "with scripts/build_backend.sh rpc and set EDGEMOE_LIB_DIR")
    lib.ggml_set_abort_callback(ctypes.cast(_abort_cb, c_void_p))
    _rpc_timeouts[endpoint] = float(reply_timeout)
    _rpc_servers[endpoint] = []   # its connections are armed from here on (the guard below)
    if reply_timeout and not _rpc_guard and sys.platform.startswith("linux"):
        guard = threading.Thread(target=_guard_rpc_sockets, name="edgemoe-rpc-timeouts",
                                 daemon=True)
        guard.start()
        _rpc_guard.append(guard)
    try:
        server = ctypes.CFUNCTYPE(c_void_p, c_char_p)(add)(endpoint.encode())
        if not server:
            raise EdgeMoeError(f"RPC server {endpoint}: it reported no device")
    except BaseException:
        del _rpc_servers[endpoint]
        raise
    names = []
    for i in range(lib.ggml_backend_reg_dev_count(server)):
        dev = lib.ggml_backend_reg_dev_get(server, i)
        lib.ggml_backend_device_register(dev)
        names.append(lib.ggml_backend_dev_name(dev).decode())
    _rpc_servers[endpoint] = names
    return names


def arm_rpc_sockets() -> int:
    """Give this process's TCP connections to its RPC servers their reply timeouts; returns
    how many were newly armed. ggml's RPC client (one connection per server, opened by ggml
    whenever none is alive) blocks in recv()/send() with no timeout, so a peer that stops
    answering without closing its socket (a stopped process, a link that drops packets) would
    hang the run forever. With SO_RCVTIMEO/SO_SNDTIMEO a wait that long fails, ggml's client
    aborts and _on_ggml_abort names the peer; TCP_USER_TIMEOUT and keepalive probes end a
    connection whose packets go unacknowledged (a dead link) in about the same time. A reply
    only waits while the peer works on a request (ggml sends a graph and waits at the next
    read of its result), so the timeout must exceed the longest graph the peer computes.

    A receive already waiting when its socket is armed keeps waiting (Linux reads the timeout
    when the call starts): ggml's handshake, sent as soon as it connects, is such a wait. A
    connection that has received nothing `timeout` seconds after it was armed is therefore shut
    down here, which ends that wait (and the run, through the same abort)."""
    armed, now = 0, time.monotonic()
    for endpoint, sock, key in _rpc_sockets(_rpc_timeouts):
        try:
            seconds = _rpc_timeouts[endpoint]
            if not seconds:
                continue
            if key in _rpc_armed:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
                received = struct.unpack_from("<Q", info, 128)[0] if len(info) >= 136 else 1
                if not received and now - _rpc_armed[key] > seconds:
                    _rpc_silent.add(endpoint)
                    sock.shutdown(socket.SHUT_RDWR)
                continue
            whole = int(seconds)
            tv = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_KEEPIDLE"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, whole))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, whole // 4))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
            _rpc_armed[key] = now
            armed += 1
        except OSError:
            continue   # closed meanwhile
        finally:
            sock.close()
    return armed


def _guard_rpc_sockets() -> None:
    """Arm every new connection to an RPC server within half a second of its opening, whoever
    opened it (ggml opens one per server when a backend, buffer or query needs it and none is
    alive)."""
    while True:
        try:
            arm_rpc_sockets()
        except Exception:   # noqa: BLE001 - never let the guard die; the next round retries
            pass
        time.sleep(0.5)


def rpc_link_bytes() -> int:
    """Bytes this process sent to and received from its RPC servers so far, summed over its TCP
    connections to them (the kernel's tcp_info counters; 0 without RPC servers or off Linux)."""
    if not _rpc_servers or not sys.platform.startswith("linux"):
        return 0
    total = 0
    for _endpoint, sock, _key in _rpc_sockets(_rpc_servers):
        try:
            # struct tcp_info (linux/tcp.h): __u64 tcpi_bytes_acked at 120, tcpi_bytes_received
            # at 128 (Linux 4.1+).
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
            if len(info) >= 136:
                total += sum(struct.unpack_from("<QQ", info, 120))
        except OSError:
            pass
        finally:
            sock.close()
    return total


def _rpc_connections() -> list[tuple[str, int]]:
    """(endpoint, TCP state: tcpi_state, 1 established) of this process's connections to its
    RPC servers."""
    out = []
    for endpoint, sock, _key in _rpc_sockets(_rpc_servers):
        try:
            out.append((endpoint, sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]))
        except OSError:
            pass
        finally:
            sock.close()
    return out


def _rpc_sockets(endpoints):
    """(endpoint, socket, key) for each of this process's TCP sockets connected to one of
    `endpoints` (HOST:PORT, HOST numeric or a name); the socket is a dup of ggml's descriptor
    (options set on it are the connection's) that the caller closes; key names the connection
    ("socket:[inode]")."""
    if not sys.platform.startswith("linux"):
        return
    peers = {}
    for endpoint in list(endpoints):
        host, port = _parse_endpoint(endpoint)
        try:
            for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP):
                peers[(info[4][0], port)] = endpoint
        except OSError:
            continue
    for name in os.listdir("/proc/self/fd"):
        try:
            key = os.readlink(f"/proc/self/fd/{name}")
            if not key.startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                sock.close()
                continue
            endpoint = peers.get(tuple(sock.getpeername()[:2]))
        except OSError:
            sock.close()
            continue
        if endpoint is None:
            sock.close()
            continue
        yield endpoint, sock, key


# ggml_log_callback: void (*)(enum ggml_log_level level, const char * text, void * user_data)
_LogCallback = ctypes.CFUNCTYPE(None, c_int, c_char_p, c_void_p)
_LOG_WARN, _LOG_CONT = 3, 5
_log_state = {"level": 0, "installed": False}


def _on_log(level: int, text: bytes, _user) -> None:
    """ggml's messages: warnings and errors to stderr; its debug and info chatter (a line per
    repacked tensor, per Vulkan device found, ...) only with EDGEMOE_GGML_LOG=1."""
    if level == _LOG_CONT:
        level = _log_state["level"]
    _log_state["level"] = level
    if level >= _LOG_WARN or os.environ.get("EDGEMOE_GGML_LOG") == "1":
        sys.stderr.write((text or b"").decode(errors="replace"))


_log_cb = _LogCallback(_on_log)  # referenced for the life of the process


def _install_logger() -> None:
    if not _log_state["installed"]:
        lib.ggml_log_set(ctypes.cast(_log_cb, c_void_p), None)
        _log_state["installed"] = True


_SetThreads = ctypes.CFUNCTYPE(None, c_void_p, c_int)
# ggml_backend_sched_eval_callback: bool (*)(struct ggml_tensor * t, bool ask, void * user_data)
_EvalCallback = ctypes.CFUNCTYPE(c_bool, c_void_p, c_bool, c_void_p)


class Backend:
    """The device that runs the graphs: the best one available (a GPU, then an integrated GPU,
    then the CPU) unless `device` names one (a device name such as 'CPU' or 'Vulkan0', or a kind
    such as 'cpu'/'gpu'). When that device is not the CPU, a CPU backend is kept too, for ops the
    device does not support (the scheduler routes them)."""

    backends: list[int] = []

    def __init__(self, device: str | None = None, n_threads: int | None = None):
        _install_logger()
        devices = list_devices()
        if not devices:
            raise EdgeMoeError("ggml registered no device")
        chosen = self.choose(devices, device)
        self.device_name = chosen["name"]
        self.device_kind = chosen["kind"]
        self.backends: list[int] = []
        self.backends.append(_check(lib.ggml_backend_dev_init(chosen["handle"], None),
                                    f"initialising device {self.device_name}"))
        self.buffer_types = [lib.ggml_backend_dev_buffer_type(chosen["handle"])]
        self._devices = [chosen["handle"]]
        if chosen["kind"] != "cpu":
            cpu = next((d for d in devices if d["kind"] == "cpu"), None)
            if cpu is None:
                raise EdgeMoeError("this ggml build registered no CPU device")
            self.backends.append(_check(lib.ggml_backend_dev_init(cpu["handle"], None), "CPU init"))
            self.buffer_types.append(lib.ggml_backend_dev_buffer_type(cpu["handle"]))
            self._devices.append(cpu["handle"])
        # Where each group of tensors went ({what: reason} for groups kept in host memory).
        self.placement: dict[str, str] = {}
        self.set_threads(n_threads)
        if _rpc_timeouts:
            arm_rpc_sockets()   # the connection this backend opened, at once (not in 0.5 s)

    @staticmethod
    def choose(devices: list[dict], device: str | None) -> dict:
        """The device `device` names among `devices` (list_devices()), or the best one."""
        if device:
            for d in devices:
                if device.lower() in (d["name"].lower(), d["kind"]):
                    return d
            names = ", ".join(f"{d['name']} ({d['kind']})" for d in devices)
            raise EdgeMoeError(f"device {device!r} not found; this build has: {names}")
        for kind in ("gpu", "igpu", "cpu"):
            for d in devices:
                if d["kind"] == kind:
                    return d
        return devices[0]

    @property
    def weights_buffer_type(self) -> int:
        return self.buffer_types[0]

    @property
    def maps_host_memory(self) -> bool:
        """Weights can be used in place from a mapped file (the device is the CPU)."""
        return self.device_kind == "cpu"

    @property
    def device(self) -> int:
        return self._devices[0]

    @property
    def host_buffer_type(self) -> int:
        """The CPU's buffer type (the last backend is always the CPU)."""
        return self.buffer_types[-1]

    @property
    def on_host(self) -> bool:
        """True when the chosen device computes from host memory (the CPU itself)."""
        return len(self.backends) == 1

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes of the chosen device."""
        return device_memory(self._devices[0])

    @property
    def uses_rpc(self) -> bool:
        return any(lib.ggml_backend_dev_backend_reg(d) == lib.ggml_backend_reg_by_name(b"RPC")
                   for d in self._devices) if _rpc_servers else False

    def buffer_bytes(self, parts, sched: "Scheduler") -> dict[str, int]:
        """{'host': bytes, 'device': bytes} of the Buffers held by `parts` (objects with a
        `buffer` attribute) and of the scheduler's compute buffers."""
        out = {"host": 0, "device": 0}
        for part in parts:
            buf = getattr(part, "buffer", None)
            if isinstance(buf, Buffer) and buf.ptr:
                out["host" if self.on_host or buf.buffer_type == self.host_buffer_type
                    else "device"] += buf.nbytes
            elif isinstance(buf, MappedBuffer) and buf.ptr:  # a mapped file: host memory
                out["host"] += buf.size
        for i, backend in enumerate(self.backends):
            n = lib.ggml_backend_sched_get_buffer_size(sched.ptr, backend)
            out["host" if self.on_host or i == len(self.backends) - 1 else "device"] += n
        return out

    def extra_buffer_types(self) -> dict[str, int]:
        """The CPU's extra buffer types ({name: buft}, e.g. CPU_REPACK: weights repacked on
        write into the interleaved layouts of the AVX2/NEON matmul kernels)."""
        cpu = self._devices[-1]
        reg = lib.ggml_backend_dev_backend_reg(cpu)
        addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not addr:
            return {}
        array = ctypes.CFUNCTYPE(POINTER(c_void_p), c_void_p)(addr)(cpu)
        out, i = {}, 0
        while array and array[i]:
            out[lib.ggml_backend_buft_name(array[i]).decode()] = array[i]
            i += 1
        return out

    def supports_on_cpu(self, op: int) -> bool:
        return bool(lib.ggml_backend_dev_supports_op(self._devices[-1], op))

    def buffer_type_for(self, what: str, build_ops) -> int:
        """The buffer type for a group of tensors (`what`: e.g. 'expert slots'): the device's,
        if it can run every op that uses them, else the CPU's. ggml's scheduler cannot move a
        tensor that already lives in a device buffer to another backend (it aborts: 'pre-allocated
        tensor in a buffer that cannot run the operation'), so support is checked first, on
        probe ops of the same types and shapes: build_ops(Ops) returns them (a throwaway
        context, no data)."""
        if self.on_host:
            return self.buffer_types[0]
        ctx = Context(1024)
        try:
            ops = build_ops(Ops(ctx))
            missing = [lib.ggml_op_desc(op).decode() for op in ops
                       if not lib.ggml_backend_dev_supports_op(self._devices[0], op)]
        finally:
            ctx.close()
        if not missing:
            return self.buffer_types[0]
        self.placement[what] = (f"host memory: {self.device_name} cannot run "
                                f"{', '.join(sorted(set(missing)))} on them")
        return self.host_buffer_type

    def set_threads(self, n_threads: int | None) -> None:
        """Thread count for every backend that has one (found through the backend registry, so
        this layer stays device-neutral)."""
        n = n_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else (os.cpu_count() or 1))
        self.n_threads = n
        for dev, backend in zip(self._devices, self.backends):
            reg = lib.ggml_backend_dev_backend_reg(dev)
            addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads") if reg else None
            if addr:
                _SetThreads(addr)(backend, n)

    def close(self) -> None:
        for b in self.backends:
            lib.ggml_backend_free(b)
        self.backends = []

    def __del__(self):
        self.close()


class Scheduler:
    """ggml_backend_sched over the Backend's streams: it allocates compute buffers once (reserved
    for the largest graph) and reuses them for every graph computed afterwards."""

    def __init__(self, backend: Backend, graph_size: int):
        n = len(backend.backends)
        backends = (c_void_p * n)(*backend.backends)
        bufts = (c_void_p * n)(*backend.buffer_types)
        self.backend = backend
        self.ptr = _check(lib.ggml_backend_sched_new(backends, bufts, n, graph_size, False, True),
                          "creating the scheduler")

    def reserve(self, graph: int) -> None:
        if not lib.ggml_backend_sched_reserve(self.ptr, graph):
            raise EdgeMoeError("cannot reserve compute buffers for the graph")

    def alloc(self, graph: int) -> None:
        """Assign the graph's tensors to compute buffers (after the previous graph is done)."""
        lib.ggml_backend_sched_reset(self.ptr)
        if not lib.ggml_backend_sched_alloc_graph(self.ptr, graph):
            raise EdgeMoeError("cannot allocate the compute graph")

    def compute(self, graph: int) -> None:
        status = lib.ggml_backend_sched_graph_compute(self.ptr, graph)
        if status != 0:
            raise EdgeMoeError(f"graph compute {_STATUS.get(status, status)}")

    def profile(self, on_node) -> None:
        """Call on_node(op_name) after each graph node is computed (None: stop). Each node then
        runs on its own, so timings between calls show where the time goes (with that
        per-node overhead added)."""
        if on_node is None:
            self._eval_cb = None
            lib.ggml_backend_sched_set_eval_callback(self.ptr, None, None)
            return

        def cb(tensor, ask, _user):
            if not ask:
                on_node(lib.ggml_op_desc(tensor).decode())
            return True

        self._eval_cb = _EvalCallback(cb)  # kept referenced while C holds it
        lib.ggml_backend_sched_set_eval_callback(self.ptr, ctypes.cast(self._eval_cb, c_void_p), None)

    def buffer_bytes(self) -> int:
        return sum(lib.ggml_backend_sched_get_buffer_size(self.ptr, b) for b in self.backend.backends)

    def close(self) -> None:
        if self.ptr:
            lib.ggml_backend_sched_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


class Ops:
    """Graph-building helpers on one context. Every method returns a tensor pointer; argument
    order and shapes follow ggml.h (ne[0] is the fastest-varying dimension)."""

    def __init__(self, ctx: Context):
        self.context = ctx
        self.ctx = ctx.ptr

    def input(self, ggml_type: int, ne: tuple[int, ...], name: str) -> int:
        """A graph input: its data is set after the scheduler allocates the graph."""
        t = self.context.new_tensor(ggml_type, ne, name)
        lib.ggml_set_input(t)
        return t

    def add(self, a, b): return lib.ggml_add(self.ctx, a, b)
    def mul(self, a, b): return lib.ggml_mul(self.ctx, a, b)
    def div(self, a, b): return lib.ggml_div(self.ctx, a, b)
    def mul_mat(self, a, b): return lib.ggml_mul_mat(self.ctx, a, b)
    def mul_mat_id(self, as_, b, ids): return lib.ggml_mul_mat_id(self.ctx, as_, b, ids)
    def rms_norm(self, a, eps): return lib.ggml_rms_norm(self.ctx, a, eps)
    def norm(self, a, eps): return lib.ggml_norm(self.ctx, a, eps)
    def sub(self, a, b): return lib.ggml_sub(self.ctx, a, b)
    def abs(self, a): return lib.ggml_abs(self.ctx, a)
    def neg(self, a): return lib.ggml_neg(self.ctx, a)
    def relu(self, a): return lib.ggml_relu(self.ctx, a)
    def step(self, a): return lib.ggml_step(self.ctx, a)
    def exp(self, a): return lib.ggml_exp(self.ctx, a)
    def log(self, a): return lib.ggml_log(self.ctx, a)
    def concat(self, a, b, dim): return lib.ggml_concat(self.ctx, a, b, dim)
    def add_id(self, a, b, ids): return lib.ggml_add_id(self.ctx, a, b, ids)

    def swiglu_oai(self, gate, up, alpha, limit):
        """min(gate, limit) * sigmoid(alpha * min(gate, limit)) * (clamp(up, +-limit) + 1)."""
        return lib.ggml_swiglu_oai(self.ctx, gate, up, alpha, limit)

    def repeat_4d(self, a, ne0, ne1, ne2, ne3=1):
        return lib.ggml_repeat_4d(self.ctx, a, ne0, ne1, ne2, ne3)
    def soft_max(self, a): return lib.ggml_soft_max(self.ctx, a)
    def get_rows(self, a, rows): return lib.ggml_get_rows(self.ctx, a, rows)
    def set_rows(self, dst, src, rows): return lib.ggml_set_rows(self.ctx, dst, src, rows)
    def argsort_top_k(self, a, k): return lib.ggml_argsort_top_k(self.ctx, a, k)
    def sum_rows(self, a): return lib.ggml_sum_rows(self.ctx, a)
    def clamp(self, a, lo, hi): return lib.ggml_clamp(self.ctx, a, lo, hi)
    def scale(self, a, s): return lib.ggml_scale(self.ctx, a, s)
    def sigmoid(self, a): return lib.ggml_sigmoid(self.ctx, a)
    def sqr(self, a): return lib.ggml_sqr(self.ctx, a)
    def sqrt(self, a): return lib.ggml_sqrt(self.ctx, a)
    def cpy(self, src, dst): return lib.ggml_cpy(self.ctx, src, dst)
    def swiglu_split(self, gate, up): return lib.ggml_swiglu_split(self.ctx, gate, up)
    def cont(self, a): return lib.ggml_cont(self.ctx, a)
    def reshape_2d(self, a, ne0, ne1): return lib.ggml_reshape_2d(self.ctx, a, ne0, ne1)
    def reshape_3d(self, a, ne0, ne1, ne2): return lib.ggml_reshape_3d(self.ctx, a, ne0, ne1, ne2)
    def permute(self, a, d0, d1, d2, d3): return lib.ggml_permute(self.ctx, a, d0, d1, d2, d3)

    def view_2d(self, a, ne0, ne1, nb1, offset):
        return lib.ggml_view_2d(self.ctx, a, ne0, ne1, nb1, offset)

    def view_3d(self, a, ne0, ne1, ne2, nb1, nb2, offset):
        return lib.ggml_view_3d(self.ctx, a, ne0, ne1, ne2, nb1, nb2, offset)

    def rope(self, a, pos, n_dims, mode, n_ctx_orig, freq_base, freq_scale=1.0, ext_factor=0.0,
             attn_factor=1.0, beta_fast=32.0, beta_slow=1.0, freq_factors=None):
        """RoPE; YaRN with ext_factor > 0 (its betas bound the dimensions it interpolates);
        freq_factors (n_dims / 2,) divide each pair's frequency (LongRoPE); attn_factor scales
        cos and sin."""
        return lib.ggml_rope_ext(self.ctx, a, pos, freq_factors, n_dims, mode, n_ctx_orig,
                                 freq_base, freq_scale, ext_factor, attn_factor, beta_fast,
                                 beta_slow)

    def flash_attn(self, q, k, v, mask, scale, sinks=None):
        """Attention of q over k/v; `sinks` (n_head,) adds one logit per head to each softmax
        that attends to nothing (gpt-oss's attention sinks)."""
        out = lib.ggml_flash_attn_ext(self.ctx, q, k, v, mask, scale, 0.0, 0.0)
        if sinks:
            lib.ggml_flash_attn_ext_add_sinks(out, sinks)
        return out

    def name(self, t, name: str):
        lib.ggml_set_name(t, name.encode())
        return t

    def output(self, t):
        lib.ggml_set_output(t)
        return t

