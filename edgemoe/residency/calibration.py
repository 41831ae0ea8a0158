"""What calibration measures once per shard set and the policies read at start-up, kept in one
JSON file beside the shard set (`edgemoe calibrate` writes it):
- norms: ||E_i|| per layer and expert (swap's Eq. 1, static's "largest norm");
- usage: how often each expert was in the unmasked top-k on calibration text (static's "most used");
- sensitivity: s_l per layer for adaptive gating, and how it was estimated.
and how it is measured (`calibrate`): the model runs teacher-forced on calibration text with every
expert resident, watched through the engine's observer hook, and for the sensitivities a policy
drops one expert at one position (`DropOnePolicy`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from edgemoe.errors import ShardSetError
from edgemoe.residency.importance import expert_norm_from_shard
from edgemoe.residency.observer import EngineObserver
from edgemoe.residency.policies import OnDemandPolicy
from edgemoe.residency.routing import softmax, topk
from edgemoe.residency.sensitivity import fit_sensitivity
from edgemoe.residency.traces import RoutingTrace

FILE_NAME = "calibration.json"
FORMAT, VERSION = "edgemoe.calibration", 1


@dataclass(frozen=True)
class Calibration:
    norms: Mapping[int, np.ndarray]                 # layer -> (n_expert,)
    usage: Mapping[int, np.ndarray] | None = None   # layer -> (n_expert,) counts
    sensitivity: Mapping[int, float] | None = None  # layer -> s_l
    sensitivity_method: str | None = None           # "isolated", "one-pass" or "proxy"
    tokens: int = 0                                 # calibration tokens behind usage/sensitivity

    def save(self, shards_dir: str | Path) -> Path:
        doc = {"format": FORMAT, "version": VERSION, "tokens": self.tokens,
               "norms": {str(l): [float(v) for v in n] for l, n in self.norms.items()}}
        if self.usage is not None:
            doc["usage"] = {str(l): [int(v) for v in u] for l, u in self.usage.items()}
        if self.sensitivity is not None:
            doc["sensitivity"] = {str(l): float(s) for l, s in self.sensitivity.items()}
            doc["sensitivity_method"] = self.sensitivity_method
        path = Path(shards_dir) / FILE_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)   # never a half-written file beside the shards
        return path

    @classmethod
    def load(cls, shards_dir: str | Path) -> "Calibration":
        path = Path(shards_dir) / FILE_NAME
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ShardSetError(f"{path}: no calibration; run `edgemoe calibrate` first") from None
        except (OSError, ValueError) as exc:
            raise ShardSetError(f"{path}: unreadable calibration ({exc})") from None
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ShardSetError(f"{path}: expected format {FORMAT} version {VERSION}, got "
                                f"{doc.get('format')!r} version {doc.get('version')!r}")
        table = lambda key, dtype: ({int(l): np.asarray(v, dtype=dtype)
                                     for l, v in doc[key].items()} if key in doc else None)
        sens = doc.get("sensitivity")
        return cls(norms=table("norms", np.float64), usage=table("usage", np.int64),
                   sensitivity={int(l): float(s) for l, s in sens.items()} if sens else None,
                   sensitivity_method=doc.get("sensitivity_method"), tokens=doc.get("tokens", 0))


def compute_norms(shards, read=None) -> dict[int, np.ndarray]:
    """||E_i|| of every expert of a ShardSet (reads and dequantizes each shard once, through
    `read`: see expert_norm_from_shard)."""
    norms = {l: np.zeros(shards.n_expert) for l in shards.expert_layers}
    for shard in shards.experts():
        norms[shard.layer][shard.expert] = expert_norm_from_shard(shard, read)
    return norms


class RoutingRecorder(EngineObserver):
    """Records, step after step, what a routing trace holds: each expert layer's unmasked router
    probabilities and experts' input norms (masked routing), or the next layer's router applied
    to this layer's input (exact routing: the prefetch predictor)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[int, list[np.ndarray]]] = {
            "probs": {}, "x_norm": {}, "predicted": {}}

    def routed(self, layer, logits, x_norm, selected) -> None:
        self.rows["probs"].setdefault(layer, []).append(softmax(logits))
        self.rows["x_norm"].setdefault(layer, []).append(np.array(x_norm, dtype=np.float32))

    def predicted(self, layer, logits) -> None:
        self.rows["predicted"].setdefault(layer, []).append(np.array(logits, dtype=np.float32))

    def table(self, name: str) -> dict[int, np.ndarray]:
        return {l: np.concatenate(rows).astype(np.float32)
                for l, rows in self.rows[name].items() if rows}


class DropOnePolicy(OnDemandPolicy):
    """Every expert resident, exact routing; `drop = (layer, row)` drops that row's last-ranked
    expert in that layer at the next step (its weight given back to the others, as adaptive
    gating does), and `last_weight[layer]` keeps each row's last-ranked renormalised weight."""
    name = "drop-one"

    def __init__(self, pool, n_expert: int, n_expert_used: int, layers):
        super().__init__(pool, {l: n_expert for l in layers}, n_expert, n_expert_used,
                         n_prefetch=0)
        self.drop: tuple[int, int] | None = None
        self.last_weight: dict[int, np.ndarray] = {}

    def gate(self, layer, ids, weights, decode):
        weights = np.asarray(weights, dtype=np.float32)
        self.last_weight[layer] = weights[:, -1] / weights.sum(axis=1)
        if self.drop is not None and self.drop[0] == layer:
            row = self.drop[1]
            ids, weights = np.array(ids, dtype=np.int32), weights.copy()
            total = weights[row].sum()
            ids[row, -1], weights[row, -1] = -1, 0.0
            weights[row] *= total / weights[row].sum()
        return super().gate(layer, ids, weights, decode)


def calibrate(open_engine: Callable, shards, tokens: list[int], samples: int = 16,
              window: int = 16, seed: int = 0,
              n_ctx: int | None = None) -> tuple[Calibration, RoutingTrace]:
    """Norms, usage, sensitivities and the routing trace of `tokens`, with every expert
    resident. open_engine(policy=None | factory) opens an engine on the shard set (n_ctx at
    least len(tokens)). Two passes: the full policy with a RoutingRecorder gives each layer's
    router probabilities and the experts' input norms; exact routing (DropOnePolicy) gives the
    next layer's router on each layer's input, and hosts the drops of the isolated
    sensitivities (see _isolated_sensitivity). Both passes read the text in windows of n_ctx
    tokens (None: all of it), each from an empty context, as runs of that length see it: a
    model routes differently at positions it was not trained at, and the trace must show the
    routing the runs will meet."""
    norms = compute_norms(shards)
    layers = list(shards.expert_layers)
    k = shards.n_expert_used
    recorder = RoutingRecorder()
    with open_engine() as engine:
        engine.add_observer(recorder)
        _eval_windows(engine, tokens, n_ctx)
    policy: list[DropOnePolicy] = []

    def drop_one(pool):
        policy.append(DropOnePolicy(pool, shards.n_expert, k, layers))
        return policy[0]

    with open_engine(policy=drop_one) as engine:
        engine.add_observer(recorder)
        _eval_windows(engine, tokens, n_ctx)
        engine.remove_observer(recorder)
        sensitivity = None
        if k > 1 and samples > 0:
            sensitivity = _isolated_sensitivity(engine, policy[0], tokens, layers, samples,
                                                window, seed)
    trace = RoutingTrace(probs=recorder.table("probs"), x_norm=recorder.table("x_norm"),
                         predicted=recorder.table("predicted"))
    usage = {l: np.bincount(topk(trace.probs[l], k)[0].ravel(), minlength=shards.n_expert)
             for l in layers}
    cal = Calibration(norms=norms, usage=usage, sensitivity=sensitivity,
                      sensitivity_method="isolated" if sensitivity else None, tokens=len(tokens))
    return cal, trace


def _eval_windows(engine, tokens: list[int], n_ctx: int | None) -> None:
    """Evaluate `tokens` in windows of n_ctx (None: one window), each from an empty context,
    n_batch tokens per step."""
    n_ctx = n_ctx or len(tokens)
    for start in range(0, len(tokens), n_ctx):
        engine.reset()
        window = tokens[start:start + n_ctx]
        for b in range(0, len(window), engine.n_batch):
            engine.eval(window[b:b + engine.n_batch], all_logits=False)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row of two logit arrays, in nats."""
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def _isolated_sensitivity(engine, policy: DropOnePolicy, tokens, layers, samples, window, seed):
    """s_l per layer: at each sampled position r, drop layer l's last-ranked expert at r only
    and sum KL(full || dropped) over positions r .. r + window - 1 (attention carries the
    change on); fit against that expert's renormalised weight squared."""
    rng = np.random.default_rng(seed)
    window = max(1, min(window, len(tokens) // 2))
    positions = np.sort(rng.choice(np.arange(1, len(tokens) - window + 1),
                                   size=min(samples, len(tokens) - window), replace=False))
    w_last = {l: [] for l in layers}
    loss = {l: [] for l in layers}
    for r in positions.tolist():
        span = tokens[r:r + window]
        engine.reset()
        engine.eval(tokens[:r], all_logits=False)
        base = engine.eval(span)
        for l in layers:
            engine.truncate(r)
            policy.drop = (l, 0)
            try:
                dropped = engine.eval(span)
            finally:
                policy.drop = None
            w_last[l].append(float(policy.last_weight[l][0]))
            loss[l].append(float(kl_divergence(base, dropped).sum()))
    return {l: fit_sensitivity(np.array(w_last[l]), np.array(loss[l])) for l in layers}
