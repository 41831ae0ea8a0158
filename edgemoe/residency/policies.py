"""The four residency policies over one expert slot pool.

What the engine calls, per generated step (one forward pass over n_tokens tokens):
  masked policies (full, static, swap) -- routing restricted to resident experts:
    slot_of(layer)              (n_expert,) int32 slot per routable expert, -1 if not routable;
                                read at the start of the step, never kept across end_step()
    observe(layer, probs, norms, selected)  the unmasked router probabilities (n_tokens,
                                n_expert), the hidden-state norms (n_tokens,) feeding the layer's
                                experts, and optionally the masked selection the graph made
                                (n_tokens, k), checked against the step's table
  exact policy (ondemand) -- routing as the model says, experts loaded when missing:
    gate(layer, ids, weights, decode)  the engine's top-k (n_tokens, k); returns the selection to
                                run (adaptive gating may drop experts: id -1, weight 0)
    ensure(layer, experts)      blocks until these experts are resident; returns {expert: slot}.
                                At most slots(layer) distinct experts per call: groups() splits a
                                larger prefill selection.
    prefetch(layer, logits)     layer+1's router applied to layer's hidden state (n_tokens,
                                n_expert): starts loading the first predicted non-resident experts
  all:  warm() before the first step, end_step(n_tokens) after each step (returns the per-token
        telemetry record), close() at the end.
The engine's order within a step is ensure(l) -> prefetch(l+1) -> run l's experts -> ensure(l+1):
the prefetch read overlaps layer l's experts and layer l+1's attention, and no read ever targets
a layer whose experts are running.
"""
from __future__ import annotations

import math
import threading
import time
import warnings
from functools import partial
from typing import Mapping, Protocol, Sequence

import numpy as np

from edgemoe.errors import ShardSetError
from edgemoe.residency.cache import SlotTable, prefetch_candidates
from edgemoe.residency.importance import ImportanceTracker, plan_swaps
from edgemoe.residency.loader import BACKGROUND, DEMAND, PREFETCH, Loader
from edgemoe.residency.routing import DROP, SUBSTITUTE, adaptive_gate, miss_decisions, topk
from edgemoe.residency.telemetry import Telemetry


class ExpertPool(Protocol):
    """The slot pool (edgemoe.pool.ExpertPool) as policies use it; tests and the planner use
    in-memory ones. load(layer, expert, slot) writes the expert's bytes into that slot
    (blocking); which expert holds which slot is the policy's table, never the pool's.
    expert_bytes(layer) is one expert's size in that layer's slots."""

    def load(self, layer: int, expert: int, slot: int, substitute: bool = False) -> None: ...
    def bytes_held(self) -> int: ...
    def expert_bytes(self, layer: int, substitute: bool = False) -> int: ...


class Policy:
    name = ""
    masked = True     # True: the engine restricts routing to slot_of(layer) >= 0
    observes = True   # masked: the engine passes the router's outputs to observe()

    def __init__(self, pool: ExpertPool, slots: Mapping[int, int], n_expert: int,
                 n_expert_used: int, telemetry: Telemetry | None = None, loader=None,
                 substitutes: Mapping[int, int] | None = None):
        for layer, n in slots.items():
            if not n_expert_used <= n <= n_expert:
                raise ValueError(f"layer {layer}: {n} slots; a policy needs between top-k "
                                 f"({n_expert_used}) and n_expert ({n_expert})")
        self.pool = pool
        self.slots = dict(slots)
        self.layers = sorted(self.slots)
        self.n_expert = n_expert
        self.k = n_expert_used
        self.telemetry = telemetry or Telemetry()
        self._lock = threading.Lock()
        # Every read goes through it; the planner passes a loader.VirtualLoader.
        self._loader = loader or Loader(f"edgemoe-{self.name}")
        # The one table of who holds which slot, per layer (see cache.SlotTable).
        self.tables = {l: SlotTable(self.slots[l], n_expert) for l in self.layers}
        # The substitute tier ({layer: n}; the pool's low-bit copies, docs/FORMAT.md): n
        # substitutes per layer loaded by warm() and never moved.
        self.sub_tables = ({l: SlotTable(int(substitutes[l]), n_expert) for l in self.layers}
                           if substitutes else {})

    # -- reads: every one goes through the loader thread --------------------------------------
    def _read(self, layer: int, expert: int, slot: int, substitute: bool = False) -> None:
        t0 = time.perf_counter()
        if substitute:   # the expert's low-bit copy, into the pool's substitute tier
            self.pool.load(layer, expert, slot, substitute=True)
            nbytes = self.pool.expert_bytes(layer, substitute=True)
        else:
            self.pool.load(layer, expert, slot)
            nbytes = self.pool.expert_bytes(layer)
        self.telemetry.add(loads=1, bytes_read=nbytes, read_seconds=time.perf_counter() - t0)
        self.telemetry.resident_bytes = self.pool.bytes_held()

    def _warm_reads(self, layer: int, full: Sequence[int], substitutes: Sequence[int]) -> list:
        """Queue the reads of `full` into free full slots and of `substitutes` into the
        substitute tier; returns what _finish_warm() waits on."""
        jobs = []
        for table, experts, sub in ((self.tables[layer], full, False),
                                    (self.sub_tables.get(layer), substitutes, True)):
            for e in experts[: table.n_slots if table is not None else 0]:
                slot = table.free.pop()
                jobs.append((table, layer, e, slot, self._loader.submit(
                    partial(self._read, layer, e, slot, sub), DEMAND)))
        return jobs

    @staticmethod
    def _finish_warm(jobs: list) -> None:
        for table, layer, e, slot, fut in jobs:
            try:
                fut.result()
            except OSError as exc:
                raise ShardSetError(f"layer {layer} expert {e}: cannot be read ({exc})") from exc
            table.commit(e, slot)

    def substitute_of(self, layer: int) -> np.ndarray | None:
        """(n_expert,) int32: the substitute slot of every expert whose low-bit copy is
        resident, -1 for the others; None without a substitute tier. Substitutes never move
        after warm(), so one read per step is enough."""
        if not self.sub_tables:
            return None
        return self.sub_tables[layer].array()

    # -- engine interface (defaults; each policy overrides what it uses) -----------------------
    def warm(self) -> None:
        """Load the initial experts (blocking; before the first step)."""

    def slot_of(self, layer: int) -> np.ndarray:
        with self._lock:
            return self.tables[layer].array()

    def resident(self, layer: int) -> list[int]:
        """The experts of `layer` that hold a slot now."""
        with self._lock:
            return list(self.tables[layer].resident)

    def resident_mask(self, layer: int) -> np.ndarray:
        return self.slot_of(layer) >= 0

    def observe(self, layer: int, probs: np.ndarray, x_norm: np.ndarray,
                selected: np.ndarray | None = None) -> None:
        """Masked policies: the unmasked router output feeding this layer, and optionally what
        masked gating selected from it."""

    def gate(self, layer: int, ids: np.ndarray, weights: np.ndarray,
             decode: bool) -> tuple[np.ndarray, np.ndarray]:
        return ids, weights

    def ensure(self, layer: int, experts: np.ndarray) -> dict[int, int]:
        raise NotImplementedError(f"{self.name} routes among resident experts; use slot_of()")

    def prefetch(self, layer: int, logits: np.ndarray) -> None:
        """Exact policies: a prediction of the next layer's routing."""

    def end_step(self, n_tokens: int = 1) -> dict:
        return self.telemetry.token_done(n_tokens)

    def wait_idle(self) -> None:
        """Block until every read queued so far is done (benchmarks, tests, shutdown)."""
        self._loader.submit(lambda: None, BACKGROUND).result()

    def close(self) -> None:
        self._loader.close()

    def __enter__(self) -> "Policy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MaskedPolicy(Policy):
    """Shared by full, static and swap: routing may use the experts of the slot table.

    With `substitutes` ({layer: n}; the pool's substitute tier, docs/FORMAT.md) the policy also
    keeps n low-bit copies per layer resident (`sub_tables`): an expert whose full weights are
    not resident but whose substitute is stays routable and runs from its substitute (counted
    as `substituted`), so fewer tokens are redirected. Substitutes are loaded once, the
    experts after the initial full set first."""

    def __init__(self, pool, slots, n_expert, n_expert_used, telemetry=None, loader=None,
                 substitutes: Mapping[int, int] | None = None):
        super().__init__(pool, slots, n_expert, n_expert_used, telemetry, loader, substitutes)
        # The table each layer's routing used this step (what slot_of() last returned): during a
        # step experts can only become routable, so telemetry judges a step by its own table.
        self._view: dict[int, np.ndarray] = {}

    def initial_experts(self, layer: int) -> Sequence[int]:
        raise NotImplementedError

    def warm(self) -> None:
        jobs = []
        for layer in self.layers:
            order = [int(e) for e in self.initial_experts(layer)]
            full = set(order[: self.slots[layer]])
            # Substitutes for the experts after the initial full set first.
            rest = [e for e in order if e not in full] + [e for e in order if e in full]
            jobs += self._warm_reads(layer, order[: self.slots[layer]], rest)
        self._finish_warm(jobs)

    def slot_of(self, layer: int) -> np.ndarray:
        with self._lock:
            view = self._view[layer] = self.tables[layer].array()
        return view   # the caller reads it, never writes it

    def count_routing(self, layer: int, wanted: np.ndarray, selected: np.ndarray | None) -> None:
        """Telemetry for one layer-step: wanted (n_tokens, k) unmasked top-k ids; selected
        (n_tokens, k) the masked choice, each of which must have been routable."""
        with self._lock:
            table = self._view.get(layer)
            if table is None:
                table = self.tables[layer].array()
        full = table[wanted] >= 0
        routable = table >= 0
        substituted = 0
        if self.sub_tables:
            sub = self.sub_tables[layer].array() >= 0
            substituted = int((~full & sub[wanted]).sum())
            routable = routable | sub
        hits = int(full.sum())
        absent = 0
        if selected is not None:
            selected = np.asarray(selected)
            absent = int((~routable[selected[selected >= 0]]).sum())
        self.telemetry.add(layer_steps=wanted.shape[0], experts_run=wanted.size, hits=hits,
                           substituted=substituted,
                           redirects=wanted.size - hits - substituted, absent_selected=absent)

    def observe(self, layer, probs, x_norm, selected=None) -> None:
        self.count_routing(layer, topk(probs, self.k)[0], selected)


class StaticPolicy(MaskedPolicy):
    """Pruning baseline: a fixed resident set per layer, the experts with the highest score
    (largest ||E_i||, or most used on calibration text), never swapped."""
    name = "static"

    def __init__(self, pool, slots, n_expert, n_expert_used, scores: Mapping[int, np.ndarray],
                 telemetry=None, loader=None, substitutes: Mapping[int, int] | None = None):
        super().__init__(pool, slots, n_expert, n_expert_used, telemetry, loader, substitutes)
        self.scores = {l: np.asarray(scores[l], dtype=np.float64) for l in self.layers}

    def initial_experts(self, layer: int) -> Sequence[int]:
        return np.argsort(-self.scores[layer], kind="stable")


class FullPolicy(MaskedPolicy):
    """Every expert resident (expert e in slot e): the reference the others are measured against,
    and what the engine runs without a budget. Every wanted expert is a hit, so it needs no
    router outputs (observes = False: the engine's graph then computes none) and counts each
    step's routing in end_step()."""
    name = "full"
    observes = False

    def __init__(self, pool, n_expert, n_expert_used, layers: Sequence[int], telemetry=None):
        super().__init__(pool, {l: n_expert for l in layers}, n_expert, n_expert_used, telemetry)

    def initial_experts(self, layer: int) -> Sequence[int]:
        return range(self.n_expert)

    def end_step(self, n_tokens: int = 1) -> dict:
        run = n_tokens * self.k * len(self.layers)
        self.telemetry.add(layer_steps=n_tokens * len(self.layers), experts_run=run, hits=run)
        return super().end_step(n_tokens)


class SwapPolicy(MaskedPolicy):
    """SwapMoE's virtual experts: masked gating over a resident set that a background thread
    adapts to Eq. 1 importance, measured on the unmasked router over update windows.

    After every `interval` tokens the swap plan (importance.plan_swaps) is made in end_step(),
    i.e. between two steps: each victim leaves the visible table there, so no step can be using
    its slot when the background read overwrites it, and the candidate becomes visible only once
    its read completed. At most `max_swaps` reads (default: one per expert layer) are in flight,
    so a slow device never builds a backlog and decode never waits for a read. A shard that cannot be read is warned about once
    and never tried again; routing carries on with the experts that are resident."""
    name = "swap"

    def __init__(self, pool, slots, n_expert, n_expert_used, norms: Mapping[int, np.ndarray],
                 interval: int = 16, max_swaps: int | None = None, margin: float = 0.0,
                 decay: float = 0.0,
                 initial: Mapping[int, Sequence[int]] | None = None, telemetry=None,
                 loader=None, substitutes: Mapping[int, int] | None = None):
        super().__init__(pool, slots, n_expert, n_expert_used, telemetry, loader, substitutes)
        # One swap per expert layer and window by default: adapting after a topic change needs
        # several experts replaced in every layer, and reads are bounded by in-flight count.
        max_swaps = len(self.layers) if max_swaps is None else max_swaps
        if interval < 1 or max_swaps < 1:
            raise ValueError(f"swap: interval ({interval}) and max_swaps ({max_swaps}) must be >= 1")
        self.tracker = ImportanceTracker(norms, n_expert_used, decay)
        self.interval = interval
        self.max_swaps = max_swaps
        self.margin = margin
        self._initial = initial
        self._tokens = 0
        self._in_flight = {l: set() for l in self.layers}
        self._failed = {l: set() for l in self.layers}
        self._warned = False

    def initial_experts(self, layer: int) -> Sequence[int]:
        if self._initial is not None:
            return self._initial[layer]
        return np.argsort(-self.tracker.norms[layer], kind="stable")

    def observe(self, layer, probs, x_norm, selected=None) -> None:
        self.count_routing(layer, self.tracker.observe(layer, probs, x_norm), selected)

    def end_step(self, n_tokens: int = 1) -> dict:
        self._tokens += n_tokens
        if self._tokens >= self.interval:
            self._tokens = 0
            self._start_swaps(self.tracker.close_window())
        return super().end_step(n_tokens)

    def _start_swaps(self, importance: dict[int, np.ndarray]) -> None:
        with self._lock:
            in_flight = sum(len(s) for s in self._in_flight.values())
            routable = {l: set(self.tables[l].resident) for l in self.layers}
            busy = {l: self._in_flight[l] | self._failed[l] for l in self.layers}
            free = {l: len(self.tables[l].free) for l in self.layers}
            plan = plan_swaps(importance, routable, busy, free, self.k,
                              self.max_swaps - in_flight, self.margin)
            for s in plan:
                table = self.tables[s.layer]
                # A victim is retired before any step can use it again.
                slot = table.free.pop() if s.victim is None else table.retire(s.victim)
                self._in_flight[s.layer].add(s.candidate)
                self._loader.submit(partial(self._swap_in, s.layer, s.candidate, slot),
                                    BACKGROUND)

    def _swap_in(self, layer: int, expert: int, slot: int) -> None:
        try:
            self._read(layer, expert, slot)
        except Exception as exc:  # noqa: BLE001 - nobody waits on a swap: report it here, once
            with self._lock:
                self.tables[layer].release(slot)
                self._in_flight[layer].discard(expert)
                self._failed[layer].add(expert)
            if not self._warned:
                self._warned = True
                warnings.warn(f"swap: layer {layer} expert {expert} cannot be read ({exc}); "
                              f"carrying on with the resident experts", RuntimeWarning, 2)
            return
        with self._lock:
            self.tables[layer].commit(expert, slot)
            self._in_flight[layer].discard(expert)
        self.telemetry.add(swaps=1)


class OnDemandPolicy(Policy):
    """AdapMoE-style exact routing: a per-layer LRU cache, misses loaded before the layer's experts
    run, the first `n_prefetch` predicted non-resident experts of the next layer loaded in the
    background, and optional adaptive gating (decode only) with per-layer sensitivities.

    Per-miss decisions (`wait_threshold`, decode only; needs `sensitivity`): each chosen expert
    that is not resident waits (loaded, then run: exact), runs its resident substitute while its
    full weights load in the background for the tokens after (HOBBIT), or is dropped with its
    weight given to the others (routing.miss_decisions: a miss with its substitute resident
    waits only at s_l * w^2 >= `substitute_threshold`, one without at >= `wait_threshold`).
    `quality` names the `--quality` setting the thresholds came from, for telemetry: exact
    (None: no decisions), balanced, fast. With `substitutes` ({layer: n}) n low-bit copies per
    layer are loaded by warm(), the experts of `substitute_order` first (default: by id)."""
    name = "ondemand"
    masked = False

    def __init__(self, pool, slots, n_expert, n_expert_used, n_prefetch: int = 1,
                 sensitivity: Mapping[int, float] | None = None, threshold: float | None = None,
                 telemetry=None, loader=None, substitutes: Mapping[int, int] | None = None,
                 wait_threshold: float | None = None, substitute_threshold: float = math.inf,
                 quality: str | None = None,
                 substitute_order: Mapping[int, Sequence[int]] | None = None):
        super().__init__(pool, slots, n_expert, n_expert_used, telemetry, loader, substitutes)
        needs_sens = threshold is not None or wait_threshold is not None
        if needs_sens and (sensitivity is None or set(sensitivity) < set(self.layers)):
            raise ValueError("adaptive gating and per-miss decisions need a sensitivity for "
                             "every expert layer (run `edgemoe calibrate`)")
        if wait_threshold is not None and wait_threshold < 0:
            raise ValueError(f"wait threshold {wait_threshold}: must be >= 0")
        self.n_prefetch = n_prefetch
        self.sensitivity = dict(sensitivity or {})
        self.threshold = threshold
        self.wait_threshold = wait_threshold
        self.substitute_threshold = substitute_threshold
        self.quality = quality   # the --quality setting these thresholds came from, if any
        self._substitute_order = substitute_order
        self._pending = {l: {} for l in self.layers}       # expert -> Future of a prefetch read
        self._prefetched = {l: set() for l in self.layers}  # loaded by prefetch, not yet used
        # Full loads started for experts that ran from their substitute: never cancelled.
        self._filling = {l: set() for l in self.layers}
        # This step's substitute runs per layer: {expert: substitute slot} (gate -> engine).
        self._substituted: dict[int, dict[int, int]] = {l: {} for l in self.layers}
        # The experts ensure() handed out for the layer's current step: a prefetch that starts
        # reading while the layer runs must not take their slots. Cleared by the layer's next
        # prefetch (the engine issues it from an earlier layer, once this one has run).
        self._in_use = {l: frozenset() for l in self.layers}

    def warm(self) -> None:
        """The substitute tier (the full slots fill on demand)."""
        if not self.sub_tables:
            return
        jobs = []
        for layer in self.layers:
            order = (list(self._substitute_order[layer]) if self._substitute_order
                     else range(self.n_expert))
            jobs += self._warm_reads(layer, [], [int(e) for e in order])
        self._finish_warm(jobs)

    def gate(self, layer, ids, weights, decode):
        ids = np.asarray(ids)
        if self.threshold is not None and decode:
            ids, weights = adaptive_gate(ids, weights, self.sensitivity[layer], self.threshold)
        subs: dict[int, int] = {}
        if self.wait_threshold is not None and decode:
            with self._lock:
                resident = self.tables[layer].array() >= 0
                sub_slot = (self.sub_tables[layer].array() if self.sub_tables
                            else np.full(self.n_expert, -1, dtype=np.int32))
                ids, weights, action = miss_decisions(
                    ids, weights, resident, sub_slot >= 0, self.sensitivity[layer],
                    self.wait_threshold, self.substitute_threshold)
                on_sub = action == SUBSTITUTE
                subs = {int(e): int(sub_slot[e]) for e in np.unique(ids[on_sub])}
                # The experts that run from full slots: from now on no read of this layer
                # (a prefetch, a fill) may take their slots, so a hit stays a hit until
                # ensure() hands it out, and a decision not to wait holds.
                protect = self._in_use[layer] = frozenset(
                    np.unique(ids[(ids >= 0) & ~on_sub]).tolist())
                # Substitute runs are not loaded now; their full weights are, in the background.
                for e in subs:
                    # A prefetch of it already queued becomes its fill (ensure() keeps it).
                    self._filling[layer].add(e)
                    if e not in self._pending[layer]:
                        self._pending[layer][e] = self._loader.submit(
                            partial(self._load, layer, e, protect, False), PREFETCH)
            self.telemetry.add(substituted=int(on_sub.sum()),
                               dropped=int((action == DROP).sum()))
        self._substituted[layer] = subs
        self.telemetry.add(layer_steps=ids.shape[0], experts_run=int((ids >= 0).sum()))
        return ids, weights

    def substituted(self, layer: int) -> dict[int, int]:
        """The experts the last gate() of `layer` runs from their substitutes: {expert:
        substitute slot}. ensure() is never asked for them."""
        return self._substituted[layer]

    def groups(self, layer: int, ids: np.ndarray) -> list[np.ndarray]:
        """Split a selection into groups of at most slots(layer) distinct experts, resident ones
        first so they run before anything could evict them."""
        ids = np.asarray(ids)
        need = np.unique(ids[ids >= 0])
        need = need[~np.isin(need, list(self._substituted.get(layer, ())))]
        with self._lock:
            order = sorted(need.tolist(), key=lambda e: e not in self.tables[layer])
        n = self.slots[layer]
        return [np.array(order[i:i + n], dtype=np.int32) for i in range(0, len(order), n)]

    def _load(self, layer: int, expert: int, protect: frozenset, demand: bool) -> None:
        cache = self.tables[layer]
        with self._lock:
            if expert in cache:   # a read queued twice (a fill after a prefetch): nothing to do
                self._pending[layer].pop(expert, None)
                self._filling[layer].discard(expert)
                return
            got = cache.reserve(expert, protect | self._in_use[layer])
            if got is None:   # only a prefetch can find every slot protected: skip it
                self._pending[layer].pop(expert, None)
                self._filling[layer].discard(expert)
                return
            slot, victim = got
            self._prefetched[layer].discard(victim)
        try:
            self._read(layer, expert, slot)
        except Exception as exc:
            with self._lock:
                cache.release(slot)
                self._pending[layer].pop(expert, None)
                self._filling[layer].discard(expert)
            if not demand:
                return   # a failed prefetch becomes a demand load, which reports the error
            if isinstance(exc, ShardSetError):
                raise
            raise ShardSetError(f"layer {layer} expert {expert}: cannot be read ({exc})") from exc
        with self._lock:
            cache.commit(expert, slot)
            if not demand:
                self._pending[layer].pop(expert, None)
                if expert in self._filling[layer]:   # a substitute's full weights
                    self._filling[layer].discard(expert)
                else:
                    self._prefetched[layer].add(expert)
                    self.telemetry.add(prefetch_issued=1)

    def prefetch(self, layer: int, logits: np.ndarray) -> None:
        if self.n_prefetch <= 0 or layer not in self.tables:
            return
        self.prefetch_ids(layer, topk(logits, self.k)[0])

    def prefetch_ids(self, layer: int, ids: np.ndarray) -> None:
        """prefetch() from the predicted top-k ids (n_tokens, k) (the planner's replays)."""
        if self.n_prefetch <= 0:
            return
        guess = list(dict.fromkeys(np.asarray(ids).T.ravel().tolist()))  # every token's best first
        with self._lock:
            self._in_use[layer] = frozenset()
            chosen = [e for e in prefetch_candidates(self.tables[layer], guess, self.n_prefetch)
                      if e not in self._pending[layer]]
            for e in chosen:
                self._pending[layer][e] = self._loader.submit(
                    partial(self._load, layer, e, frozenset(guess), False), PREFETCH)

    def ensure(self, layer: int, experts: np.ndarray) -> dict[int, int]:
        experts = np.asarray(experts)
        need = sorted(set(experts[experts >= 0].tolist()))
        if len(need) > self.slots[layer]:
            raise ValueError(f"layer {layer}: {len(need)} distinct experts but {self.slots[layer]} "
                             f"slots; split the selection with groups()")
        t0 = time.perf_counter()
        waited = False
        with self._lock:
            pending = list(self._pending[layer].items())
        for e, fut in pending:
            if e not in need:
                if e in self._filling[layer]:
                    continue   # a substitute's full weights: the next tokens want them
                # Not needed: a prefetch that has not started would only cost bandwidth; one
                # already reading is not waited for. Its slot was taken from the cache before
                # the lookup below or, if later, never from `need` (_in_use), so the layer runs
                # beside the read, which commits when done.
                if fut.cancel():
                    with self._lock:
                        self._pending[layer].pop(e, None)
                continue
            waited = True
            fut.result()
        cache = self.tables[layer]
        with self._lock:
            self._in_use[layer] = frozenset(need)
            used = sum(e in self._prefetched[layer] for e in need)
            self._prefetched[layer].difference_update(need)
            hits = [e for e in need if e in cache]
            for e in hits:
                cache.touch(e)
            misses = [e for e in need if e not in cache]
        protect = frozenset(need)
        futures = [self._loader.submit(partial(self._load, layer, e, protect, True), DEMAND)
                   for e in misses]
        for fut in futures:
            fut.result()
        stall = time.perf_counter() - t0 if (waited or misses) else 0.0
        self.telemetry.add(hits=len(hits), misses=len(misses), prefetch_used=used,
                           stall_seconds=stall)
        with self._lock:
            return {e: cache.resident[e] for e in need}


def make_policy(name: str, pool: ExpertPool, slots: Mapping[int, int], n_expert: int,
                n_expert_used: int, *, norms: Mapping[int, np.ndarray] | None = None,
                usage: Mapping[int, np.ndarray] | None = None, **options) -> Policy:
    """`--policy NAME` -> a policy. norms: ||E_i|| per layer (swap importance; static's default
    ranking); usage: per-layer expert counts from calibration (static keeps the most used
    instead). options go to the policy (interval, max_swaps, n_prefetch, sensitivity, ...)."""
    if name == "full":
        return FullPolicy(pool, n_expert, n_expert_used, sorted(slots), **options)
    if name == "static":
        scores = usage if usage is not None else norms
        if scores is None:
            raise ValueError("static needs expert norms or usage counts to choose its experts")
        return StaticPolicy(pool, slots, n_expert, n_expert_used, scores=scores, **options)
    if name == "swap":
        if norms is None:
            raise ValueError("swap needs the experts' norms ||E_i|| (importance, Eq. 1)")
        return SwapPolicy(pool, slots, n_expert, n_expert_used, norms=norms, **options)
    if name == "ondemand":
        return OnDemandPolicy(pool, slots, n_expert, n_expert_used, **options)
    raise ValueError(f"unknown policy {name!r}; expected full, swap, ondemand or static")
