"""ondemand's per-miss decisions (wait, substitute, drop by s_l * w^2): the rule in numpy.
The engine running them with the substitute tier: tests/test_substitutes.py."""
from __future__ import annotations

import math

import numpy as np
from edgemoe.residency.routing import DROP, SUBSTITUTE, WAIT, miss_decisions, topk


def test_miss_decisions_follow_sensitivity_and_residency():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(8), size=400).astype(np.float32)
    ids, w = topk(probs, 3, renormalize=True)
    resident = rng.random(8) < 0.5
    sub = rng.random(8) < 0.5
    score = w ** 2   # s_l = 1
    miss = ~resident[ids]
    has_sub = sub[ids]
    for t in (0.0, 0.02, 0.1, math.inf):
        for ts in (0.0, 0.1, math.inf):
            out, ow, act = miss_decisions(ids, w, resident, sub, 1.0, t, ts)
            assert ((act >= 0) == miss).all()                  # decisions for misses only
            assert (out[act == DROP] == -1).all() and (out[act != DROP] == ids[act != DROP]).all()
            assert has_sub[act == SUBSTITUTE].all()            # substitutes only if resident
            assert not has_sub[act == DROP].any()              # drop only without one
            assert ((out >= 0).sum(axis=1) >= 1).all()         # a token keeps an expert
            assert np.allclose(ow.sum(axis=1), w.sum(axis=1), atol=1e-5)
            # With a substitute: wait at or above ts, else substitute.
            assert (act[miss & has_sub & (score >= ts)] == WAIT).all()
            assert (act[miss & has_sub & (score < ts)] == SUBSTITUTE).all()
            # Without: wait at or above t; below it only as a token's last expert.
            assert (act[miss & ~has_sub & (score >= t)] == WAIT).all()
            below = miss & ~has_sub & (score < t) & (act == WAIT)
            assert ((out[below.any(axis=1)] >= 0).sum(axis=1) == 1).all()
            if t == ts == 0.0:
                assert (act[miss] == WAIT).all()               # both 0: exact
    # fast with every substitute resident: nothing waits
    _, _, act = miss_decisions(ids, w, resident, np.ones(8, bool), 1.0, math.inf, math.inf)
    assert not (act == WAIT).any() and (act[miss] == SUBSTITUTE).all()
