"""What an engine shows of every step to those who watch it (Engine.add_observer): calibration
records routing from it, the profiler times from it. An observer never changes what runs; a
change of what runs is a policy's (edgemoe.residency.policies)."""
from __future__ import annotations

import numpy as np


class EngineObserver:
    """Override what you need; every hook does nothing by default. Times are
    time.perf_counter() seconds. Arrays are the engine's; copy what you keep."""

    def routed(self, layer: int, logits: np.ndarray, x_norm: np.ndarray,
               selected: np.ndarray) -> None:
        """Masked routing, after each step: layer's unmasked router logits (n_tokens, n_expert),
        the norms of the experts' input (n_tokens,), the experts masked gating chose (n_tokens,
        k)."""

    def predicted(self, layer: int, logits: np.ndarray) -> None:
        """Exact routing: `layer`'s router applied to the previous expert layer's input
        (n_tokens, n_expert), the prefetch prediction, before the policy sees it."""

    def ensured(self, layer: int, start: float, end: float) -> None:
        """Exact routing: the policy made `layer`'s experts resident (waiting on reads)."""

    def graph(self, kind: str, layer: int | None, start: float, end: float) -> None:
        """A graph ran: "forward" (masked routing, the whole step), or "attention" (layer's
        attention and router), "experts" (layer's experts) and "output" under exact routing."""

    def step(self, n_tokens: int, start: float, end: float) -> None:
        """A step of n_tokens ended (the policy's end_step included)."""
