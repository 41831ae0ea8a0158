"""The inference engine: a shard set's base weights, expert slots and KV cache on a ggml backend,
and `eval(tokens) -> logits`.

Graphs are built once per (batch size, KV cells, routing) shape and recomputed with new inputs:
a decode step keeps one shape for KV_STEP tokens. Compute buffers come from ggml_backend_sched,
reserved for the largest graph at start, so memory() is known before the first token.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.constants import Keys

from edgemoe import arch as arch_registry
from edgemoe import ggml
from edgemoe.arch.common import (BaseWeights, Graph, GraphBuilder, HParams, KVCache,
                                 graph_nodes_upper_bound, kq_mask, kv_cells_for)
from edgemoe.errors import ContextOverflow, EdgeMoeError, ShardSetError
from edgemoe.ggml import GGMLType
from edgemoe.pool import ExpertPool
from edgemoe.shardset import ShardSet

KV_TYPES = {"f16": GGMLType.F16, "f32": GGMLType.F32}
_MAX_GRAPHS = 8  # cached graph shapes (prefill sizes seen recently + the current decode shape)


def _drop_page_cache(path: Path) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Engine:
    """Run a shard set. One eval at a time (a lock makes it safe to call from any thread).

    `routing` is "full" (experts index their own slots; needs every expert resident) or
    "masked" (router restricted to the pool's resident experts through per-layer mask and
    expert->slot inputs; used by the swap/static policies). `n_slots` sizes the pool (see
    ExpertPool); `load_experts=False` leaves the slots empty for a policy to fill.
    """

    def __init__(self, shards_path: str | Path, n_ctx: int = 2048, n_threads: int | None = None,
                 device: str | None = None, n_batch: int = 512, kv_type: str = "f16",
                 routing: str = "full", n_slots=None, load_experts: bool = True):
        if n_ctx < 1 or n_batch < 1:
            raise EdgeMoeError(f"n_ctx ({n_ctx}) and n_batch ({n_batch}) must be positive")
        if kv_type not in KV_TYPES:
            raise EdgeMoeError(f"kv_type {kv_type!r}: expected one of {sorted(KV_TYPES)}")
        if routing not in ("full", "masked"):
            raise EdgeMoeError(f"routing {routing!r}: expected 'full' or 'masked'")
        self._lock = threading.RLock()
        self._closed = False
        self._parts: list = []  # owned handles, closed in reverse order
        self.shards = ShardSet.open(shards_path)
        self.base_path = self.shards.base_path
        try:
            reader = GGUFReader(self.base_path)
        except Exception as exc:  # gguf-py raises ValueError/struct errors on a corrupt header
            raise ShardSetError(f"{self.base_path}: not a readable GGUF ({exc})") from None
        arch_field = reader.fields.get(Keys.General.ARCHITECTURE)
        if arch_field is None:
            raise ShardSetError(f"{self.base_path}: key {Keys.General.ARCHITECTURE} missing")
        self.spec = arch_registry.get(arch_field.contents())
        self.hparams = hp = HParams.from_gguf(reader, self.spec, self.base_path)
        self._check_match(hp)
        self.routing = routing
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_vocab = hp.n_vocab
        self.n_past = 0
        try:
            self.backend = self._own(ggml.Backend(device, n_threads))
            self.weights = self._own(BaseWeights(self.base_path, reader, self.spec, hp, self.backend))
            del reader
            _drop_page_cache(self.base_path)
            self.pool = self._own(ExpertPool(self.shards, self.backend, n_slots))
            if load_experts:
                self.pool.load_all()
            self.kv = self._own(KVCache(hp, n_ctx, KV_TYPES[kv_type], self.backend))
            self._builder = GraphBuilder(self.spec, hp, self.weights, self.pool, self.kv)
            self._graphs: OrderedDict[tuple, Graph] = OrderedDict()
            worst = self._builder.build(min(n_batch, n_ctx), kv_cells_for(n_ctx, n_ctx), routing)
            # The scheduler hashes every node and leaf; a graph holds at most this many of each.
            self.sched = self._own(ggml.Scheduler(self.backend, 2 * graph_nodes_upper_bound(hp)))
            self.sched.reserve(worst.graph)
            self._graphs[(worst.n_tokens, worst.n_kv, True)] = worst
        except BaseException:
            self.close()
            raise
        self.router_logits: dict[int, np.ndarray] = {}

    def _own(self, obj):
        self._parts.append(obj)
        return obj

    def _check_match(self, hp: HParams) -> None:
        """The base GGUF and the expert shards must describe the same model."""
        s = self.shards
        pairs = [("arch", s.arch, hp.arch), ("n_layer", s.n_layer, hp.n_layer),
                 ("n_expert", s.n_expert, hp.n_expert), ("n_expert_used", s.n_expert_used, hp.n_expert_used),
                 ("n_embd", s.n_embd, hp.n_embd), ("expert_layers", list(s.expert_layers), list(hp.expert_layers))]
        if hp.n_ff_exp:
            pairs.append(("n_ff_exp", s.n_ff_exp, hp.n_ff_exp))
        for key, manifest, base in pairs:
            if manifest != base:
                raise ShardSetError(f"{s.root}: manifest {key}={manifest} but {self.base_path.name} "
                                    f"says {base}; base and expert shards do not match")
        ne = (hp.n_embd, s.n_ff_exp)
        for layer in s.expert_layers:
            shard = s.expert(layer, 0)
            if tuple(shard.tensors["ffn_gate"].ne) != ne:
                raise ShardSetError(f"{shard.path}: ffn_gate is {list(shard.tensors['ffn_gate'].ne)}, "
                                    f"the base model needs {list(ne)}")

    # -- inference -------------------------------------------------------------------------------

    def eval(self, tokens, all_logits: bool = True) -> np.ndarray:
        """Append `tokens` to the context; returns their logits, float32 (n_tokens, n_vocab), or
        only the last token's (1, n_vocab) with all_logits=False (cheaper prompt processing).
        Batches longer than n_batch are split; each batch runs the experts with ggml_mul_mat_id."""
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if toks.size == 0:
            raise EdgeMoeError("eval needs at least one token")
        if toks.min() < 0 or toks.max() >= self.n_vocab:
            bad = int(toks[(toks < 0) | (toks >= self.n_vocab)][0])
            raise EdgeMoeError(f"token id {bad} is outside the vocabulary (0..{self.n_vocab - 1})")
        with self._lock:
            if self._closed:
                raise EdgeMoeError("the engine is closed")
            if self.n_past + toks.size > self.n_ctx:
                raise ContextOverflow(f"{self.n_past} tokens in context + {toks.size} new exceed "
                                      f"n_ctx={self.n_ctx}")
            out = np.empty((toks.size if all_logits else 1, self.n_vocab), dtype=np.float32)
            for start in range(0, toks.size, self.n_batch):
                chunk = toks[start:start + self.n_batch].astype(np.int32)
                self._eval_batch(chunk, out[start:start + chunk.size] if all_logits else out,
                                 all_logits)
            return out

    def _graph(self, n_tokens: int, n_kv: int, all_logits: bool) -> Graph:
        # One token has one row of logits either way: share the decode graph.
        key = (n_tokens, n_kv, all_logits or n_tokens == 1)
        g = self._graphs.get(key)
        if g is None:
            g = self._builder.build(n_tokens, n_kv, self.routing, key[2])
            self._graphs[key] = g
            while len(self._graphs) > _MAX_GRAPHS:
                self._graphs.popitem(last=False)[1].close()
        else:
            self._graphs.move_to_end(key)
        return g

    def _eval_batch(self, tokens: np.ndarray, out: np.ndarray, all_logits: bool) -> None:
        n = tokens.size
        g = self._graph(n, kv_cells_for(self.n_past + n, self.n_ctx), all_logits)
        pos = np.arange(self.n_past, self.n_past + n, dtype=np.int32)
        inp = g.inputs
        with self.pool.compute_lock:
            self.sched.alloc(g.graph)
            ggml.tensor_set(inp.tokens, tokens)
            ggml.tensor_set(inp.pos, pos)
            ggml.tensor_set(inp.kv_idx, pos.astype(np.int64))
            ggml.tensor_set(inp.kq_mask, kq_mask(pos, g.n_kv))
            for layer, t in inp.route_mask.items():
                ggml.tensor_set(t, self.pool.route_mask(layer))
                ggml.tensor_set(inp.slot_map[layer], self.pool.slot_map(layer))
            self.sched.compute(g.graph)
            ggml.tensor_get(g.logits, out)
            self.router_logits = {
                layer: ggml.tensor_get(t, np.empty((n, self.hparams.n_expert), dtype=np.float32))
                for layer, t in g.router_logits.items()}
        self.n_past += n

    def reset(self) -> None:
        """Forget the context (the cache cells are masked, so nothing needs clearing)."""
        with self._lock:
            self.n_past = 0

    def truncate(self, n: int) -> None:
        """Keep the first `n` tokens of the context (e.g. to re-evaluate from there)."""
        with self._lock:
            if not 0 <= n <= self.n_past:
                raise EdgeMoeError(f"truncate({n}): context holds {self.n_past} tokens")
            self.n_past = n

    def memory(self) -> dict[str, int]:
        """Bytes held on the backend by each part (the process adds Python and libraries)."""
        return {"base_weights": self.weights.nbytes, "expert_slots": self.pool.bytes_held(),
                "kv_cache": self.kv.nbytes, "compute": self.sched.buffer_bytes()}

    @property
    def device(self) -> str:
        return self.backend.device_name

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for g in getattr(self, "_graphs", {}).values():
                g.close()
            self._graphs = OrderedDict()
            for part in reversed(self._parts):
                part.close()
            self._parts = []

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
