"""Counters every policy keeps, a one-line summary per run and a JSON record per token.

Counts are over (token, layer) pairs. `experts_run` is how many experts computed something. Each
expert the router wants (unmasked top-k, after adaptive gating) is exactly one of: a hit (it was
resident), a miss (it was loaded on demand, the step waiting for it: ondemand's "wait"), a
substitute (its low-bit copy was resident and ran: masked policies with a substitute tier, and
ondemand's "substitute" decision), a drop (not resident and masked, its weight given to the others:
ondemand's "drop" decision) or a redirect (masked gating sent the token to a resident expert
instead: swap/static). Hit rate is hits over all four, for every policy. Thread-safe: the loader
thread adds reads and swaps while the engine thread adds selections.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, fields

from edgemoe.residency.budget import format_bytes


@dataclass(frozen=True)
class Counters:
    tokens: int = 0
    layer_steps: int = 0          # (token, layer) pairs routed
    experts_run: int = 0          # sum over (token, layer) of experts actually computed
    hits: int = 0                 # wanted and resident
    misses: int = 0               # wanted, not resident, loaded before running (ondemand)
    redirects: int = 0            # wanted, not resident, routed elsewhere (swap/static)
    substituted: int = 0          # wanted, not resident, run from its resident low-bit copy
    dropped: int = 0              # wanted, not resident, masked (ondemand's per-miss decision)
    absent_selected: int = 0      # masked gating chose a non-routable expert: a bug, must stay 0
    prefetch_issued: int = 0
    prefetch_used: int = 0        # prefetched experts that the next routing selected
    swaps: int = 0                # completed swap loads (swap)
    loads: int = 0                # every read of an expert into a slot
    bytes_read: int = 0
    read_seconds: float = 0.0     # time spent inside reads (any thread)
    stall_seconds: float = 0.0    # time the engine thread waited for reads

    def __sub__(self, other: "Counters") -> "Counters":
        return Counters(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                           for f in fields(self)})


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


class Telemetry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # A plain dict on the hot path (add() runs per layer and step); Counters on reading.
        self._now = {f.name: 0 for f in fields(Counters)}
        self._last_token = dict(self._now)
        self.resident_bytes = 0   # gauge, set by the policy whenever its slots change

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, v in deltas.items():
                self._now[name] += v

    @property
    def counters(self) -> Counters:
        with self._lock:
            return Counters(**self._now)

    def token_done(self, n_tokens: int = 1) -> dict:
        """Close one engine step (n_tokens tokens) and return its per-token JSON record."""
        with self._lock:   # plain dicts: this runs after every step, decode included
            self._now["tokens"] += n_tokens
            now = dict(self._now)
        delta = {name: v - self._last_token[name] for name, v in now.items()}
        self._last_token = now
        return _record(delta, self.resident_bytes)

    def summary(self) -> str:
        return summary_line(self.counters, self.resident_bytes)


def record(c: Counters, resident_bytes: int) -> dict:
    """Derived figures for a span of counters (one token, or a whole run), JSON-ready."""
    return _record(dict(c.__dict__), resident_bytes)


def _record(c: dict, resident_bytes: int) -> dict:
    wanted = c["hits"] + c["misses"] + c["redirects"] + c["substituted"] + c["dropped"]
    c.update(
        experts_per_token=_ratio(c["experts_run"], c["layer_steps"]),
        hit_rate=_ratio(c["hits"], wanted),
        prefetch_accuracy=_ratio(c["prefetch_used"], c["prefetch_issued"]),
        redirect_rate=_ratio(c["redirects"], wanted),
        substitutes_per_token=_ratio(c["substituted"], c["tokens"]),
        drops_per_token=_ratio(c["dropped"], c["tokens"]),
        waits_per_token=_ratio(c["misses"], c["tokens"]),
        bytes_read_per_token=_ratio(c["bytes_read"], c["tokens"]),
        stall_seconds_per_token=_ratio(c["stall_seconds"], c["tokens"]),
        resident_bytes=resident_bytes,
    )
    return c


def summary_line(c: Counters, resident_bytes: int) -> str:
    r = record(c, resident_bytes)
    parts = [f"{c.tokens} tok"]
    if r["experts_per_token"] is not None:
        parts.append(f"{r['experts_per_token']:.2f} experts/layer-token")
    if r["hit_rate"] is not None:
        parts.append(f"hit {r['hit_rate'] * 100:.1f}%")
    if r["prefetch_accuracy"] is not None:
        parts.append(f"prefetch {r['prefetch_accuracy'] * 100:.1f}% of {c.prefetch_issued}")
    if c.absent_selected:
        parts.append(f"NON-RESIDENT SELECTED {c.absent_selected}")
    if c.redirects:
        parts.append(f"redirected {r['redirect_rate'] * 100:.1f}%")
    if c.misses:
        parts.append(f"waits {r['waits_per_token']:.2f}/tok")
    if c.substituted:
        parts.append(f"substitutes {r['substitutes_per_token']:.2f}/tok")
    if c.dropped:
        parts.append(f"drops {r['drops_per_token']:.2f}/tok")
    parts.append(f"swaps {c.swaps}")
    per_tok = r["bytes_read_per_token"]
    parts.append(f"read {format_bytes(c.bytes_read)}"
                 + (f" ({format_bytes(per_tok)}/tok)" if per_tok is not None else ""))
    parts.append(f"stall {c.stall_seconds:.3f} s")
    parts.append(f"resident {format_bytes(resident_bytes)}")
    return "residency: " + ", ".join(parts)
