"""The planner's Profile measured on this machine: cold expert reads from the shards' device
(planner.measure_reads) and compute times of the engine's graphs, taken through the engine's
observer hook while it decodes."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from edgemoe import ggml
from edgemoe.residency.observer import EngineObserver
from edgemoe.residency.planner import Profile, measure_reads
from edgemoe.residency.policies import OnDemandPolicy, StaticPolicy


class StepTimer(EngineObserver):
    """Exact routing, per decode step: each expert layer's time without its experts (attention,
    router, the host's gating: from the end of the previous layer's experts to the start of
    this layer's wait for experts), the time of its experts graph, and the rest of the step
    (the last layer's experts, dense tail, head). Waits for experts (reads) are never counted."""

    def __init__(self) -> None:
        self.layer: dict[int, list[float]] = {}
        self.experts: dict[int, list[float]] = {}
        self.other: list[float] = []
        self._events: list[tuple] = []

    def ensured(self, layer, start, end) -> None:
        self._events.append(("ensure", layer, start, end))

    def graph(self, kind, layer, start, end) -> None:
        if kind == "experts":
            self._events.append(("experts", layer, start, end))

    def step(self, n_tokens, start, end) -> None:
        events, self._events = self._events, []
        if n_tokens != 1:
            return   # the prompt: decode steps only
        prev, last_ensured = start, None
        for kind, layer, t0, t1 in events:
            if kind == "ensure":
                self.layer.setdefault(layer, []).append(t0 - prev)
                last_ensured = t1
            else:
                self.experts.setdefault(layer, []).append(t1 - t0)
            prev = t1
        if last_ensured is not None:
            self.other.append(end - last_ensured)


def measure_profile(shards, open_engine: Callable, n_decode: int = 64,
                    prompt: list[int] | None = None) -> Profile:
    """A planner Profile measured here: cold expert reads from the shards' device, per-layer
    compute from the split graphs exact routing runs (attention + router, one expert), the rest,
    and the per-token time of masked routing's single graph. open_engine(n_ctx=, n_batch=,
    n_slots=, policy=) opens an engine on `shards`; both runs use top-k + 1 slots per layer
    (little memory); only compute is timed, never a read."""
    bandwidth, latency, sustained, burst = measure_reads(shards)
    k, n_expert = shards.n_expert_used, shards.n_expert
    layers = list(shards.expert_layers)
    slots = {l: min(n_expert, k + 1) for l in layers}
    prompt = prompt or list(range(1, 9))
    kw = dict(n_ctx=len(prompt) + n_decode + 1, n_batch=len(prompt), n_slots=slots)

    def decode(engine) -> list[float]:
        logits = engine.eval(prompt, all_logits=False)
        seconds = []
        for _ in range(n_decode):
            token = int(np.argmax(logits[-1]))
            t0 = time.perf_counter()
            logits = engine.eval([token])
            seconds.append(time.perf_counter() - t0)
        return seconds

    timer = StepTimer()
    with open_engine(policy=lambda pool: OnDemandPolicy(pool, slots, n_expert, k, n_prefetch=0),
                     **kw) as engine:
        engine.add_observer(timer)
        decode(engine)
        copy = None if engine.backend.on_host else ggml.copy_bandwidth(engine.backend)
    # Means, not medians: decode speed is tokens over total time, and this machine's hiccups
    # (a shared host) are part of it.
    per_expert = {l: float(np.mean(v)) / k for l, v in timer.experts.items()}
    typical = float(np.median(list(per_expert.values()))) if per_expert else 0.0
    expert_seconds = {l: per_expert.get(l, typical) for l in layers}
    other_seconds = max(0.0, float(np.mean(timer.other)) - k * expert_seconds[layers[-1]])

    zeros = {l: np.zeros(n_expert) for l in layers}
    with open_engine(policy=lambda pool: StaticPolicy(pool, slots, n_expert, k, scores=zeros),
                     **kw) as engine:
        fused = float(np.mean(decode(engine)))
    return Profile(read_bytes_per_s=bandwidth, read_latency_s=latency,
                   layer_seconds={l: float(np.mean(timer.layer[l])) for l in layers},
                   expert_seconds=expert_seconds, other_seconds=other_seconds,
                   fused_seconds=fused, sustained_bytes_per_s=sustained, burst_bytes=burst,
                   copy_bytes_per_s=copy)
