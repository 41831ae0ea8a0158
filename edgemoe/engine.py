"""The inference engine: a shard set's base weights, expert slots and KV cache on a ggml backend,
and `eval(tokens) -> logits`.

Graphs are built once per (batch size, KV cells, routing) shape and recomputed with new inputs:
a decode step keeps one shape for KV_STEP tokens. Compute buffers come from ggml_backend_sched,
reserved for the largest graph at start, so memory() is known before the first token.

Every engine runs a residency policy (edgemoe.residency) over its expert pool; the policy's slot
table is the only record of which expert is where:
    engine = Engine(path, n_slots={layer: n}, policy=lambda pool: SwapPolicy(pool, slots, ...))
    engine.eval(tokens)   # masked: slot_of(L) before, observe(L, probs, x_norm, selected) after;
                          # exact: per layer gate/groups/ensure, prefetch(L+1, predicted logits);
                          # then end_step(n_tokens) -> engine.last_step
Without `policy` every expert is resident (FullPolicy). Observers (add_observer) see the router
outputs and the timing of every graph without changing what runs (calibration, profiling).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
from gguf.constants import Keys

from edgemoe import arch as arch_registry
from edgemoe import ggml
from edgemoe.arch.common import (BaseWeights, Graph, HParams, KVCache, SplitState,
                                 graph_nodes_upper_bound, kv_cells_for)
from edgemoe.errors import ContextOverflow, EdgeMoeError, ShardSetError
from edgemoe.ggml import GGMLType
from edgemoe.gguf_header import GGUFHeader
from edgemoe.pool import ExpertPool
from edgemoe.residency.policies import FullPolicy, Policy
from edgemoe.residency.routing import softmax
from edgemoe.shardset import ShardSet

KV_TYPES = {"f16": GGMLType.F16, "f32": GGMLType.F32}
# Cached graphs (recent prompt shapes and the current decode shape, per layer under exact
# routing) may hold this many times the metadata of the graphs one step needs; the least
# recently used beyond that are freed (a chat of ever-new prompt lengths stays bounded).
_GRAPH_CACHE_STEPS = 3


def spare_slots(slot_ids: np.ndarray, mask: np.ndarray, n_slots: int) -> np.ndarray:
    """`slot_ids` (n_tokens, k) with each token's choices outside `mask` (they weigh 0) moved to
    slots that none of that token's other choices names, the lowest free ones first (as far as
    n_slots allows: with n_slots >= k every choice of a token gets its own slot). ggml's
    repacked mul_mat_id (CPU_REPACK) keeps room for one row per token for each matrix, so a
    token naming one slot twice overwrote the rows other slots had recorded: wrong outputs,
    even at weight 0 (the generic kernel keeps room for every choice)."""
    n, k = slot_ids.shape
    rows = np.arange(n)[:, None]
    taken = np.zeros((n, n_slots + 1), dtype=bool)   # a last column absorbs the free choices
    taken[rows, np.where(mask, slot_ids, n_slots)] = True
    free = np.argsort(taken[:, :n_slots], axis=1, kind="stable")   # free slots first, in order
    n_free = n_slots - taken[:, :n_slots].sum(axis=1, keepdims=True)
    rank = np.minimum(np.cumsum(~mask, axis=1) - 1, np.maximum(n_free - 1, 0))
    spare = np.take_along_axis(free, np.clip(rank, 0, n_slots - 1), axis=1)
    return np.where(mask, slot_ids, spare).astype(np.int32)


def _route_inputs(layer: int, table: np.ndarray, sub: np.ndarray | None) -> dict[str, np.ndarray]:
    """A forward graph's routing inputs for one layer from the policy's tables: full slots
    (n_expert,) and, with a substitute tier, substitute slots (-1: not resident)."""
    routable = table >= 0 if sub is None else (table >= 0) | (sub >= 0)
    out = {f"route_mask-{layer}": np.where(routable, 0.0, -np.inf).astype(np.float32),
           f"slot_map-{layer}": np.maximum(table, 0)}
    if sub is not None:
        out[f"sub_map-{layer}"] = np.maximum(sub, 0)
        out[f"is_full-{layer}"] = (table >= 0).astype(np.float32)
        out[f"is_sub-{layer}"] = ((table < 0) & (sub >= 0)).astype(np.float32)
    return out


class Engine:
    """Run a shard set. One eval at a time (a lock makes it safe to call from any thread).

    `n_slots` sizes the expert pool (see ExpertPool; None: a slot for every expert) and
    `policy(pool) -> Policy` makes the residency policy that fills it (None: FullPolicy). The
    policy's `masked` chooses the graphs:
    - masked (full, static, swap): one graph per step; the router is restricted to the
      policy's routable experts through per-layer mask and expert->slot inputs; when the policy
      or an observer wants them, the unmasked router logits, the experts' input norms and the
      selection are outputs;
    - exact (ondemand): per layer, an attention+router graph, then the policy maps the chosen
      experts to slots (loading misses), then an experts graph.
    The policy loads its initial experts on warm(), or at the first eval. `n_substitutes`
    ({layer: n}) adds the pool's substitute tier (low-bit copies; a masked policy with
    `substitutes` keeps them). `n_outputs`: rows of
    logits per batch the compute buffers are reserved for (None: n_batch, every row; 1: what
    generation samples). A batch asking for more rows grows the buffers then.
    `measure_only`: opened only for memory() (a budget's probe): the KV cache and the slots are
    allocated but never touched (no resident pages) and eval is refused. `repack`: expert slots in
    host memory use the CPU's repacked weight layouts where ggml has one for their type (see
    ExpertPool).
    """

    def __init__(self, shards_path: str | Path, n_ctx: int = 2048, n_threads: int | None = None,
                 device: str | None = None, n_batch: int = 512, kv_type: str = "f16",
                 n_slots=None, policy: Callable[[ExpertPool], Policy] | None = None,
                 n_outputs: int | None = None, measure_only: bool = False,
                 n_substitutes=None, repack: bool = False):
        if n_ctx < 1 or n_batch < 1:
            raise EdgeMoeError(f"n_ctx ({n_ctx}) and n_batch ({n_batch}) must be positive")
        if n_outputs is not None and n_outputs < 1:
            raise EdgeMoeError(f"n_outputs ({n_outputs}) must be positive")
        if kv_type not in KV_TYPES:
            raise EdgeMoeError(f"kv_type {kv_type!r}: expected one of {sorted(KV_TYPES)}")
        self._lock = threading.RLock()
        self._closed = False
        self._parts: list = []  # owned handles, closed in reverse order
        self.shards = ShardSet.open(shards_path)
        self.base_path = self.shards.base_path
        header = GGUFHeader(self.base_path)
        self.shards.check_base_header(header)
        arch_field = header.fields.get(Keys.General.ARCHITECTURE)
        if arch_field is None or not isinstance(arch_field.contents(), str):
            raise ShardSetError(f"{self.base_path}: key {Keys.General.ARCHITECTURE} missing or "
                                "not a string")
        self.model = arch_registry.get(arch_field.contents())
        self.hparams = hp = self.model.hparams_class.from_gguf(header, self.model, self.base_path)
        self.shards.check_match(hp)
        self.policy: Policy | None = None
        self._warm = False
        self.observers: list = []
        self._route_inputs: dict[int, tuple] = {}   # layer -> (slot table, mask, slot map)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_vocab = hp.n_vocab
        self.n_past = 0
        try:
            self.backend = self._own(ggml.Backend(device, n_threads))
            self.weights = self._own(BaseWeights(self.base_path, header, self.model, hp,
                                                 self.backend,
                                                 # a measuring probe touches no page of it
                                                 None if measure_only else self.shards.base_crc32))
            self.pool = self._own(ExpertPool(self.shards, self.backend, n_slots, n_substitutes,
                                             clear=not measure_only, repack=repack))
            if policy is None:
                self.policy = FullPolicy(self.pool, hp.n_expert, hp.n_expert_used,
                                         self.pool.layers)
            else:
                self.policy = policy(self.pool)
            exact = not self.policy.masked
            if self.pool.substitutes and not self.policy.sub_tables:
                raise EdgeMoeError(f"policy {self.policy.name!r} does not use the substitute "
                                   "tier the pool was given (a policy made with "
                                   "substitutes does)")
            self.kv = self._own(KVCache(hp, n_ctx, KV_TYPES[kv_type], self.backend,
                                        clear=not measure_only))
            self.measure_only = measure_only
            self.state = (self._own(SplitState(hp, min(n_batch, n_ctx), self.backend))
                          if exact else None)
            self._builder = self.model(hp, self.weights, self.pool, self.kv, self.state)
            self._graphs: OrderedDict[tuple, Graph] = OrderedDict()
            self._graph_bytes = 0
            self._allocated: Graph | None = None  # the graph the scheduler last allocated
            # The scheduler hashes every node and leaf; a graph holds at most this many of each.
            self.sched = self._own(ggml.Scheduler(self.backend, 2 * graph_nodes_upper_bound(hp)))
            # Size the compute buffers for the largest graph this engine will run now, so
            # memory() is known up front: a full batch over the whole context with n_outputs
            # rows of logits.
            n, n_kv = min(n_batch, n_ctx), kv_cells_for(n_ctx, n_ctx)
            n_out = min(n, n_outputs or n)
            self.n_outputs = n_out
            if exact:
                keys = [("attention", il, n, n_kv) for il in range(hp.n_layer)]
                k_sub = hp.n_expert_used if self.pool.substitutes else 0
                keys += [("experts", il, n, True, hp.n_expert_used, k_sub)
                         for il in hp.expert_layers]
                keys.append(("output", n, n_out))
            else:
                keys = [("forward", n, n_kv, True, n_out, self.pool.substitutes)]
            self._graph_cap = _GRAPH_CACHE_STEPS * sum(self._graph(key).ctx.nbytes for key in keys)
            for key in keys:
                self.sched.reserve(self._graph(key).graph)
        except BaseException:
            self.close()
            raise
        self.last_step: dict | None = None  # the policy's telemetry record of the last step

    def _own(self, obj):
        self._parts.append(obj)
        return obj

    # -- inference -------------------------------------------------------------------------------

    def eval(self, tokens, all_logits: bool = True, *, logits_from: int | None = None
             ) -> np.ndarray:
        """Append `tokens` to the context; returns logits, float32 (n_rows, n_vocab), of the
        tokens from index `logits_from` on (negative: from the end, -1 the last token only;
        len(tokens): none). Without it, every token's (all_logits) or the last token's. Only
        those rows go through the output projection. Batches longer than n_batch are split;
        each batch runs the experts with ggml_mul_mat_id."""
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if toks.size == 0:
            raise EdgeMoeError("eval needs at least one token")
        if toks.min() < 0 or toks.max() >= self.n_vocab:
            bad = int(toks[(toks < 0) | (toks >= self.n_vocab)][0])
            raise EdgeMoeError(f"token id {bad} is outside the vocabulary (0..{self.n_vocab - 1})")
        if logits_from is None:
            logits_from = 0 if all_logits else -1
        first = logits_from + toks.size if logits_from < 0 else logits_from
        if not 0 <= first <= toks.size:
            raise EdgeMoeError(f"logits_from={logits_from} is outside the {toks.size} tokens")
        with self._lock:
            if self._closed:
                raise EdgeMoeError("the engine is closed")
            if self.measure_only:
                raise EdgeMoeError("the engine was opened to be measured only")
            if self.n_past + toks.size > self.n_ctx:
                raise ContextOverflow(f"{self.n_past} tokens in context + {toks.size} new exceed "
                                      f"n_ctx={self.n_ctx}")
            self.warm()
            out = np.empty((toks.size - first, self.n_vocab), dtype=np.float32)
            for start in range(0, toks.size, self.n_batch):
                chunk = toks[start:start + self.n_batch].astype(np.int32)
                end = start + chunk.size
                n_out = end - max(first, start) if end > first else 0
                self._eval_batch(chunk, out[end - n_out - first:end - first], n_out)
            return out

    def _build(self, key: tuple) -> Graph:
        kind, b = key[0], self._builder
        if kind == "forward":
            return b.build(*key[1:])
        if kind == "attention":
            return b.build_attention(key[1], key[2], key[3])
        if kind == "experts":
            return b.build_experts(*key[1:])
        return b.build_output(key[1], key[2])

    def _graph(self, key: tuple) -> Graph:
        """The graph for `key` (kind, ...shape), built on first use and kept while recent."""
        g = self._graphs.get(key)
        if g is not None and not self.backend.on_host and g is not self._allocated:
            # A node keeps its placement from its last allocation, and ggml's scheduler takes
            # such a node as pre-allocated: re-allocating the graph after others ran aborts
            # with several backends ("pre-allocated tensor in a buffer that cannot run the
            # operation"). Off the CPU a graph is rebuilt instead (one CPU buffer is immune).
            self._drop_graph(key)
            g = None
        if g is None:
            g = self._graphs[key] = self._build(key)
            self._graph_bytes += g.ctx.nbytes
            for old in list(self._graphs):
                if self._graph_bytes <= getattr(self, "_graph_cap", self._graph_bytes):
                    break
                if self._graphs[old] is not g and self._graphs[old] is not self._allocated:
                    self._drop_graph(old)
        else:
            self._graphs.move_to_end(key)
        return g

    def _drop_graph(self, key: tuple) -> None:
        g = self._graphs.pop(key)
        self._graph_bytes -= g.ctx.nbytes
        g.close()

    def warm(self) -> None:
        """Let the policy load its initial experts (blocking; once). eval() does it if needed."""
        with self._lock:
            if not self._warm:
                self.policy.warm()
                self._warm = True

    def add_observer(self, observer) -> None:
        """Watch every step without changing it (edgemoe.residency.observer.EngineObserver):
        router outputs, the next layer's predicted routing, and the time of every graph and
        every wait for experts. With an observer, masked graphs compute the router outputs."""
        with self._lock:
            self.observers.append(observer)

    def remove_observer(self, observer) -> None:
        with self._lock:
            self.observers.remove(observer)

    def _run(self, g: Graph, values: dict[str, np.ndarray], kind: str,
             layer: int | None = None) -> None:
        """Allocate `g`, fill its inputs from `values`, compute it. The pool's compute_lock is
        held only while a graph runs, so a loader thread can fill slots between the graphs of
        one step (exact routing waits on such loads). Observers get (kind, layer, start, end)."""
        t0 = time.perf_counter() if self.observers else 0.0
        with self.pool.compute_lock:
            # Decode recomputes one graph step after step: its allocation still holds.
            if self._allocated is not g:
                before = self.sched.buffer_bytes()
                self.sched.alloc(g.graph)
                self._allocated = g
                if self.sched.buffer_bytes() != before:
                    # The compute buffers grew (a graph larger than the reservation, e.g. more
                    # rows of logits): ggml keeps the addresses an allocated graph's tensors
                    # had, which now point into the freed buffers. Only g is valid.
                    for key in [k for k, other in self._graphs.items() if other is not g]:
                        self._drop_graph(key)
            for name, t in g.inputs.items():
                ggml.tensor_set(t, values[name])
            self.sched.compute(g.graph)
        if self.observers:
            t1 = time.perf_counter()
            for obs in self.observers:
                obs.graph(kind, layer, t0, t1)

    def _get(self, g: Graph, name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
        return ggml.tensor_get(g.outputs[name], np.empty(shape, dtype=dtype))

    def _eval_batch(self, tokens: np.ndarray, out: np.ndarray, n_out: int) -> None:
        """One batch; the logits of its last n_out tokens go to `out`."""
        n = tokens.size
        n_kv = kv_cells_for(self.n_past + n, self.n_ctx)
        pos = np.arange(self.n_past, self.n_past + n, dtype=np.int32)
        values = {"tokens": tokens, "pos": pos, "kv_idx": pos.astype(np.int64),
                  **self._builder.masks(pos, n_kv)}
        t0 = time.perf_counter()
        if self.policy.masked:
            self._eval_forward(n, n_kv, values, n_out, out)
        else:
            self._eval_exact(n, n_kv, values, n_out, out)
        self.n_past += n
        self.last_step = self.policy.end_step(n)
        for obs in self.observers:
            obs.step(n, t0, time.perf_counter())

    def _eval_forward(self, n, n_kv, values, n_out, out) -> None:
        policy = self.policy
        observed = policy.observes or bool(self.observers)
        substituted = self.pool.substitutes
        g = self._graph(("forward", n, n_kv, observed, n_out, substituted))
        moe_layers = self._builder.moe_layers
        for layer in moe_layers:
            table = policy.slot_of(layer)                       # (n_expert,) slot or -1
            sub = policy.substitute_of(layer) if substituted else None
            key = table.tobytes() + (sub.tobytes() if sub is not None else b"")
            cached = self._route_inputs.get(layer)
            if cached is None or cached[0] != key:              # the tables changed
                cached = self._route_inputs[layer] = (key, _route_inputs(layer, table, sub))
            values.update(cached[1])
        self._run(g, values, "forward")
        if n_out:
            ggml.tensor_get(g.outputs["logits"], out)
        if not observed:
            return
        n_expert, k = self.hparams.n_expert, self.hparams.n_expert_used
        for layer in moe_layers:
            logits = self._get(g, f"router_logits-{layer}", (n, n_expert))
            x_norm = self._get(g, f"x_norm-{layer}", (n,))
            selected = self._get(g, f"selected-{layer}", (n, k), np.int32)
            if policy.observes:
                policy.observe(layer, softmax(logits), x_norm, selected)
            for obs in self.observers:
                obs.routed(layer, logits, x_norm, selected)

    def _eval_exact(self, n, n_kv, values, n_out, out) -> None:
        hp, k, policy = self.hparams, self.hparams.n_expert_used, self.policy
        for il in range(hp.n_layer):
            g = self._graph(("attention", il, n, n_kv))
            self._run(g, values, "attention", il)
            if il not in hp.expert_layers:
                continue
            ids = self._get(g, "selected", (n, k), np.int32)        # (n_tokens, k) expert ids
            weights = self._get(g, "weights", (n, k))
            next_logits = (self._get(g, "next_logits", (n, hp.n_expert))
                           if "next_logits" in g.outputs else None)
            ids, weights = policy.gate(il, ids, weights, n == 1)
            ids, weights = np.asarray(ids, dtype=np.int32), np.asarray(weights, np.float32)
            # Experts run from their low-bit substitutes this step (ondemand's per-miss
            # decisions): {expert: substitute slot}; they join the first group's graph.
            subs = policy.substituted(il) if self.pool.substitutes else {}
            on_sub = np.isin(ids, list(subs)) if subs else np.zeros(ids.shape, bool)
            groups = policy.groups(il, ids)
            if not groups and subs:
                groups = [np.zeros(0, dtype=np.int32)]   # every expert runs from a substitute
            for i, group in enumerate(groups):
                t0 = time.perf_counter()
                slots = policy.ensure(il, group) if group.size else {}
                for obs in self.observers:
                    obs.ensured(il, t0, time.perf_counter())
                if i == 0 and next_logits is not None:
                    # Issued once this layer's loads are done (they must not queue behind it),
                    # so the read overlaps this layer's experts and the next layer's attention.
                    following = [l for l in self._builder.moe_layers if l > il][0]
                    for obs in self.observers:
                        obs.predicted(following, next_logits)
                    policy.prefetch(following, next_logits)
                if len(groups) == 1:
                    in_group = (ids >= 0) & ~on_sub
                else:
                    in_group = np.isin(ids, group)
                inputs, used, used_sub = self._expert_inputs(
                    il, ids, weights, in_group, slots, on_sub if i == 0 else None, subs, n)
                self._run(self._graph(("experts", il, n, i == 0, used, used_sub)), inputs,
                          "experts", il)
        if n_out:
            g = self._graph(("output", n, n_out))
            self._run(g, {}, "output")
            ggml.tensor_get(g.outputs["logits"], out)

    def _expert_inputs(self, il, ids, weights, in_group, slots, on_sub, subs, n):
        """An experts graph's inputs: (inputs, full experts per token, substitute experts per
        token). Choices outside a tier's set weigh 0 on a slot none of the token's other choices
        names (see spare_slots); one token's are left out of the graph instead (fewer experts
        compute)."""
        k = self.hparams.n_expert_used
        table = np.zeros(self.hparams.n_expert, dtype=np.int32)
        table[list(slots)] = list(slots.values())
        safe = np.maximum(ids, 0)
        parts = [("", table[safe], in_group, self.pool.n_slots(il))]
        if on_sub is not None and on_sub.any():
            sub_table = np.zeros(self.hparams.n_expert, dtype=np.int32)
            sub_table[list(subs)] = list(subs.values())
            parts.append(("sub_", sub_table[safe], on_sub, self.pool.n_substitutes[il]))
        inputs, used = {}, [0, 0]
        for j, (prefix, slot_ids, mask, n_slots) in enumerate(parts):
            w = np.where(mask, weights, 0.0).astype(np.float32)
            m = k
            if n == 1 and mask.sum() < k:
                slot_ids, w = slot_ids[mask][None, :], w[mask][None, :]
                m = slot_ids.shape[1]
            elif not mask.all():
                slot_ids = spare_slots(slot_ids, mask, n_slots)
            inputs[prefix + "ids"], inputs[prefix + "weights"] = slot_ids, w.reshape(n, m, 1)
            used[j] = m
        return inputs, used[0], used[1]

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
        # Exact routing's layer state (residual and FFN input of a batch) counts as compute.
        state = self.state.nbytes if self.state is not None else 0
        # So do the graphs' metadata (ggml contexts in host memory), at the cache's bound.
        return {"base_weights": self.weights.nbytes, "expert_slots": self.pool.bytes_held(),
                "kv_cache": self.kv.nbytes,
                "compute": self.sched.buffer_bytes() + state + self._graph_cap}

    @property
    def device(self) -> str:
        return self.backend.device_name

    def memory_by_place(self) -> dict[str, int]:
        """Bytes of backend buffers in host memory and in the device's own memory (all host
        when the device is the CPU), compute buffers included."""
        return self.backend.buffer_bytes(self._parts, self.sched)

    def link_bytes(self) -> int | None:
        """Bytes sent to and received from RPC servers so far (None: no RPC device in use)."""
        return ggml.rpc_link_bytes() if self.backend.uses_rpc else None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if getattr(self, "policy", None) is not None:
                self.policy.close()  # its loader thread must stop before the pool is freed
            for g in getattr(self, "_graphs", {}).values():
                g.close()
            self._graphs = OrderedDict()
            self._graph_bytes = 0
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
