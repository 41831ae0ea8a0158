"""SwapMoE's expert importance (their Eq. 1) and the swap plan it drives.

importance(E_i) = sum over tokens x that the *unmasked* router sends to E_i of
                  ||x|| * g_i(x) * ||E_i||
where g_i(x) is the router's probability for E_i and ||E_i|| a per-expert weight-magnitude
constant (here the Frobenius norm of the dequantized gate, up and down matrices together).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from edgemoe.residency.routing import topk

EXPERT_PROJECTIONS = ("ffn_gate", "ffn_up", "ffn_down")


def expert_norm(matrices: Iterable[np.ndarray]) -> float:
    """||E_i||: the Frobenius norm of an expert's weight matrices taken together,
    sqrt(||W_gate||_F^2 + ||W_up||_F^2 + ||W_down||_F^2)."""
    total = 0.0
    for m in matrices:
        m = np.asarray(m, dtype=np.float64)
        total += float(np.dot(m.ravel(), m.ravel()))
    return float(np.sqrt(total))


def expert_norm_from_shard(shard, read=None) -> float:
    """||E_i|| of one expert shard (an edgemoe.shardset.ExpertShard), dequantized by ggml.

    Reads the expert's data run with the manifest's offsets (no GGUF parsing) through
    `read(path, offset, nbytes) -> uint8 array` (default: a plain read; the runtime passes
    edgemoe.pool.read_span, which reads with O_DIRECT and leaves no page cache), then
    dequantizes a block of rows at a time, so memory stays near one expert's bytes. Done once
    per expert and cached beside the shard set by the caller."""
    from edgemoe import quant

    if read is None:
        with open(shard.path, "rb") as f:
            f.seek(shard.data_offset)
            data = np.frombuffer(f.read(shard.data_bytes), dtype=np.uint8)
    else:
        data = read(shard.path, shard.data_offset, shard.data_bytes)
    total = 0.0
    for proj in EXPERT_PROJECTIONS:
        info = shard.tensors[proj]
        start = info.offset - shard.data_offset
        rows = int(np.prod(info.ne[1:]))
        # dequantize wants the byte shape: one row of ne[0] elements per line.
        raw = data[start:start + info.nbytes].reshape(rows, -1)
        for r in range(0, rows, _NORM_ROWS):
            part = raw[r:r + _NORM_ROWS]
            block = quant.dequantize(part, info.type, (part.shape[0], int(info.ne[0])))
            block = block.astype(np.float64).ravel()
            total += float(np.dot(block, block))
    return float(np.sqrt(total))


_NORM_ROWS = 256   # rows dequantized at a time by expert_norm_from_shard


class ImportanceTracker:
    """Eq. 1 accumulated per layer over an update window. With decay d, a window's importance
    is d * previous + this window's sum (d = 0: the window alone, as in SwapMoE)."""

    def __init__(self, norms: Mapping[int, np.ndarray], k: int, decay: float = 0.0):
        self.norms = {layer: np.asarray(n, dtype=np.float64) for layer, n in norms.items()}
        self.k = k
        self.decay = decay
        self.current = {layer: np.zeros_like(n) for layer, n in self.norms.items()}
        self.previous = {layer: np.zeros_like(n) for layer, n in self.norms.items()}

    def observe(self, layer: int, probs: np.ndarray, x_norm: np.ndarray) -> np.ndarray:
        """probs (n_tokens, n_expert) unmasked, x_norm (n_tokens,). Returns the unmasked top-k ids
        (n_tokens, k) so callers can count what the router wanted."""
        ids, g = topk(probs, self.k)                                 # (n_tokens, k) each
        contrib = np.asarray(x_norm, dtype=np.float64)[:, None] * g * self.norms[layer][ids]
        cur = self.current[layer]
        cur += np.bincount(ids.ravel(), weights=contrib.ravel(), minlength=cur.shape[0])
        return ids

    def close_window(self) -> dict[int, np.ndarray]:
        """End an update window: returns each layer's importance and starts the next window."""
        out = {}
        for layer, cur in self.current.items():
            out[layer] = self.decay * self.previous[layer] + cur
            self.previous[layer] = out[layer]
            self.current[layer] = np.zeros_like(cur)
        return out


@dataclass(frozen=True)
class Swap:
    layer: int
    victim: int | None   # None: the candidate fills a free slot
    candidate: int


def plan_swaps(importance: Mapping[int, np.ndarray], routable: Mapping[int, set[int]],
               busy: Mapping[int, set[int]], free_slots: Mapping[int, int], k: int,
               max_swaps: int, margin: float = 0.0) -> list[Swap]:
    """Which swaps to start after an update window, at most max_swaps of them.

    Per layer, the most important non-resident experts are paired with the least important
    resident ones, best against worst, while the candidate beats the victim by the relative
    margin; free slots are filled first. Layers compete on gain divided by the layer's total
    importance (Eq. 1 sums are not comparable across layers: hidden-state norms differ). A victim
    is only taken while at least k experts stay routable. `busy` experts (in flight, or whose
    shard failed) are neither candidates nor victims."""
    options: list[tuple[float, Swap]] = []
    for layer, imp in importance.items():
        total = float(imp.sum())
        if total <= 0.0:
            continue
        res = routable[layer]
        outside = [e for e in np.argsort(-imp, kind="stable")
                   if int(e) not in res and int(e) not in busy[layer] and imp[e] > 0]
        inside = sorted(res - busy[layer], key=lambda e: (imp[e], e))
        n_free = free_slots[layer]
        may_retire = len(res) - k
        for cand in outside:
            cand = int(cand)
            if n_free > 0:
                n_free -= 1
                options.append((float(imp[cand]) / total, Swap(layer, None, cand)))
                continue
            if may_retire <= 0 or not inside:
                break
            victim = inside[0]
            if imp[cand] <= imp[victim] * (1.0 + margin):
                break
            inside.pop(0)
            may_retire -= 1
            options.append((float(imp[cand] - imp[victim]) / total, Swap(layer, victim, cand)))
    options.sort(key=lambda o: -o[0])
    return [s for _, s in options[:max_swaps]]
