"""The expert slot pool: per MoE layer, three 3-D backend tensors (ffn_gate, ffn_up, ffn_down)
whose last dimension is a slot; ggml_mul_mat_id indexes them by slot id.

A residency policy (edgemoe.residency) decides which expert holds which slot and keeps that
table itself; the pool only holds the bytes: `load(layer, expert, slot)` writes an expert into a
slot, and the graph reads `tensors(layer)`. An expert is read from its shard with one positioned read of its contiguous data run (offsets
from the manifest, no GGUF parsing) and copied into its slot. The read uses O_DIRECT where the
filesystem allows it, else the page cache it caused is dropped (the memory budget counts page
cache). The first read of each expert also takes the GGUF header before the run and checks it
against the manifest, and checks the run against the crc32 the manifest records; later reads of
the same expert (ondemand re-reads its misses) are checked against a sum of the run's 64-bit
words taken at that first read, ten times cheaper than a crc32 and as sure to catch a flipped
bit. A shard that fails is a ShardSetError naming the file (ondemand fails the step that needed
it, swap skips the swap). EDGEMOE_CHECKSUMS=0 turns the data checks off.

Threading: a policy's loader thread calls `load` while the engine computes. File reads run
without any lock (and release the GIL); the copy into a slot happens under `compute_lock`, which
the engine holds while a graph runs, so a graph never sees a slot half-written.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
import time
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from edgemoe import ggml
from edgemoe.errors import EdgeMoeError, ShardSetError
from edgemoe.ggml import GGMLType
from edgemoe.shardset import CHECKSUMS, EXPERT_TENSORS, ShardSet


_ALIGN = 4096                       # O_DIRECT: file offsets, lengths and memory aligned to this
_direct = hasattr(os, "O_DIRECT")   # cleared for good the first time a filesystem refuses it
# Shard files are opened without following a link (the shard set resolved them) and without
# blocking (a pipe swapped in for a file is refused by the fstat below, not waited on).
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK
_buffers = threading.local()


def _thread_buffer(nbytes: int) -> np.ndarray:
    """This thread's page-aligned read buffer, at least nbytes (reused: reads are serial per
    thread and the pool copies out of it before the thread reads again)."""
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _buffers.buf = mmap.mmap(-1, -(-nbytes // _ALIGN) * _ALIGN)
    return np.frombuffer(buf, dtype=np.uint8)


def read_span(path, offset: int, nbytes: int) -> np.ndarray:
    """nbytes of `path` at `offset`, read with O_DIRECT where the filesystem allows it (straight
    from the device into this thread's aligned buffer: no page cache to charge to the memory
    budget and no copy out of it), else with a plain pread whose page cache is then dropped.
    Returns a view of the thread's buffer. Raises OSError, or EOFError on a short read."""
    global _direct
    if _direct:
        start = offset - offset % _ALIGN
        end = -(-(offset + nbytes) // _ALIGN) * _ALIGN
        try:
            fd = os.open(path, _OPEN_FLAGS | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _direct = False   # tmpfs and some FUSE filesystems refuse O_DIRECT
        else:
            try:
                _regular(fd, path)
                buf = _thread_buffer(end - start)[: end - start]
                got = os.preadv(fd, [buf], start)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _direct = False
            else:
                if got < offset + nbytes - start:
                    raise EOFError(f"read {max(0, got - (offset - start))} of {nbytes} bytes "
                                   f"at offset {offset}")
                return buf[offset - start: offset - start + nbytes]
            finally:
                os.close(fd)
    fd = os.open(path, _OPEN_FLAGS)
    try:
        _regular(fd, path)
        out = _thread_buffer(nbytes)[:nbytes]
        got = os.preadv(fd, [out], offset)
        if got != nbytes:
            raise EOFError(f"read {got} of {nbytes} bytes at offset {offset}")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return out


def word_sum(data: np.ndarray) -> int:
    """Sum of the run's little-endian 64-bit words (mod 2**64), its last partial word as bytes:
    any one changed word or flipped bit changes it."""
    n = data.nbytes // 8 * 8
    total = int(np.add.reduce(data[:n].view(np.uint64))) if n else 0
    return total + int(data[n:].sum())


def _regular(fd: int, path) -> None:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        raise ShardSetError(f"{path}: not a regular file any more (mode {mode:o})")



def _nbytes(ggml_type: int, ne) -> int:
    """Bytes of a tensor of ggml shape `ne` (innermost first)."""
    return ggml.row_size(ggml_type, ne[0]) * int(np.prod(ne[1:], dtype=np.int64))

class ExpertPool:
    """Slots for the experts of every MoE layer of a shard set.

    `n_slots` is one count for every layer, a {layer: count} mapping, or None (every expert gets
    a slot, as the `full` policy needs). A slot count below the router's top-k cannot run and is refused.

    The slots live in the chosen device's memory (reads go file -> host buffer -> slot) unless
    that device cannot multiply their types. `repack`: when the slots live in host memory and
    ggml's CPU backend has a repacked layout for the experts' types on this CPU (CPU_REPACK:
    Q4_0, Q4_K, IQ4_NL, ... for AVX2/NEON), the slots use it: each expert is repacked as it is
    written into its slot (through a view of that slot: the repacking buffer takes whole
    tensors only).
    """

    def __init__(self, shards: ShardSet, backend: ggml.Backend,
                 n_slots: int | Mapping[int, int] | None = None,
                 n_substitutes: Mapping[int, int] | None = None, clear: bool = True,
                 repack: bool = False):
        """clear=False leaves the slots' memory untouched (an engine opened to be measured)."""
        self.shards = shards
        self.n_expert = shards.n_expert
        self.layers = tuple(shards.expert_layers)
        self._n_slots = {l: self._slot_count(l, n_slots) for l in self.layers}
        self.types: dict[int, dict[str, int]] = {}
        self.ne: dict[str, tuple[int, ...]] = {}
        self.keys = shards.expert_tensors  # ffn_gate, ffn_up, ffn_down (+ their biases)
        self._check_shapes()
        # The substitute tier: per layer, slots of the experts' low-bit copies (docs/FORMAT.md).
        self.substitutes = bool(n_substitutes)
        if self.substitutes:
            self._check_substitutes(n_substitutes)

        kinds = (False, True) if self.substitutes else (False,)
        self.ctx = ggml.Context(len(kinds) * len(self.keys) * len(self.layers))
        self._tensors: dict[tuple[int, bool], dict[str, int]] = {}
        self.slot_bytes: dict[int, dict[str, int]] = {}  # bytes of one slot of each tensor
        self.substitute_slot_bytes: dict[int, dict[str, int]] = {}
        for layer in self.layers:
            for sub in kinds:
                n = n_substitutes[layer] if sub else self._n_slots[layer]
                types = self.substitute_types[layer] if sub else self.types[layer]
                sizes = (self.substitute_slot_bytes if sub else self.slot_bytes)[layer] = {}
                self._tensors[(layer, sub)] = {}
                for proj in self.keys:
                    ne = self.ne[proj]
                    kind, _, suffix = proj.partition(".")
                    name = f"blk.{layer}.{kind}_{'subs' if sub else 'exps'}.{suffix or 'weight'}"
                    self._tensors[(layer, sub)][proj] = self.ctx.new_tensor(
                        types[proj], (*ne, n), name)
                    sizes[proj] = _nbytes(types[proj], ne)
        k = shards.n_expert_used

        def probe(o: ggml.Ops) -> list[int]:  # the experts' matmul, once per type and shape
            ops, seen = [], set()
            for tensors in self._tensors.values():
                for proj, t in tensors.items():
                    key = (proj, self._type_of(t))   # a projection's shape is every layer's
                    if key in seen or "." in proj:   # biases are added, not multiplied
                        continue
                    seen.add(key)
                    x = o.context.new_tensor(GGMLType.F32, (self.ne[proj][0], 1, 1))
                    ids = o.context.new_tensor(GGMLType.I32, (k, 1))
                    ops.append(o.mul_mat_id(t, x, ids))
            return ops

        buft = backend.buffer_type_for("expert slots", probe)
        # (expert biases are plain F32 rows, and the substitute tier's choices can name one slot
        # twice for a token, which the repacked mul_mat_id cannot take: see engine.spare_slots)
        self.repacked = False
        if (repack and buft == backend.host_buffer_type and not n_substitutes
                and self.keys == EXPERT_TENSORS):
            repack_buft = backend.extra_buffer_types().get("CPU_REPACK")
            if repack_buft and self._repack_supported(backend, repack_buft):
                buft, self.repacked = repack_buft, True
        self.buffer = ggml.Buffer(self.ctx, buft, "the expert slots")
        self._views: dict[tuple[int, bool], dict[str, list[int]]] = {}
        if self.repacked:
            self._make_views()
        # An empty slot may be indexed with weight 0 (dropped or masked choices): 0 * NaN = NaN.
        if clear:
            self.buffer.clear(0)

        self.compute_lock = threading.RLock()
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.loads = 0
        self._word_sums: dict[Path, int] = {}  # of each shard's run, at its first read
        self.check_crc = CHECKSUMS
        self.check_seconds = 0.0   # spent checking data runs (crc32 and word sums)

    def _type_of(self, tensor: int) -> int:
        for (layer, sub), tensors in self._tensors.items():
            for proj, t in tensors.items():
                if t == tensor:
                    return (self.substitute_types if sub else self.types)[layer][proj]
        raise KeyError(tensor)

    def _repack_supported(self, backend: ggml.Backend, repack_buft: int) -> bool:
        """Whether the CPU runs ggml_mul_mat_id on every slot tensor's type repacked (asked of
        ggml with two experts' worth of each, in a small repacking buffer)."""
        shapes = {(self._type_of(t), self.ne[proj])
                  for tensors in self._tensors.values() for proj, t in tensors.items()}
        weights = ggml.Context(len(shapes))
        ops = ggml.Context(4 * len(shapes))
        try:
            # Two slots: ggml counts a trailing dimension of 1 away, and the repacked
            # mul_mat_id takes 3-D tensors only.
            probes = {key: weights.new_tensor(key[0], (*key[1], 2)) for key in shapes}
            buffer = ggml.Buffer(weights, repack_buft, "a repacking probe")
            try:
                o = ggml.Ops(ops)
                for (t, (ne0, _)), w in probes.items():
                    x = ops.new_tensor(GGMLType.F32, (ne0, 1, 1))
                    ids = ops.new_tensor(GGMLType.I32, (1, 1))
                    if not backend.supports_on_cpu(o.mul_mat_id(w, x, ids)):
                        return False
                return True
            finally:
                buffer.close()
        finally:
            ops.close()
            weights.close()

    def _make_views(self) -> None:
        """One view per slot of every slot tensor: what a repacking buffer is written through."""
        n_views = sum(len(self.keys) * (self.n_substitutes[l] if sub else self._n_slots[l])
                      for (l, sub) in self._tensors)
        self._views_ctx = ggml.Context(n_views)
        o = ggml.Ops(self._views_ctx)
        for (layer, sub), tensors in self._tensors.items():
            n = self.n_substitutes[layer] if sub else self._n_slots[layer]
            sizes = (self.substitute_slot_bytes if sub else self.slot_bytes)[layer]
            self._views[(layer, sub)] = {}
            for proj, t in tensors.items():
                ne0, ne1 = self.ne[proj]
                size = sizes[proj]
                views = []
                for slot in range(n):
                    v = o.view_3d(t, ne0, ne1, 1, size // ne1, size, slot * size)
                    ggml.view_init(v)
                    views.append(v)
                self._views[(layer, sub)][proj] = views

    def _slot_count(self, layer: int, n_slots) -> int:
        if n_slots is None:
            n = self.n_expert
        elif isinstance(n_slots, Mapping):
            n = int(n_slots.get(layer, self.n_expert))
        else:
            n = int(n_slots)
        if not self.shards.n_expert_used <= n <= self.n_expert:
            raise EdgeMoeError(f"layer {layer}: {n} expert slots; need between top-k "
                               f"({self.shards.n_expert_used}) and {self.n_expert}")
        return n

    def _check_substitutes(self, n_substitutes: Mapping[int, int]) -> None:
        if self.shards.substitute_type is None:
            raise EdgeMoeError(f"{self.shards.root}: no substitutes in this shard set (convert "
                               "with --substitute-type)")
        self.n_substitutes = {}
        self.substitute_types: dict[int, dict[str, int]] = {}
        for layer in self.layers:
            n = int(n_substitutes.get(layer, 0))
            if not 1 <= n <= self.n_expert:
                raise EdgeMoeError(f"layer {layer}: {n} substitute slots; need between 1 and "
                                   f"{self.n_expert}")
            self.n_substitutes[layer] = n
            types = {}
            for e in range(self.n_expert):
                sub = self.shards.expert(layer, e).substitute
                for proj in self.keys:
                    info = sub.tensors[proj]
                    t = int(GGMLType[info.type]) if info.type in GGMLType.__members__ else None
                    if t is None or types.setdefault(proj, t) != t or tuple(info.ne) != self.ne[proj]:
                        raise ShardSetError(f"{sub.path}: {proj} is {info.type} {list(info.ne)}, "
                                            "unlike the layer's other substitutes")
            self.substitute_types[layer] = types

    def _check_shapes(self) -> None:
        """Every expert of a layer must have the same types and shapes (they share 3-D tensors)."""
        for layer in self.layers:
            first = self.shards.expert(layer, 0)
            self.types[layer] = {}
            for proj in self.keys:
                name = first.tensors[proj].type
                try:
                    self.types[layer][proj] = int(GGMLType[name])
                except KeyError:
                    raise ShardSetError(f"{first.path}: unknown tensor type {name!r} for {proj}") from None
                self.ne.setdefault(proj, tuple(first.tensors[proj].ne))
            for e in range(self.n_expert):
                shard = self.shards.expert(layer, e)
                for proj in self.keys:
                    info = shard.tensors[proj]
                    t = self.types[layer][proj]
                    if info.type != GGMLType(t).name or tuple(info.ne) != self.ne[proj]:
                        raise ShardSetError(
                            f"{shard.path}: {proj} is {info.type} {list(info.ne)}, the layer's "
                            f"experts are {GGMLType(t).name} {list(self.ne[proj])}")
                    need = _nbytes(t, info.ne)
                    if info.nbytes != need:
                        raise ShardSetError(f"{shard.path}: {proj} holds {info.nbytes} bytes, "
                                            f"{info.type} {list(info.ne)} needs {need}")

    # -- what the graph reads ------------------------------------------------------------------

    def tensors(self, layer: int, substitute: bool = False) -> dict[str, int]:
        """{'ffn_gate': t, 'ffn_up': t, 'ffn_down': t}: (ne0, ne1, n_slots) slot tensors (of the
        substitute tier with substitute=True), and for experts with biases {'ffn_gate.bias': t,
        ...}: (ne0, n_slots)."""
        return self._tensors[(layer, substitute)]

    def n_slots(self, layer: int) -> int:
        return self._n_slots[layer]

    # -- what policies call ----------------------------------------------------------------------

    def bytes_held(self) -> int:
        """Bytes of backend memory the slots occupy (resident or not)."""
        return self.buffer.nbytes

    def expert_bytes(self, layer: int, substitute: bool = False) -> int:
        """Bytes one expert of `layer` occupies in its slot (all experts of a layer are alike),
        or its substitute in a substitute slot."""
        return sum((self.substitute_slot_bytes if substitute else self.slot_bytes)[layer].values())

    def load(self, layer: int, expert: int, slot: int, substitute: bool = False) -> None:
        """Read `expert` of `layer` from its shard (its substitute's, with substitute=True)
        into `slot`. Which expert holds which slot is the policy's to know
        (edgemoe.residency): the pool only writes bytes. The copy happens under compute_lock,
        so no graph sees a slot half-written."""
        n = self.n_substitutes[layer] if substitute else self._n_slots[layer]
        if not 0 <= slot < n:
            raise EdgeMoeError(f"layer {layer}: {'substitute ' if substitute else ''}slot {slot} "
                               f"is out of range (0..{n - 1})")
        shard = self.shards.expert(layer, expert)
        if substitute:
            shard = shard.substitute
        sizes = (self.substitute_slot_bytes if substitute else self.slot_bytes)[layer]
        data = self._read(shard)
        base = data.ctypes.data
        with self.compute_lock:
            for proj in self.keys:
                info = shard.tensors[proj]
                size = sizes[proj]
                src = base + info.offset - shard.data_offset
                if self.repacked:
                    ggml.tensor_set_ptr(self._views[(layer, substitute)][proj][slot], src, 0, size)
                else:
                    ggml.tensor_set_ptr(self._tensors[(layer, substitute)][proj], src,
                                        slot * size, size)
        with self._lock:
            self.bytes_read += shard.data_bytes
            self.loads += 1

    def _read(self, shard) -> np.ndarray:
        """The expert's data run (a view of the reading thread's buffer, valid until its next
        read), read with one pread that leaves no page cache behind (see read_span), and
        checked: on the first read the GGUF header before it and its crc32, on later reads the
        word sum the first read took."""
        key = shard.path   # an expert and its substitute are two shards
        first = key not in self._word_sums
        start = 0 if first else shard.data_offset
        try:
            data = read_span(shard.path, start, shard.data_offset + shard.data_bytes - start)
        except EOFError as exc:
            raise ShardSetError(f"{shard.path}: {exc}; the shard is truncated") from None
        except OSError as exc:
            raise ShardSetError(f"{shard.path}: cannot read expert shard "
                                f"({exc.strerror or exc})") from None
        if not first:
            if not self.check_crc:
                return data
            t0 = time.perf_counter()
            same = word_sum(data) == self._word_sums[key]
            self.check_seconds += time.perf_counter() - t0
            if not same:
                raise ShardSetError(f"{shard.path}: expert data changed since its first read "
                                    "(its checksum differs); the shard is corrupt: reconvert it")
            return data
        shard.check_header(data[:shard.data_offset])
        data = data[shard.data_offset:]
        t0 = time.perf_counter()
        if self.check_crc and shard.crc32 is not None:
            crc = zlib.crc32(data)
            if crc != shard.crc32:
                raise ShardSetError(f"{shard.path}: expert data fails its checksum (crc32 "
                                    f"{crc:08x}, manifest says {shard.crc32:08x}); the shard is "
                                    "corrupt: reconvert it")
        total = word_sum(data)
        self.check_seconds += time.perf_counter() - t0
        with self._lock:
            self._word_sums[key] = total
        return data

    def close(self) -> None:
        self.buffer.close()
        if self.repacked:
            self._views_ctx.close()
        self.ctx.close()
