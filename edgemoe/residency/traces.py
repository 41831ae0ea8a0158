"""Routing traces: what a model's routers did on some text, the input of the planner, the slot
DP and the sensitivity-free statistics. The engine records them during calibration; the
synthetic generator here builds traces with known structure for tests and planner checks.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from edgemoe.residency.routing import adaptive_gate, softmax, topk
from edgemoe.shardset import write_atomic


@dataclass(frozen=True)
class RoutingTrace:
    """Per expert layer, over the same n_tokens decode steps:
    probs[l]     (n_tokens, n_expert) unmasked router probabilities
    x_norm[l]    (n_tokens,) norm of the hidden state entering the experts
    predicted[l] (n_tokens, n_expert) layer l's router applied to layer l-1's hidden state (the
                 prefetch predictor); absent for the first expert layer and when not recorded."""
    probs: Mapping[int, np.ndarray]
    x_norm: Mapping[int, np.ndarray]
    predicted: Mapping[int, np.ndarray]

    @property
    def layers(self) -> list[int]:
        return sorted(self.probs)

    @property
    def n_tokens(self) -> int:
        return next(iter(self.probs.values())).shape[0]

    @property
    def n_expert(self) -> int:
        return next(iter(self.probs.values())).shape[1]

    def wanted(self, layer: int, k: int, sensitivity: float | None = None,
               threshold: float | None = None) -> np.ndarray:
        """(n_tokens, k) experts each token runs, -1 where adaptive gating drops one. Weights are
        the renormalised top-k, which is what the gating rule compares."""
        ids, w = topk(self.probs[layer], k, renormalize=True)
        if threshold is not None:
            ids, _ = adaptive_gate(ids, w, sensitivity, threshold)
        return ids

    def predicted_ids(self, layer: int, k: int) -> np.ndarray | None:
        if layer not in self.predicted:
            return None
        return topk(self.predicted[layer], k)[0]

    def save(self, path: str | Path) -> None:
        arrays = {}
        for name, table in (("probs", self.probs), ("x_norm", self.x_norm),
                            ("predicted", self.predicted)):
            for layer, a in table.items():
                arrays[f"{name}.{layer}"] = a
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        write_atomic(Path(path), buf.getvalue())   # never a half-written trace beside the shards

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        tables: dict[str, dict[int, np.ndarray]] = {"probs": {}, "x_norm": {}, "predicted": {}}
        with np.load(path) as z:
            for key in z.files:
                name, layer = key.rsplit(".", 1)
                tables[name][int(layer)] = z[key]
        return cls(**tables)


class TraceRecorder:
    """Collects a RoutingTrace step by step while the engine decodes calibration text."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[int, list[np.ndarray]]] = {"probs": {}, "x_norm": {},
                                                              "predicted": {}}

    def add(self, layer: int, probs: np.ndarray, x_norm: np.ndarray,
            predicted: np.ndarray | None = None) -> None:
        """One step of one layer: probs (n_tokens, n_expert), x_norm (n_tokens,), predicted
        (n_tokens, n_expert) or None for a layer without a predictor."""
        for name, a in (("probs", probs), ("x_norm", x_norm), ("predicted", predicted)):
            if a is not None:
                self._rows[name].setdefault(layer, []).append(np.asarray(a, dtype=np.float32))

    def trace(self) -> RoutingTrace:
        return RoutingTrace(**{name: {l: np.concatenate(rows) for l, rows in table.items()}
                               for name, table in self._rows.items()})


def topic_trace(n_layer: int, n_expert: int, n_tokens: int, n_topics: int = 2,
                switch_every: int | None = None, sharpness: float | Mapping[int, float] = 3.0,
                predictor_noise: float = 0.5, seed: int = 0) -> RoutingTrace:
    """A trace whose routing follows a topic that changes every `switch_every` tokens (default:
    once, in the middle). Each (topic, layer) favours its own experts: logits are
    sharpness_l * bias[topic, l] + N(0, 1) noise per token, so a higher sharpness concentrates a
    layer on fewer experts. The predictor sees the same logits plus N(0, predictor_noise)."""
    rng = np.random.default_rng(seed)
    switch_every = switch_every or max(1, n_tokens // 2)
    topic = (np.arange(n_tokens) // switch_every) % n_topics                 # (n_tokens,)
    bias = rng.standard_normal((n_topics, n_layer, n_expert))
    probs, x_norm, predicted = {}, {}, {}
    for l in range(n_layer):
        sharp = sharpness[l] if isinstance(sharpness, Mapping) else sharpness
        logits = sharp * bias[topic, l] + rng.standard_normal((n_tokens, n_expert))
        probs[l] = softmax(logits)                        # (n_tokens, n_expert)
        x_norm[l] = rng.lognormal(0.0, 0.25, n_tokens).astype(np.float32)      # (n_tokens,)
        if l > 0:
            noisy = logits + predictor_noise * rng.standard_normal(logits.shape)
            predicted[l] = noisy.astype(np.float32)
    return RoutingTrace(probs, x_norm, predicted)
