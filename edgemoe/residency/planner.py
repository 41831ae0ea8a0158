"""The planner's model: from measured inputs, predict decode speed and hit rates per policy for a
slot allocation, allocate slots per layer, and choose swap's update interval and importance
decay (choose_swap_schedule).

Inputs the engine and the benchmark measure (nothing here is a constant of ours):
- Profile: expert read bandwidth and per-read latency of the device holding the shards; per layer
  the per-token compute of its non-expert part and of one expert; the rest of a token's compute.
- a RoutingTrace recorded on calibration text.
Counts (hits, loads, prefetches, swaps) come from replaying the trace through the same
policies themselves, driven over a simulated pool (replay.simulate_layer, replay.simulate_swap);
times from the model below. `edgemoe plan` prints it.

Time per decoded token:
  full / static / swap: other + sum_l (layer_l + k * expert_l)     (no read on the critical path;
      swap reads happen on the loader thread while compute goes on); swap is paced: a token
      takes at least its bytes read / the sustained read rate.
  ondemand: the trace is replayed token by token, layer by layer, on a clock, in the engine's
      order: layer l's attention and router (layer_l); its needed experts: wait for their
      prefetch reads, then the demand loads; the next layer's prefetch reads are queued; its
      experts run (e_l * expert_l; e_l < k with adaptive gating). One reader serves every read
      in the loader's order (demand first; queued prefetches the layer does not need are
      cancelled, a started one is not): a read takes latency + bytes / bandwidth, behind a
      token bucket that lets burst_bytes through at that speed and refills at the sustained
      rate (a cgroup blkio throttle, a flash device's write-back cache). The stall is the time
      the clock waits on reads.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from edgemoe.pool import read_span
from edgemoe.residency.allocation import allocate_slots, loads_table
from edgemoe.residency.budget import (Budget, MemoryNeeds, compute_text, expert_allowance,
                                     format_bytes, substitute_split)
from edgemoe.residency.replay import (SwapReplay, TierReplay, simulate_layer, simulate_static,
                                     simulate_swap, simulate_tiers)
from edgemoe.residency.traces import RoutingTrace

POLICIES = ("full", "static", "swap", "ondemand")


@dataclass(frozen=True)
class Profile:
    read_bytes_per_s: float              # expert reads from the shard device
    read_latency_s: float                # fixed cost per expert read (syscall, seek, page setup)
    layer_seconds: Mapping[int, float]   # per token: expert layer l without its experts
    expert_seconds: Mapping[int, float]  # per token: one expert of layer l
    other_seconds: float                 # per token: embeddings, dense layers, head, sampling
    # Per token with masked routing, where the whole step is one graph (top-k experts per
    # layer): cheaper than the split graphs the terms above are measured on. None: their sum.
    fused_seconds: float | None = None
    # What reads sustain back to back, when lower than what one read gets (a device or a
    # throttle that lets short bursts through, then holds a rate). None: read_bytes_per_s.
    sustained_bytes_per_s: float | None = None
    burst_bytes: float = 0.0             # how much gets through at full speed after a pause
    # Host -> device copies of a read expert into its slot (a device other than the CPU;
    # None: the CPU, whose slot copy is a memcpy the read time dwarfs).
    copy_bytes_per_s: float | None = None

    def read_seconds(self, nbytes: int) -> float:
        """One expert made resident: its read, then its copy into the device's slot."""
        copy = nbytes / self.copy_bytes_per_s if self.copy_bytes_per_s else 0.0
        return self.read_latency_s + nbytes / self.read_bytes_per_s + copy

    def paced(self, seconds_per_token: float, bytes_per_token: float) -> float:
        """A token cannot take less time than its reads need at the sustained rate."""
        rate = self.sustained_bytes_per_s or self.read_bytes_per_s
        return max(seconds_per_token, bytes_per_token / rate)


class _Reader:
    """The clock of the one thread that reads experts: reads run back to back, each taking
    the device's time behind a token bucket (capacity burst_bytes, refilled at the sustained
    rate; no bucket when the profile has no sustained rate)."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.free_at = 0.0
        self.level = profile.burst_bytes     # bytes the bucket lets through now
        self.level_at = 0.0

    def read(self, start: float, nbytes: int) -> float:
        """Issue a read at `start` (it waits for the reader); returns when it completes."""
        p = self.profile
        start = max(start, self.free_at)
        seconds = p.read_seconds(nbytes)
        rate = p.sustained_bytes_per_s
        if rate:
            level = min(p.burst_bytes, self.level + (start - self.level_at) * rate)
            seconds = max(seconds, (nbytes - level) / rate)
            self.level = min(p.burst_bytes, level + seconds * rate - nbytes)
            self.level_at = start + seconds
        self.free_at = start + seconds
        return self.free_at


def ondemand_timeline(profile: Profile, layers: list[int], reads: Mapping[int, list],
                      runs: Mapping[int, np.ndarray], expert_bytes: Mapping[int, int],
                      tokens: range | None = None) -> tuple[float, float]:
    """(seconds, stall seconds) per token of the ondemand policy replaying the trace's reads
    over `tokens` (default: all): reads[l][t] = (prefetched, demanded, needed, used) from
    replay.simulate_layer, runs[l][t] the experts token t runs in layer l. See the module's
    docstring for the order of events."""
    tokens = range(len(reads[layers[0]])) if tokens is None else tokens
    n_tokens = len(tokens)
    reader = _Reader(profile)
    queued: list[tuple[int, int, float]] = []          # prefetches not started: (layer, e, at)
    started: dict[int, dict[int, float]] = {l: {} for l in layers}   # layer -> {e: done}

    def start_queued(until: float) -> None:
        while queued and max(reader.free_at, queued[0][2]) <= until:
            l, e, at = queued.pop(0)
            started[l][e] = reader.read(at, expert_bytes[l])

    now = stall = 0.0
    for t in tokens:
        now += profile.other_seconds
        for i, l in enumerate(layers):
            now += profile.layer_seconds[l]
            _, demanded, needed, _ = reads[l][t]
            start_queued(now)
            ready = now
            for job in [j for j in queued if j[0] == l]:
                queued.remove(job)
                if job[1] in needed:   # waited for; unneeded ones are cancelled
                    started[l][job[1]] = reader.read(max(now, job[2]), expert_bytes[l])
            for e, done in started[l].items():
                if e in needed:
                    ready = max(ready, done)
            started[l] = {}
            for e in demanded:
                ready = reader.read(ready, expert_bytes[l])
            stall += ready - now
            now = ready
            if i + 1 < len(layers):
                nxt = layers[i + 1]
                queued.extend((nxt, e, now) for e in reads[nxt][t][0])
            now += runs[l][t] * profile.expert_seconds[l]
    return now / n_tokens, stall / n_tokens


def _cold_read(path, offset: int, nbytes: int, slot: np.ndarray | None = None) -> float:
    """Seconds of one read of nbytes at offset as the pool reads an expert (edgemoe.pool.
    read_span, from the device: the file's page cache is dropped first), with `slot` the copy
    into it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    t0 = time.perf_counter()
    data = read_span(path, offset, nbytes)
    if slot is not None:
        slot[:nbytes] = data
    return time.perf_counter() - t0


def measure_reads(shards, samples: int = 8, stream_bytes: int = 64 << 20
                  ) -> tuple[float, float, float | None, float]:
    """(bytes/s, seconds per read, sustained bytes/s, burst bytes) of cold expert reads from the
    device holding `shards` (an edgemoe.shardset.ShardSet), read as the pool reads them.

    Sustained and burst: distinct experts read back to back (up to stream_bytes) after a pause;
    the bytes done by each read's end, over all but the first quarter of the reads, fitted as
    burst + sustained * elapsed (a rate limiter lets a burst through at full speed, then holds
    its rate). None and 0 with fewer than 8 experts to read, or when the rate holds from the
    start.
    Per read: whole experts and single tensors of `samples` experts, each after a pause long
    enough for the sustained rate to have paid for it (so the figure is one read's, as decode
    issues them between computations), the copy into a slot included; least squares on
    time = a + bytes / b separates the fixed cost per read a from the bandwidth b."""
    experts = list(shards.experts())
    sustained, burst = None, 0.0
    stream, total = [], 0
    for shard in experts[::max(1, len(experts) // 64)]:
        if total >= stream_bytes:
            break
        stream.append(shard)
        total += shard.data_bytes
    if len(stream) >= 8:
        time.sleep(0.5)   # whatever read before has been paid for: the bucket is full
        done, ends = [], []
        t0 = time.perf_counter()
        for shard in stream:
            _cold_read(shard.path, shard.data_offset, shard.data_bytes)
            ends.append(time.perf_counter() - t0)
            done.append((done[-1] if done else 0) + shard.data_bytes)
        q = len(stream) // 4
        sustained, burst = (float(v) for v in np.polyfit(ends[q:], done[q:], 1))
    picks = [experts[i] for i in np.linspace(0, len(experts) - 1, min(samples, len(experts)),
                                              dtype=int)]
    sizes, seconds = [], []
    slot = np.ones(max(s.data_bytes for s in picks), dtype=np.uint8)   # pages already mapped
    for shard in picks:
        first = shard.tensors["ffn_gate"]
        for offset, nbytes in ((shard.data_offset, shard.data_bytes), (first.offset, first.nbytes)):
            if sustained:
                time.sleep(min(0.25, 1.5 * nbytes / sustained))
            seconds.append(_cold_read(shard.path, offset, nbytes, slot))
            sizes.append(nbytes)
    slope, intercept = np.polyfit(np.asarray(sizes, float), np.asarray(seconds), 1)
    if slope <= 0:   # too few or too noisy samples to separate the two: all of it is bandwidth
        bandwidth, latency = float(sum(sizes) / sum(seconds)), 0.0
    else:
        bandwidth, latency = float(1.0 / slope), float(max(intercept, 0.0))
    if sustained is not None and (sustained >= bandwidth or burst <= 0):
        sustained, burst = None, 0.0   # no burst: one rate
    return bandwidth, latency, sustained, burst


@dataclass(frozen=True)
class Prediction:
    policy: str
    slots: Mapping[int, int]
    seconds_per_token: float
    stall_per_token: float
    hit_rate: float                 # wanted experts resident when needed
    experts_per_token: float        # per (token, layer)
    bytes_read_per_token: float
    prefetch_accuracy: float | None = None
    swap_interval: int | None = None
    swap_decay: float | None = None
    coverage: float | None = None   # swap: top-k router mass on resident experts (the proxy)
    swaps_per_token: float = 0.0
    n_prefetch: int | None = None   # ondemand: predicted experts prefetched per layer
    notes: tuple[str, ...] = field(default=())
    schedule_notes: tuple[str, ...] = field(default=())   # swap: how its schedule was chosen
    # ondemand with a substitute tier: the split chosen per --quality (choose_tier_split)
    tiers: tuple = field(default=())

    @property
    def tok_per_s(self) -> float:
        return 1.0 / self.seconds_per_token

    def line(self) -> str:
        extra = ""
        if self.n_prefetch == 0:
            extra += ", no prefetch"
        elif self.prefetch_accuracy is not None:
            extra += (f", prefetch {self.n_prefetch or ''}"
                      f" ({self.prefetch_accuracy * 100:.0f}% used)")
        if self.swap_interval is not None:
            extra += (f", swap every {self.swap_interval} tok, decay {self.swap_decay or 0:g} "
                      f"({self.swaps_per_token:.2f}/tok, covers {self.coverage * 100:.1f}% of "
                      f"top-k mass)")
        if self.notes:
            extra += f" [{'; '.join(self.notes)}]"
        return (f"{self.policy:9s} {self.tok_per_s:8.2f} tok/s  hit {self.hit_rate * 100:5.1f}%  "
                f"{self.experts_per_token:.2f} experts/layer  "
                f"read {self.bytes_read_per_token / 2**20:.2f} MiB/tok  "
                f"stall {self.stall_per_token * 1000:.1f} ms/tok{extra}")


def _masked_seconds(profile: Profile, layers, k: int) -> float:
    """Per token under masked routing (one graph, k experts per layer)."""
    if profile.fused_seconds is not None:
        return profile.fused_seconds
    return profile.other_seconds + sum(profile.layer_seconds[l] + k * profile.expert_seconds[l]
                                       for l in layers)


def _masked(policy: str, trace: RoutingTrace, slots: Mapping[int, int], k: int,
            profile: Profile, hits: float, wanted: float, notes=(), **extra) -> Prediction:
    seconds = _masked_seconds(profile, trace.layers, k)
    return Prediction(policy=policy, slots=dict(slots), seconds_per_token=seconds,
                      stall_per_token=0.0, hit_rate=hits / wanted, experts_per_token=float(k),
                      bytes_read_per_token=extra.pop("bytes_read_per_token", 0.0),
                      notes=tuple(notes), **extra)


def predict_full(trace: RoutingTrace, k: int, profile: Profile) -> Prediction:
    slots = {l: trace.n_expert for l in trace.layers}
    return _masked("full", trace, slots, k, profile, 1.0, 1.0)


def predict_static(trace: RoutingTrace, slots: Mapping[int, int], k: int, profile: Profile,
                   scores: Mapping[int, np.ndarray] | None = None) -> Prediction:
    """Hit rate of a fixed set: the top-slots experts by `scores`, by default the most used on
    the trace itself (optimistic: chosen and scored on the same text)."""
    if scores is None:
        scores = {l: np.bincount(trace.wanted(l, k).ravel(), minlength=trace.n_expert)
                  for l in trace.layers}
        notes = ("static set chosen on the same trace",)
    else:
        notes = ()
    hits, wanted = simulate_static(trace, slots, k, scores)
    return _masked("static", trace, slots, k, profile, hits, wanted, notes)


SWAP_INTERVALS = (1, 2, 4, 8, 16, 32, 64)   # tokens per importance window, tried by the planner
SWAP_DECAYS = (0.0, 0.5, 0.8)                # weight of the previous windows' importance
COVERAGE_TIE = 1e-4   # schedules whose coverage is this close count as equal


@dataclass(frozen=True)
class SwapSchedule:
    """swap's update interval and importance decay, chosen on a routing trace, with the replay
    of every candidate: {(interval, decay): SwapReplay}."""
    interval: int
    decay: float
    replay: SwapReplay
    tried: Mapping[tuple[int, float], SwapReplay]

    def line(self) -> str:
        """The candidates' coverage, best decay per interval, for `edgemoe plan`."""
        best: dict[int, tuple[float, float]] = {}
        for (interval, decay), r in self.tried.items():
            if interval not in best or r.coverage > best[interval][0]:
                best[interval] = (r.coverage, decay)
        return ("swap schedule by top-k router mass on resident experts (calibration trace): "
                + ", ".join(f"{i} tok {c * 100:.2f}%" + (f" (decay {d:g})" if d else "")
                            for i, (c, d) in sorted(best.items())))


def choose_swap_schedule(trace: RoutingTrace, slots: Mapping[int, int], k: int,
                         norms: Mapping[int, np.ndarray], max_swaps: int, read_tokens: float,
                         usage: Mapping[int, np.ndarray] | None = None,
                         intervals=SWAP_INTERVALS, decays=SWAP_DECAYS) -> SwapSchedule:
    """swap's interval and decay with the best quality proxy on the trace: the real SwapPolicy
    replayed over it (replay.simulate_swap, reads taking read_tokens decode steps each, so a
    short interval pays for the reads still in flight: their victims are already unroutable),
    scored by the share of the unmasked top-k's router probability that falls on routable
    experts (SwapReplay.coverage; it needs no model run). Intervals longer than a quarter of the
    trace are not tried (too few windows to judge). Within COVERAGE_TIE of the best, the
    longest interval wins (fewer reads), then the smallest decay."""
    usable = [i for i in intervals if i <= max(1, trace.n_tokens // 4)] or [min(intervals)]
    tried = {(i, float(d)): simulate_swap(trace, slots, k, norms, i, max_swaps, read_tokens,
                                          decay=float(d), usage=usage)
             for i in usable for d in decays}
    top = max(r.coverage for r in tried.values())
    interval, decay = min((key for key, r in tried.items() if r.coverage >= top - COVERAGE_TIE),
                          key=lambda key: (-key[0], key[1]))
    return SwapSchedule(interval, decay, tried[(interval, decay)], tried)


def predict_swap(trace: RoutingTrace, slots: Mapping[int, int], k: int, profile: Profile,
                 expert_bytes: Mapping[int, int], norms: Mapping[int, np.ndarray],
                 max_swaps: int | None = None, interval: int | None = None,
                 decay: float = 0.0,
                 usage: Mapping[int, np.ndarray] | None = None) -> Prediction:
    """swap's prediction; interval None: the schedule (interval and decay) choose_swap_schedule
    picks, with reads timed by the profile."""
    max_swaps = len(trace.layers) if max_swaps is None else max_swaps   # SwapPolicy's default
    seconds = _masked_seconds(profile, trace.layers, k)
    mean_bytes = float(np.mean(list(expert_bytes.values())))
    read_tokens = profile.read_seconds(int(mean_bytes)) / seconds
    notes = ()
    if interval is None:
        schedule = choose_swap_schedule(trace, slots, k, norms, max_swaps, read_tokens, usage)
        interval, decay, replay = schedule.interval, schedule.decay, schedule.replay
        notes = (schedule.line(),)
    else:
        replay = simulate_swap(trace, slots, k, norms, interval, max_swaps, read_tokens,
                               decay=decay, usage=usage)
    per_tok = replay.swaps / trace.n_tokens
    pred = _masked("swap", trace, slots, k, profile, replay.hits, replay.wanted,
                   bytes_read_per_token=per_tok * mean_bytes, swap_interval=interval,
                   swap_decay=decay, coverage=replay.coverage, swaps_per_token=per_tok)
    return dataclasses.replace(pred, seconds_per_token=profile.paced(
        pred.seconds_per_token, pred.bytes_read_per_token), schedule_notes=notes)


def predict_ondemand(trace: RoutingTrace, slots: Mapping[int, int], k: int, profile: Profile,
                     expert_bytes: Mapping[int, int], n_prefetch: int = 1,
                     sensitivity: Mapping[int, float] | None = None,
                     threshold: float | None = None, prompt_tokens: int = 0,
                     decode_tokens: int | None = None) -> Prediction:
    """The decode of a run that reads the trace's first prompt_tokens as its prompt (from an
    empty cache) and decodes the next decode_tokens (default: the rest of the trace): the
    replay counts and times every read decode makes, the filling of slots the prompt left free
    included (a short run pays for much of its cache; a long one for its steady state)."""
    layers = trace.layers
    start = min(max(0, prompt_tokens), trace.n_tokens - 1)
    end = trace.n_tokens if decode_tokens is None else min(trace.n_tokens, start + decode_tokens)
    window = range(start, end)
    bytes_total = 0.0
    hits = wanted = issued = used = 0
    reads, runs = {}, {}
    for l in layers:
        s_l = sensitivity[l] if threshold is not None else None
        ids = trace.wanted(l, k, s_l, threshold)
        predicted = trace.predicted_ids(l, k) if n_prefetch else None
        reads[l] = []
        simulate_layer(ids, slots[l], predicted, n_prefetch, reads[l])
        runs[l] = (np.asarray(ids) >= 0).sum(axis=1)
        for pre, dem, need, u in (reads[l][t] for t in window):
            bytes_total += (len(pre) + len(dem)) * expert_bytes[l]
            hits, wanted = hits + len(need) - len(dem), wanted + len(need)
            issued, used = issued + len(pre), used + u
    seconds, stall = ondemand_timeline(profile, layers, reads, runs, expert_bytes, window)
    notes = (() if prompt_tokens == 0 and decode_tokens is None else
             (f"{len(window)} tokens decoded after a {start}-token prompt",))
    return Prediction(policy="ondemand", slots=dict(slots), seconds_per_token=seconds,
                      stall_per_token=stall, hit_rate=hits / wanted,
                      experts_per_token=float(np.mean([r[window].mean() for r in runs.values()])),
                      bytes_read_per_token=bytes_total / len(window),
                      prefetch_accuracy=used / issued if issued else None,
                      n_prefetch=n_prefetch, notes=notes)


def allocate_for(policy: str, trace: RoutingTrace, k: int, expert_bytes: Mapping[int, int],
                 allowance: int, n_prefetch: int = 1,
                 sensitivity: Mapping[int, float] | None = None,
                 threshold: float | None = None) -> dict[int, int]:
    """Per-layer slots for a policy: the DP over the trace's per-layer curves. ondemand minimises
    demand loads per token (AdapMoE); the masked policies minimise wanted experts that are not
    in each layer's most-used set of that size (what static keeps, and what swap approaches
    when the routing does not drift)."""
    if policy == "ondemand":
        cost = loads_table(trace, k, n_prefetch, sensitivity, threshold)
    else:
        cost = {}
        for l in trace.layers:
            ids = trace.wanted(l, k)
            counts = np.sort(np.bincount(ids.ravel(), minlength=trace.n_expert))[::-1]
            covered = np.concatenate([[0], np.cumsum(counts)])       # (n_expert + 1,)
            cost[l] = (ids.size - covered) / trace.n_tokens
            cost[l][:k] = np.inf
    return allocate_slots(cost, expert_bytes, allowance, k)


def predict(policy: str, trace: RoutingTrace, slots: Mapping[int, int], k: int,
            profile: Profile, expert_bytes: Mapping[int, int],
            norms: Mapping[int, np.ndarray] | None = None, **options) -> Prediction:
    """One entry point for `edgemoe plan`: the prediction of `policy` with these slots."""
    if policy == "full":
        return predict_full(trace, k, profile)
    if policy == "static":
        return predict_static(trace, slots, k, profile, **options)
    if policy == "swap":
        if norms is None:
            raise ValueError("swap prediction needs the experts' norms ||E_i||")
        return predict_swap(trace, slots, k, profile, expert_bytes, norms, **options)
    if policy == "ondemand":
        return predict_ondemand(trace, slots, k, profile, expert_bytes, **options)
    raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")


TIER_TOLERANCE = 0.01   # served shares of the top-k router weight this close count as equal


@dataclass(frozen=True)
class TierCandidate:
    """One split of ondemand's expert bytes: `count` substitutes in every layer, the full
    slots the DP gives the rest, the replay of the real policy over the trace, and its time per
    token by the planner's speed model."""
    count: int
    slots: Mapping[int, int]
    replay: TierReplay
    seconds_per_token: float
    stall_per_token: float

    @property
    def tok_per_s(self) -> float:
        return 1.0 / self.seconds_per_token

    def text(self) -> str:
        r = self.replay
        return (f"{self.count}: {self.tok_per_s:.2f} tok/s, waits {r.waits / r.tokens:.2f}/tok, "
                f"served {r.served_share * 100:.1f}% (full {r.full_share * 100:.1f}%, "
                f"substitutes {r.substitute_share * 100:.1f}%, dropped "
                f"{r.dropped_share * 100:.1f}%)")


@dataclass(frozen=True)
class TierSplit:
    """The substitutes per layer the planner chose for ondemand at one --quality, the full
    slots beside them, and every candidate it weighed (`edgemoe plan` prints them)."""
    quality: str
    substitutes: Mapping[int, int] | None   # None: no substitute tier
    slots: Mapping[int, int]
    chosen: TierCandidate
    tried: tuple[TierCandidate, ...]

    def line(self) -> str:
        count = self.chosen.count
        return (f"ondemand --quality {self.quality}: {count} substitute{'s' * (count != 1)} "
                f"per layer, full slots {' '.join(str(self.slots[l]) for l in sorted(self.slots))}"
                f" (tried " + "; ".join(c.text() for c in self.tried) + ")")


def nominal_profile(expert_bytes: Mapping[int, int]) -> Profile:
    """A speed model with nothing measured, for choosing a split without a plan: a read of a
    mean-sized expert takes as long as a token's compute (whose parts are not separated)."""
    mean = float(np.mean(list(expert_bytes.values())))
    layers = list(expert_bytes)
    return Profile(read_bytes_per_s=mean, read_latency_s=0.0,
                   layer_seconds={l: 0.0 for l in layers},
                   expert_seconds={l: 0.0 for l in layers}, other_seconds=1.0)


def tier_counts(n_expert: int, most: int, rule: int | None) -> list[int]:
    """The substitutes per layer the planner tries: every count up to `most` (what fits beside
    top-k full slots) when there are at most 8, else 0, n/4, n/2, 3n/4, n and the fixed rule's
    count (budget.substitute_split), those that fit."""
    if most <= 8:
        return list(range(most + 1))
    counts = {0, most, *(round(q * n_expert) for q in (0.25, 0.5, 0.75, 1.0))}
    if rule is not None:
        counts.add(rule)
    return sorted(c for c in counts if c <= most)


def choose_tier_split(trace: RoutingTrace, needs: MemoryNeeds, allowance: int,
                      substitute_bytes: Mapping[int, int], profile: Profile, quality: str,
                      sensitivity: Mapping[int, float] | None,
                      wait_threshold: float | None, n_prefetch: int = 1,
                      usage: Mapping[int, np.ndarray] | None = None,
                      tolerance: float = TIER_TOLERANCE) -> TierSplit:
    """ondemand's split of the expert allowance between substitutes and full slots at one
    --quality (its wait_threshold; substitutes run below an infinite substitute threshold, as
    balanced and fast do): for each count of tier_counts, the full slots are the DP's for the
    bytes left (allocate_for), and the real policy is replayed over the trace with them
    (replay.simulate_tiers; substitutes of the most used experts first, as the runtime loads
    them). Time per token: compute (layers and the experts run, substitutes counted as
    experts) plus the waits' reads at the profile's read rate, paced by all the bytes read
    (waits and background reads) at the sustained rate. Chosen: the fastest candidate whose
    served share of the top-k router weight (full + substitute; a substitute's error is a
    low-bit type's, small beside a drop's) is within `tolerance` of the best; ties go to the
    larger full share, then the fewer substitutes."""
    k = needs.n_expert_used
    layers = sorted(needs.expert_bytes)
    floor = k * sum(needs.expert_bytes.values())
    per_round = sum(substitute_bytes[l] for l in layers)
    most = int(min(needs.n_expert, max(0, allowance - floor) // per_round))
    rule = substitute_split(allowance, needs, substitute_bytes)
    order = ({l: np.argsort(-np.asarray(usage[l]), kind="stable") for l in layers}
             if usage is not None else None)
    mean_bytes = float(np.mean([needs.expert_bytes[l] for l in layers]))
    tried = []
    for count in tier_counts(needs.n_expert, most, next(iter(rule[0].values())) if rule else None):
        full_bytes = allowance - count * per_round
        slots = allocate_for("ondemand", trace, k, needs.expert_bytes, full_bytes, n_prefetch)
        r = simulate_tiers(trace, slots, {l: count for l in layers}, k, sensitivity,
                           wait_threshold, n_prefetch=n_prefetch, substitute_order=order)
        steps = max(1, r.tokens)
        stall = r.waits / steps * profile.read_seconds(int(mean_bytes))
        runs = r.experts_run / (steps * len(layers))   # per (token, layer), substitutes too
        compute = profile.other_seconds + sum(profile.layer_seconds.get(l, 0.0)
                                              + runs * profile.expert_seconds.get(l, 0.0)
                                              for l in layers)
        read = (r.waits + r.background_reads) / steps * mean_bytes
        seconds = profile.paced(compute + stall, read)
        tried.append(TierCandidate(count, slots, r, seconds, stall))
    best = max(c.replay.served_share for c in tried)
    chosen = min((c for c in tried if c.replay.served_share >= best - tolerance),
                 key=lambda c: (c.seconds_per_token, -c.replay.full_share, c.count))
    subs = {l: chosen.count for l in layers} if chosen.count else None
    return TierSplit(quality, subs, dict(chosen.slots), chosen, tuple(tried))


PREFETCH_CHOICES = (0, 1, 2)


def plan(budget: Budget, needs: MemoryNeeds, trace: RoutingTrace, profile: Profile,
         norms: Mapping[int, np.ndarray] | None = None, n_prefetch: int | None = None,
         sensitivity: Mapping[int, float] | None = None,
         threshold: float | None = None,
         usage: Mapping[int, np.ndarray] | None = None, prompt_tokens: int = 32,
         decode_tokens: int | None = 256,
         substitute_bytes: Mapping[int, int] | None = None,
         wait_thresholds: Mapping[str, float] | None = None
         ) -> tuple[list[Prediction], list[str]]:
    """`edgemoe plan`: will it fit, how, how fast. Returns the predictions of every policy that
    can run under the budget (each with its own DP allocation) and the report's lines.
    n_prefetch None: ondemand's prefetch depth is the fastest of PREFETCH_CHOICES here (on
    storage whose bandwidth is the bottleneck a wasted prefetch costs more than a used one
    saves). ondemand is predicted for a run that decodes decode_tokens after a prompt of
    prompt_tokens, both taken from the trace (see predict_ondemand). With substitute_bytes
    (a shard set with a substitute tier) and wait_thresholds ({quality: ondemand's wait
    threshold}), ondemand's prediction carries the split of its bytes between substitutes and
    full slots chosen for each quality (choose_tier_split, at its chosen prefetch depth).
    Raises BudgetError (stating the minimum) when nothing can run."""
    allowance = expert_allowance(budget, needs)
    k = needs.n_expert_used
    fits_all = allowance >= needs.expert_bytes_total
    lines = [f"budget {budget}: {format_bytes(allowance)} for expert slots of "
             f"{format_bytes(needs.expert_bytes_total)} "
             f"({allowance / needs.expert_bytes_total * 100:.0f}%); fixed "
             f"{format_bytes(needs.fixed_bytes)} (runtime {format_bytes(needs.runtime_bytes)}, "
             f"base {format_bytes(needs.base_bytes)}, KV "
             f"{format_bytes(needs.kv_bytes)}, {compute_text(needs)}, "
             f"reads {format_bytes(needs.io_bytes)})"]
    preds = []
    if fits_all:
        preds.append(predict_full(trace, k, profile))
    else:
        lines.append("full      does not fit: every expert needs "
                     f"{format_bytes(needs.fixed_bytes + needs.expert_bytes_total)}")
    gating = dict(sensitivity=sensitivity, threshold=threshold)
    for policy in ("static", "swap", "ondemand"):
        if policy == "swap" and norms is None:
            lines.append("swap      needs expert norms (run `edgemoe calibrate`)")
            continue
        if policy != "ondemand":
            slots = allocate_for(policy, trace, k, needs.expert_bytes, allowance)
            extra = dict(usage=usage) if policy == "swap" else {}
            preds.append(predict(policy, trace, slots, k, profile, needs.expert_bytes, norms,
                                 **extra))
            continue
        tried = []
        for depth in PREFETCH_CHOICES if n_prefetch is None else (n_prefetch,):
            slots = allocate_for(policy, trace, k, needs.expert_bytes, allowance, depth, **gating)
            tried.append(predict_ondemand(trace, slots, k, profile, needs.expert_bytes, depth,
                                          prompt_tokens=prompt_tokens,
                                          decode_tokens=decode_tokens, **gating))
        best = max(tried, key=lambda p: p.tok_per_s)
        if len(tried) > 1:
            best = dataclasses.replace(best, notes=best.notes + (
                "prefetch depth " + ", ".join(f"{p.n_prefetch}: {p.tok_per_s:.2f}"
                                              for p in tried) + " tok/s",))
        if substitute_bytes and wait_thresholds and sensitivity is not None:
            best = dataclasses.replace(best, tiers=tuple(
                choose_tier_split(trace, needs, allowance, substitute_bytes, profile, quality,
                                  sensitivity, threshold_q, best.n_prefetch or 0, usage)
                for quality, threshold_q in wait_thresholds.items()))
        preds.append(best)
    for p in preds:
        lines.append(p.line())
        lines.append(f"          slots per layer: {' '.join(str(p.slots[l]) for l in sorted(p.slots))}")
        lines.extend(f"          {note}" for note in p.schedule_notes)
        lines.extend(f"          {split.line()}" for split in p.tiers)
    return preds, lines
