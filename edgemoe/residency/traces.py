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

from edgemoe.errors import EdgeMoeError
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


# -- locality of a routing: what caches meet ----------------------------------------------------

def reuse_distances(ids: np.ndarray) -> np.ndarray:
    """(n_tokens, k) for one layer's selections (expert ids, -1 = none): how many tokens back
    each chosen expert was last chosen (1 = by the previous token), 0 where never before or
    where the id is -1."""
    ids = np.asarray(ids)
    last = np.full(int(ids.max()) + 1 if ids.size else 1, -1, dtype=np.int64)
    out = np.zeros(ids.shape, dtype=np.int64)
    for t, row in enumerate(ids):
        valid = row >= 0
        seen = last[row[valid]]
        out[t, valid] = np.where(seen >= 0, t - seen, 0)
        last[row[valid]] = t
    return out


def lru_stack_distances(ids: np.ndarray) -> np.ndarray:
    """(n_tokens, k): each access's LRU stack distance in one layer (distinct experts used
    since that expert's last use; -1 for a first use or an id of -1). A per-layer LRU cache of
    C experts hits exactly the accesses with 0 <= distance < C."""
    stack: list[int] = []
    ids = np.asarray(ids)
    out = np.full(ids.shape, -1, dtype=np.int64)
    for t, row in enumerate(ids):
        for j, e in enumerate(row):
            e = int(e)
            if e < 0:
                continue
            try:
                d = stack.index(e)
            except ValueError:
                d = -1
            else:
                del stack[d]
            out[t, j] = d
            stack.insert(0, e)
    return out


@dataclass(frozen=True)
class Locality:
    """Figures of a routing over (layer, token) selections, averaged over layers."""
    n_tokens: int
    n_expert: int
    k: int
    reuse: dict[int, float]            # window -> share of experts chosen within `window` tokens
    lru_hit: dict[float, float]        # fraction of n_expert per layer -> hit rate after warm-up
    touched: dict[int, float]          # n tokens -> distinct experts of a layer in its first n
    warmup: int

    def to_dict(self) -> dict:
        return {"n_tokens": self.n_tokens, "n_expert": self.n_expert, "k": self.k,
                "warmup": self.warmup, "reuse": {str(k): v for k, v in self.reuse.items()},
                "lru_hit": {str(k): v for k, v in self.lru_hit.items()},
                "touched": {str(k): v for k, v in self.touched.items()}}


def locality(selections: Mapping[int, np.ndarray], n_expert: int,
             windows=(1, 4, 8), fractions=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6), warmup: int = 64,
             touched_after=(128,), segments: int | None = None) -> Locality:
    """Reuse within 1/4/8 tokens (counted from the window-th token on), per-layer LRU hit rates
    with `fractions` of the experts resident (counted after `warmup` tokens) and experts touched
    in the first n tokens, of per-layer selections (n_tokens, k). `segments`: the token stream is
    that many independent runs of equal length (e.g. perplexity windows; each starts cold)."""
    reuse = {w: [] for w in windows}
    hits = {f: [] for f in fractions}
    touched = {n: [] for n in touched_after}
    n_tok = k = 0
    for ids in selections.values():
        ids = np.asarray(ids)
        n_tok, k = ids.shape
        parts = np.split(ids, segments) if segments else [ids]
        dist = [reuse_distances(p) for p in parts]
        stack = [lru_stack_distances(p) for p in parts]
        for w in windows:
            num = sum(((d[w:] > 0) & (d[w:] <= w)).sum() for d in dist)
            den = sum((p[w:] >= 0).sum() for p in parts)
            reuse[w].append(num / den if den else float("nan"))
        for f in fractions:
            cap = max(k, int(round(f * n_expert)))
            num = sum(((s[warmup:] >= 0) & (s[warmup:] < cap)).sum() for s in stack)
            den = sum((p[warmup:] >= 0).sum() for p in parts)
            hits[f].append(num / den if den else float("nan"))
        for n in touched_after:
            touched[n].append(np.mean([len(np.unique(p[:n][p[:n] >= 0])) for p in parts]))
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    return Locality(n_tokens=n_tok, n_expert=n_expert, k=k,
                    reuse={w: mean(v) for w, v in reuse.items()},
                    lru_hit={f: mean(v) for f, v in hits.items()},
                    touched={n: mean(v) for n, v in touched.items()}, warmup=warmup)


# -- selections: the replayable record of what ran ----------------------------------------------

@dataclass(frozen=True)
class SelectionTrace:
    """What a model's routers chose, token by token: per expert layer, `ids` (n_tokens, k) int32
    expert ids (-1: none) and `weights` (n_tokens, k) float32 gate weights, in the order the
    tokens were evaluated. Stored as .npz with members `ids.{layer}` and `weights.{layer}`;
    any recorded trace converted to this layout can drive a benchmark (`Replay`)."""
    ids: Mapping[int, np.ndarray]
    weights: Mapping[int, np.ndarray]

    @property
    def n_tokens(self) -> int:
        return next(iter(self.ids.values())).shape[0]

    def save(self, path: str | Path) -> None:
        arrays = {f"ids.{l}": np.asarray(a, dtype=np.int32) for l, a in self.ids.items()}
        arrays.update({f"weights.{l}": np.asarray(a, dtype=np.float32)
                       for l, a in self.weights.items()})
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "SelectionTrace":
        ids, weights = {}, {}
        with np.load(path) as z:
            for key in z.files:
                name, layer = key.rsplit(".", 1)
                {"ids": ids, "weights": weights}[name][int(layer)] = z[key]
        if set(ids) != set(weights) or not ids:
            raise ValueError(f"{path}: a selection trace needs ids.L and weights.L for the same "
                             "layers")
        for l in ids:
            if ids[l].shape != weights[l].shape or ids[l].ndim != 2:
                raise ValueError(f"{path}: layer {l}: ids {ids[l].shape} and weights "
                                 f"{weights[l].shape} must be the same (n_tokens, k)")
        return cls(ids, weights)


# -- replay: a recorded routing forced into a run -----------------------------------------------

class ReplayPolicy:
    """A recorded routing (SelectionTrace) forced into an
    exact-routing run, so that a benchmark meets that routing whatever the weights would choose.

        engine, _ = open_engine(shards, ResidencyConfig(memory_budget="8GiB", policy="ondemand"))
        engine.policy = ReplayPolicy(engine.policy, SelectionTrace.load("trace.npz"))

    Each step, the router's top-k of every expert layer is replaced by the trace's ids and gate
    weights for the tokens being evaluated (row i of the trace for the i-th token evaluated since
    the replay started, wrapping around at the trace's end); the wrapped policy then gates, loads
    and counts as usual. Only exact routing can be replayed: masked policies choose among resident
    experts by design, so forcing their choice would be a different policy.
    """

    def __init__(self, inner, trace, n_expert: int | None = None):
        if inner.masked:
            raise EdgeMoeError(f"routing replay needs an exact-routing policy (ondemand), not "
                               f"{inner.name!r}: masked policies choose among resident experts")
        self.inner = inner
        self.trace = trace
        self.pos = 0
        layers = set(getattr(inner, "layers", trace.ids))
        missing = sorted(layers - set(trace.ids))
        if missing:
            raise EdgeMoeError(f"the routing trace has no selections for layer {missing[0]} "
                               f"(it has layers {sorted(trace.ids)})")
        n_expert = n_expert or getattr(inner, "n_expert", None)
        k = getattr(inner, "k", None)
        for layer in layers:
            ids = trace.ids[layer]
            if k is not None and ids.shape[1] != k:
                raise EdgeMoeError(f"the routing trace chooses {ids.shape[1]} experts per token "
                                   f"in layer {layer}; the model chooses {k}")
            if n_expert is not None and ids.max() >= n_expert:
                raise EdgeMoeError(f"the routing trace names expert {int(ids.max())} in layer "
                                   f"{layer}; the model has {n_expert}")

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def gate(self, layer, ids, weights, decode):
        n = np.asarray(ids).shape[0]
        rows = (self.pos + np.arange(n)) % self.trace.n_tokens
        return self.inner.gate(layer, self.trace.ids[layer][rows],
                               self.trace.weights[layer][rows], decode)

    def end_step(self, n_tokens: int = 1) -> dict:
        self.pos += n_tokens
        return self.inner.end_step(n_tokens)
