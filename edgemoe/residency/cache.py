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
