"""Expert selection in numpy: plain top-k, masked top-k (SwapMoE's masked gating) and AdapMoE's
adaptive gating. The engine does the same inside its ggml graph; these are the reference the
policies, the planner's simulations and the tests use.
"""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Router logits (n_tokens, n_expert) -> probabilities, over all experts (unmasked): what
    observe() and the importance of Eq. 1 take."""
    logits = np.asarray(logits, dtype=np.float32)
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def topk(probs: np.ndarray, k: int, renormalize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """probs (n_tokens, n_expert) -> ids (n_tokens, k) int32 best first, weights (n_tokens, k).

    Ties go to the lower expert id, as a stable descending sort gives."""
    probs = np.asarray(probs, dtype=np.float32)
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :k].astype(np.int32)  # (n_tokens, k)
    weights = probs[np.arange(probs.shape[0])[:, None], ids]                # (n_tokens, k)
    if renormalize:
        weights = weights / weights.sum(axis=1, keepdims=True)
    return ids, weights


def masked_topk(probs: np.ndarray, mask: np.ndarray, k: int,
                renormalize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k among resident experts only (mask (n_expert,) bool), as the engine's graph does it:
    absent experts' logits are -inf before the softmax, so the router behaves as if the model
    had only the resident experts, and a weight is relative to the resident ones (the unmasked
    probabilities rescaled by their resident total; for architectures that renormalise the
    top-k this makes no difference). renormalize rescales the k chosen weights to sum to 1."""
    mask = np.asarray(mask, dtype=bool)
    if int(mask.sum()) < k:
        raise ValueError(f"masked top-{k} needs at least {k} resident experts, got {int(mask.sum())}")
    probs = np.asarray(probs, dtype=np.float32)
    resident = np.where(mask[None, :], probs, 0.0)                        # (n_tokens, n_expert)
    resident = resident / resident.sum(axis=1, keepdims=True)
    ids, weights = topk(np.where(mask[None, :], resident, -np.inf), k)
    if renormalize:
        weights = weights / weights.sum(axis=1, keepdims=True)
    return ids, weights


def adaptive_gate(ids: np.ndarray, weights: np.ndarray, sensitivity: float,
                  threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """AdapMoE's sensitivity-based gating on a top-k selection (best first).

    With weights renormalised over the k chosen (w1 >= w2 >= ...), the lowest-ranked experts are
    dropped while sensitivity * w_r^2 < threshold (from the last rank upwards; the first expert is
    never dropped). For top-2 this is exactly AdapMoE's rule: use only the first expert when
    s_l * w2^2 < T. The dropped weight goes to the kept experts in proportion, so the total gate
    mass is unchanged (1 for renormalising architectures, as in AdapMoE). Dropped ids are -1 with
    weight 0. Returns new (ids, weights); inputs are not modified."""
    ids = np.asarray(ids, dtype=np.int32)
    weights = np.asarray(weights, dtype=np.float32)
    total = weights.sum(axis=1, keepdims=True)                     # (n_tokens, 1)
    drop = sensitivity * (weights / total) ** 2 < threshold        # (n_tokens, k)
    # A rank goes only if every rank after it goes too (the kept set stays a prefix): keep the
    # ranks before the longest all-drop suffix, and always the first.
    keep = ~np.logical_and.accumulate(drop[:, ::-1], axis=1)[:, ::-1]
    keep[:, 0] = True
    kept = np.where(keep, weights, 0.0)
    weights = kept * (total / kept.sum(axis=1, keepdims=True))
    return np.where(keep, ids, -1).astype(np.int32), weights.astype(np.float32)


WAIT, SUBSTITUTE, DROP = 0, 1, 2   # what a miss does (per_miss decisions)


def miss_decisions(ids: np.ndarray, weights: np.ndarray, resident: np.ndarray,
                   substitute: np.ndarray, sensitivity: float, wait_threshold: float,
                   substitute_threshold: float = np.inf
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What each expert of a top-k selection (ids (n_tokens, k), -1 already dropped; weights
    (n_tokens, k)) does when it is not resident (resident, substitute: (n_expert,) bool, whose
    full weights / whose low-bit copy are resident now). A miss's sensitivity is AdapMoE's
    s_l * w^2 with w renormalised over the k chosen. With its substitute resident:
      >= substitute_threshold  wait: load it, then run it (exact);
      else  substitute: run the low-bit copy now (HOBBIT: a low-precision copy costs ~1%);
    without:
      >= wait_threshold  wait;
      else  drop: mask it, its weight goes to the experts that run (adaptive gating's
            renormalisation), unless it is the token's last expert, which waits.
    Both 0: every miss waits (exact); both inf: nothing waits while anything else can run.
    Returns (ids with drops as -1, weights renormalised to the same total, action (n_tokens, k)
    int8: -1 for hits and dropped-before ids, else WAIT / SUBSTITUTE / DROP)."""
    ids = np.asarray(ids, dtype=np.int32)
    weights = np.asarray(weights, dtype=np.float32)
    chosen = ids >= 0
    safe = np.maximum(ids, 0)
    miss = chosen & ~np.asarray(resident, bool)[safe]
    total = weights.sum(axis=1, keepdims=True)                          # (n_tokens, 1)
    score = sensitivity * (weights / total) ** 2
    action = np.full(ids.shape, -1, dtype=np.int8)
    has_sub = np.asarray(substitute, bool)[safe]
    action[miss] = DROP
    action[miss & has_sub] = SUBSTITUTE
    action[miss & ~has_sub & (score >= wait_threshold)] = WAIT
    action[miss & has_sub & (score >= substitute_threshold)] = WAIT
    # A token keeps at least one expert: if every chosen one would drop, its best waits.
    kept = chosen & (action != DROP)
    lost = ~kept.any(axis=1) & chosen.any(axis=1)
    if lost.any():
        first = np.argmax(chosen, axis=1)          # ids are best first: the first chosen rank
        rows = np.nonzero(lost)[0]
        action[rows, first[rows]] = WAIT
    drop = action == DROP
    if not drop.any():
        return ids, weights, action
    kept_w = np.where(drop, 0.0, weights)
    weights = kept_w * (total / kept_w.sum(axis=1, keepdims=True))
    return np.where(drop, -1, ids).astype(np.int32), weights.astype(np.float32), action
