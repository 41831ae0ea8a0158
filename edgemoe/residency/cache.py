"""The slot table every policy keeps per layer (which expert holds which slot, LRU order), and
the trace statistics the planner reads from replays.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


class SlotTable:
    """Which expert holds which slot in one layer: the one record of residency. Every policy
    keeps one per layer (what routing may use, what status and hit rates report); the pool only
    holds bytes. Residents are kept least recently used first (ondemand's LRU order)."""

    def __init__(self, n_slots: int, n_expert: int):
        self.n_slots = n_slots
        self.resident: OrderedDict[int, int] = OrderedDict()   # expert -> slot, LRU first
        self.free: list[int] = list(range(n_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._array = np.full(n_expert, -1, dtype=np.int32)    # expert -> slot, -1: absent

    def __contains__(self, expert: int) -> bool:
        return expert in self.resident

    def __len__(self) -> int:
        return len(self.resident)

    def array(self) -> np.ndarray:
        """(n_expert,) int32: the slot of every resident expert, -1 for the others (a copy)."""
        return self._array.copy()

    def touch(self, expert: int) -> None:
        self.resident.move_to_end(expert)

    def retire(self, expert: int) -> int:
        """`expert` stops being resident; returns its slot, which the caller now owns."""
        slot = self.resident.pop(expert)
        self._array[expert] = -1
        return slot

    def reserve(self, expert: int, protect: Iterable[int] = ()) -> tuple[int, int | None] | None:
        """A slot for `expert`: a free one, or the least recently used resident's not in protect.
        The victim stops being resident here. None when every slot is protected."""
        if self.free:
            return self.free.pop(), None
        protect = set(protect)
        for victim in self.resident:
            if victim not in protect:
                return self.retire(victim), victim
        return None

    def commit(self, expert: int, slot: int) -> None:
        """The read into `slot` completed: `expert` is resident, most recently used."""
        self.resident[expert] = slot
        self._array[expert] = slot

    def release(self, slot: int) -> None:
        """A reserved slot whose read failed goes back to the free list."""
        self.free.append(slot)


@dataclass(frozen=True)
class CacheStats:
    tokens: int
    wanted: int            # experts the router selected, summed over tokens
    hits: int
    misses: int            # demand loads
    prefetch_issued: int
    prefetch_used: int
    # Of misses / prefetches, those that filled a free slot: the cache filling from cold, once
    # per slot, which a run does while it reads the prompt. The rest is the steady state.
    fill_misses: int = 0
    fill_prefetches: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.wanted if self.wanted else 1.0

    @property
    def misses_per_token(self) -> float:
        return self.misses / self.tokens if self.tokens else 0.0

    @property
    def steady_misses(self) -> int:
        return self.misses - self.fill_misses

    @property
    def prefetch_accuracy(self) -> float | None:
        return self.prefetch_used / self.prefetch_issued if self.prefetch_issued else None


def prefetch_candidates(cache: SlotTable, predicted: Sequence[int], n_prefetch: int) -> list[int]:
    """The first n_prefetch predicted experts (best first) that are not resident."""
    return [e for e in predicted if e not in cache][:n_prefetch]


def simulate_layer(wanted: Sequence[np.ndarray], n_slots: int,
                   predicted: Sequence[np.ndarray] | None = None,
                   n_prefetch: int = 1, reads: list | None = None) -> CacheStats:
    """Replay one layer's decode routing through an LRU cache of n_slots, as OnDemandPolicy does.

    wanted[t]: experts token t runs in this layer (ids >= 0; -1 entries, dropped by adaptive
    gating, are ignored). predicted[t]: the next-layer predictor's experts for token t, best
    first, prefetched before wanted[t] is served.
    reads, if given, gets one entry per token: (prefetched, demanded, needed, used), the experts
    read by prefetch and on demand (filling free slots included), the distinct experts the token
    runs, and how many of those a prefetch had brought in."""
    rows = list(wanted) + (list(predicted) if predicted is not None else [])
    cache = SlotTable(n_slots, 1 + max((int(np.max(r)) for r in rows if len(r)), default=0))
    hits = misses = issued = used = n_wanted = fill_misses = fill_prefetches = 0
    prefetched: set[int] = set()
    for t, row in enumerate(wanted):
        pre, dem, used_before = [], [], used
        if predicted is not None:
            guess = [int(e) for e in predicted[t]]
            for e in prefetch_candidates(cache, guess, n_prefetch):
                got = cache.reserve(e, protect=guess)
                if got is None:
                    break
                cache.commit(e, got[0])
                prefetched.discard(got[1])
                prefetched.add(e)
                issued += 1
                fill_prefetches += got[1] is None
                pre.append(e)
        need = sorted({int(e) for e in row if e >= 0})
        n_wanted += len(need)
        for e in need:
            if e in prefetched:
                used += 1
            if e in cache:
                hits += 1
                cache.touch(e)
        for e in need:
            if e not in cache:
                misses += 1
                slot, victim = cache.reserve(e, protect=need)
                fill_misses += victim is None
                dem.append(e)
                prefetched.discard(victim)
                cache.commit(e, slot)
        prefetched.difference_update(need)
        if reads is not None:
            reads.append((pre, dem, need, used - used_before))
    return CacheStats(tokens=len(wanted), wanted=n_wanted, hits=hits, misses=misses,
                      prefetch_issued=issued, prefetch_used=used, fill_misses=fill_misses,
                      fill_prefetches=fill_prefetches)
