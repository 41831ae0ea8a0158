"""The planner's replays: the real policies driven over a routing trace against a simulated pool
(no bytes) and a loader on a clock of decode steps (loader.VirtualLoader), so that what the
planner and the slot DP count is what the policies do, by construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from edgemoe.residency.cache import CacheStats
from edgemoe.residency.loader import VirtualLoader
from edgemoe.residency.policies import OnDemandPolicy, StaticPolicy, SwapPolicy
from edgemoe.residency.routing import topk
from edgemoe.residency.traces import RoutingTrace


@dataclass(frozen=True)
class SwapReplay:
    hits: int
    wanted: int
    swaps: int
    # The quality proxy: per (token, layer), the share of the unmasked top-k's router
    # probability that falls on experts routable at that step, averaged.
    coverage: float = 1.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.wanted if self.wanted else 1.0


class SimulatedPool:
    """The pool's contract without bytes: a load into a full slot is only logged, as (layer,
    expert, filled) with filled True when it wrote a slot never written before (the cache
    filling from cold); a substitute's load is counted in `substitute_loads`; its time is the
    VirtualLoader's."""

    def __init__(self, expert_bytes: Mapping[int, int] | None = None):
        self._bytes = dict(expert_bytes or {})
        self._written: set[tuple[int, int]] = set()
        self.log: list[tuple[int, int, bool]] = []
        self.substitute_loads = 0

    def load(self, layer: int, expert: int, slot: int, substitute: bool = False) -> None:
        if substitute:
            self.substitute_loads += 1
            return
        filled = (layer, slot) not in self._written
        self._written.add((layer, slot))
        self.log.append((layer, expert, filled))

    def bytes_held(self) -> int:
        return 0

    def expert_bytes(self, layer: int, substitute: bool = False) -> int:
        return 0 if substitute else self._bytes.get(layer, 0)


def simulate_swap(trace: RoutingTrace, slots: Mapping[int, int], k: int,
                  norms: Mapping[int, np.ndarray], interval: int, max_swaps: int,
                  read_tokens: float, margin: float = 0.0, decay: float = 0.0,
                  usage: Mapping[int, np.ndarray] | None = None) -> SwapReplay:
    """Replay the trace through the real SwapPolicy over a SimulatedPool: its reads run one
    after another on a VirtualLoader, each taking read_tokens decode steps, and become routable
    when complete. The initial set is the most used experts (usage, as the runtime does when
    calibration has counts), else the largest norms."""
    layers = [l for l in trace.layers if l in slots]
    loader = VirtualLoader(read_tokens)
    initial = ({l: np.argsort(-np.asarray(usage[l]), kind="stable") for l in layers}
               if usage is not None else None)
    with SwapPolicy(SimulatedPool(), {l: slots[l] for l in layers}, trace.n_expert, k,
                    norms={l: norms[l] for l in layers}, interval=interval,
                    max_swaps=max_swaps, margin=margin, decay=decay, initial=initial,
                    loader=loader) as policy:
        c, coverage = replay_masked(policy, trace, loader)
    return SwapReplay(c.hits, c.hits + c.redirects, c.swaps, coverage)


def replay_masked(policy, trace: RoutingTrace, loader: VirtualLoader | None = None):
    """Decode the trace under a masked policy (full, static, swap) as the engine does: each
    step routes with the tables slot_of() gives, the policy observes the unmasked router, the
    step ends; background reads complete on the loader's clock. Returns its Counters and the
    coverage (SwapReplay.coverage) of the tables the steps routed with."""
    policy.warm()
    top = {}
    for l in policy.layers:
        ids, w = topk(trace.probs[l], policy.k)
        top[l] = (ids, w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30))
    covered = 0.0
    for t in range(trace.n_tokens):
        if loader is not None:
            loader.run_until(t)
        for l in policy.layers:
            table = policy.slot_of(l)   # the table this step routes with
            ids, w = top[l][0][t], top[l][1][t]
            covered += float(w[table[ids] >= 0].sum())
            if policy.observes:
                policy.observe(l, trace.probs[l][t:t + 1], trace.x_norm[l][t:t + 1])
        policy.end_step(1)
    steps = trace.n_tokens * len(policy.layers)
    return policy.telemetry.counters, covered / steps if steps else 1.0


def simulate_layer(wanted: Sequence[np.ndarray], n_slots: int,
                   predicted: Sequence[np.ndarray] | None = None,
                   n_prefetch: int = 1, reads: list | None = None) -> CacheStats:
    """Replay one layer's decode routing through the real OnDemandPolicy with n_slots slots.

    wanted[t]: experts token t runs in this layer (ids >= 0; -1 entries, dropped by adaptive
    gating, are ignored). predicted[t]: the next-layer predictor's top-k for token t, best
    first; its prefetch reads complete before wanted[t] is served (the engine issues them a
    layer ahead).
    reads, if given, gets one entry per token: (prefetched, demanded, needed, used), the experts
    read by prefetch and on demand (filling free slots included), the distinct experts the token
    runs, and how many of those a prefetch had brought in."""
    layer = 0
    n_expert = 1 + max((int(np.max(np.asarray(rows), initial=-1))
                        for rows in (wanted, predicted if predicted is not None else [])))
    n_expert = max(n_expert, n_slots)
    loader = VirtualLoader(0.0)
    pool = SimulatedPool()
    fills = {"misses": 0, "prefetches": 0}
    n_wanted = 0
    with OnDemandPolicy(pool, {layer: n_slots}, n_expert, 1, n_prefetch=n_prefetch,
                        loader=loader) as policy:
        for t, row in enumerate(wanted):
            logged = len(pool.log)
            if predicted is not None:
                policy.prefetch_ids(layer, np.asarray(predicted[t])[None, :])
                loader.run_until(loader.now + 1)   # the prefetch reads ran meanwhile
            pre = pool.log[logged:]
            used_before = policy.telemetry.counters.prefetch_used
            need = sorted({int(e) for e in row if e >= 0})
            n_wanted += len(need)
            policy.ensure(layer, np.asarray(need, dtype=np.int32))
            dem = pool.log[logged + len(pre):]
            fills["prefetches"] += sum(f for _, _, f in pre)
            fills["misses"] += sum(f for _, _, f in dem)
            if reads is not None:
                reads.append(([e for _, e, _ in pre], [e for _, e, _ in dem], need,
                              policy.telemetry.counters.prefetch_used - used_before))
        c = policy.telemetry.counters
    return CacheStats(tokens=len(wanted), wanted=n_wanted, hits=c.hits, misses=c.misses,
                      prefetch_issued=c.prefetch_issued, prefetch_used=c.prefetch_used,
                      fill_misses=fills["misses"], fill_prefetches=fills["prefetches"])


def simulate_static(trace: RoutingTrace, slots: Mapping[int, int], k: int,
                    scores: Mapping[int, np.ndarray]) -> tuple[int, int]:
    """(hits, wanted) of the real StaticPolicy keeping, per layer, the top-slots experts by
    `scores`, replayed over the trace."""
    layers = [l for l in trace.layers if l in slots]
    with StaticPolicy(SimulatedPool(), {l: slots[l] for l in layers}, trace.n_expert, k,
                      scores={l: scores[l] for l in layers},
                      loader=VirtualLoader(0.0)) as policy:
        c, _ = replay_masked(policy, trace)
    return c.hits, c.hits + c.redirects


@dataclass(frozen=True)
class TierReplay:
    """ondemand's decode of a trace with a substitute tier, per (token, layer) step of the
    replay: the misses it waited for (demand loads), the full reads it made in the background
    (prefetches and the fills of experts that ran from their substitute), and the quality
    proxy: the shares of the unmasked top-k's router weight (renormalised over the k) served
    by full experts, by substitutes, and dropped, averaged over the steps."""
    tokens: int
    waits: int
    background_reads: int
    substituted: int
    dropped: int
    experts_run: int   # full and substitute runs
    full_share: float
    substitute_share: float
    dropped_share: float

    @property
    def served_share(self) -> float:
        return self.full_share + self.substitute_share


def simulate_tiers(trace: RoutingTrace, slots: Mapping[int, int],
                   substitutes: Mapping[int, int] | None, k: int,
                   sensitivity: Mapping[int, float] | None = None,
                   wait_threshold: float | None = None,
                   substitute_threshold: float = np.inf, n_prefetch: int = 1,
                   substitute_order: Mapping[int, Sequence[int]] | None = None) -> TierReplay:
    """Decode the trace through the real OnDemandPolicy over a SimulatedPool, as the engine
    steps it: per token, per layer, gate() makes the per-miss decisions (wait / substitute /
    drop, with these thresholds; None: exact), ensure() loads what runs from full slots, then
    the next layer's prefetch is issued from its predicted top-k. Background reads (prefetches,
    substitutes' fills) complete before the next layer step asks (the VirtualLoader's clock
    moves one step per layer; their time is the planner's speed model's to weigh)."""
    layers = [l for l in trace.layers if l in slots]
    top = {}
    for l in layers:
        ids, w = topk(trace.probs[l], k)
        top[l] = (ids, w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30))
    predicted = {l: trace.predicted_ids(l, k) for l in layers}
    subs = ({l: int(substitutes[l]) for l in layers}
            if substitutes and any(substitutes[l] for l in layers) else None)
    pool = SimulatedPool()
    loader = VirtualLoader(0.0)
    shares = np.zeros(3)   # full, substitute, dropped
    with OnDemandPolicy(pool, {l: slots[l] for l in layers}, trace.n_expert, k,
                        n_prefetch=n_prefetch, sensitivity=sensitivity,
                        wait_threshold=wait_threshold, substitute_threshold=substitute_threshold,
                        loader=loader, substitutes=subs,
                        substitute_order=substitute_order) as policy:
        policy.warm()
        step = 0
        for t in range(trace.n_tokens):
            for i, l in enumerate(layers):
                loader.run_until(step)
                ids, w = top[l][0][t:t + 1], top[l][1][t:t + 1]
                kept, _ = policy.gate(l, ids, w, decode=True)
                on_sub = np.isin(ids, list(policy.substituted(l)))
                dropped = kept < 0
                shares += [float(w[~on_sub & ~dropped].sum()), float(w[on_sub].sum()),
                           float(w[dropped].sum())]
                for group in policy.groups(l, kept):
                    policy.ensure(l, group)
                if i + 1 < len(layers) and n_prefetch and predicted[layers[i + 1]] is not None:
                    policy.prefetch_ids(layers[i + 1], predicted[layers[i + 1]][t:t + 1])
                step += 1
            policy.end_step(1)
        loader.run_until(step)
        c = policy.telemetry.counters
    steps = max(1, trace.n_tokens * len(layers))
    full, sub, drop = shares / steps
    return TierReplay(tokens=trace.n_tokens, waits=c.misses,
                      background_reads=len(pool.log) - c.misses, substituted=c.substituted,
                      dropped=c.dropped, experts_run=c.experts_run, full_share=full,
                      substitute_share=sub, dropped_share=drop)
