"""Per-layer sensitivities s_l for adaptive gating, estimated without autograd.

Dropping the second expert of a top-2 selection (renormalised weights w1 + w2 = 1, then the first
expert alone with weight 1) changes the layer's output by
    delta = E1(x) - (w1 E1(x) + w2 E2(x)) = w2 (E1(x) - E2(x)).
To second order, with the Fisher information F of the model's output distribution with respect to
that layer output, the expected loss change (the KL divergence of the next-token distribution) is
    dL ~= 1/2 delta^T F delta = w2^2 * [1/2 (E1 - E2)^T F (E1 - E2)],
so dL ~= s_l * w2^2, with s_l the layer's average of the bracket, and the rule "drop when
s_l * w2^2 < T" bounds the predicted loss change per (token, layer) by T. AdapMoE obtains the
bracket from gradients; we measure dL directly or approximate F, then fit s_l:
- measured, isolated (exact target): layer l drops its second expert at one position only; dL is
  the KL it causes there plus at every later position. One forward pass per sampled position.
- measured, one pass: layer l drops everywhere in one teacher-forced pass; dL_t the KL at each
  position. Cheap, but mixes earlier drops' effects and simultaneous drops are sub-additive: it
  read 0.4-0.7x of the isolated value for non-final layers of a tiny qwen3_moe.
- isotropic proxy (no extra passes): F ~ I / ||h||^2, i.e. a perturbation matters relative to the
  residual stream it is added to; dL_t = ||w2 (E1(x) - E2(x))||^2 / ||h||^2. Arbitrary scale
  (it ignores how later layers amplify the perturbation); set T by a target drop rate.
In every case s_l is the least-squares slope through the origin of dL_t against w2_t^2:
    s_l = sum_t dL_t w2_t^2 / sum_t w2_t^4.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


def output_change_proxy(w2: np.ndarray, e1_out: np.ndarray, e2_out: np.ndarray,
                        h_norm: np.ndarray) -> np.ndarray:
    """The isotropic estimate of dL per token: ||w2 (E1(x) - E2(x))||^2 / ||h||^2.
    w2 (n_tokens,), e1_out/e2_out (n_tokens, n_embd) the two experts' outputs, h_norm (n_tokens,)
    the norm of the residual stream the layer's output is added to."""
    diff = np.asarray(e1_out, dtype=np.float64) - np.asarray(e2_out, dtype=np.float64)
    w2 = np.asarray(w2, dtype=np.float64)
    return (w2 ** 2) * np.einsum("td,td->t", diff, diff) / np.asarray(h_norm, np.float64) ** 2


def fit_sensitivity(w2: np.ndarray, delta_loss: np.ndarray) -> float:
    """s_l from per-token second weights w2 (n_tokens,) and loss changes dL (n_tokens,)."""
    w2sq = np.asarray(w2, dtype=np.float64) ** 2
    denom = float(np.dot(w2sq, w2sq))
    if denom == 0.0:
        raise ValueError("sensitivity: every second-expert weight is 0; nothing to fit")
    return float(np.dot(np.asarray(delta_loss, dtype=np.float64), w2sq) / denom)


def drop_rate(sensitivity: Mapping[int, float], w2: Mapping[int, np.ndarray],
              threshold: float) -> dict[int, float]:
    """Fraction of (token, layer) pairs that would run one expert, per layer."""
    return {l: float(np.mean(sensitivity[l] * np.asarray(w2[l]) ** 2 < threshold)) for l in w2}


def threshold_for_drop_rate(sensitivity: Mapping[int, float], w2: Mapping[int, np.ndarray],
                            rate: float) -> float:
    """The global T under which about `rate` of all (token, layer) pairs drop their second expert
    (AdapMoE reports ~25% with no accuracy loss)."""
    scores = np.concatenate([sensitivity[l] * np.asarray(w2[l], np.float64) ** 2 for l in w2])
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"drop rate {rate}: must be in [0, 1]")
    if rate == 0.0:
        return 0.0
    # Strictly-less-than rule: T just above the rate-quantile's score.
    return float(np.nextafter(np.quantile(scores, rate, method="inverted_cdf"), np.inf))


# `--quality`: what ondemand does with a miss (routing.miss_decisions' wait threshold).
QUALITIES = ("exact", "balanced", "fast")


def balanced_wait_threshold(sensitivity: Mapping[int, float], probs: Mapping[int, np.ndarray],
                            k: int, share: float = 0.5) -> float:
    """`--quality balanced`'s wait threshold from calibration routing (probs[l] (n_tokens,
    n_expert) unmasked router probabilities): the `share` quantile of s_l * w_r^2 over the
    ranks after the first (w renormalised over the top-k). A first-ranked expert, whose
    renormalised weight is at least 1/k, scores above nearly all of them and waits; of the
    others, the weaker `share` run their substitute or drop."""
    if k < 2:
        return 0.0
    scores = []
    for l, p in probs.items():
        p = np.asarray(p, dtype=np.float64)
        top = -np.sort(-p, axis=1)[:, :k]
        w = top / top.sum(axis=1, keepdims=True)
        scores.append(sensitivity[l] * w[:, 1:].ravel() ** 2)
    return float(np.quantile(np.concatenate(scores), share))
