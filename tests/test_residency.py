"""Residency policies over an in-memory slot pool, on synthetic routing traces."""
from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest

from edgemoe.errors import ShardSetError
from edgemoe.residency import FullPolicy, OnDemandPolicy, StaticPolicy, SwapPolicy
from edgemoe.residency.cache import SlotTable
from edgemoe.residency.replay import simulate_layer
from edgemoe.residency.routing import adaptive_gate, masked_topk, topk
from edgemoe.residency.traces import RoutingTrace, topic_trace


class FakePool:
    """The slot pool's contract in memory: a slot holds one expert's bytes (which expert is the
    policy's table to know); load() into a slot a running step reads from is a bug the pool
    records."""

    def __init__(self, slots: dict[int, int], expert_bytes: int = 1000, delay: float = 0.0,
                 fail: set[tuple[int, int]] = frozenset()):
        self.content = {l: [None] * n for l, n in slots.items()}   # slot -> expert
        self.nbytes = expert_bytes
        self.delay = delay
        self.fail = set(fail)
        self.in_use: set[tuple[int, int]] = set()                  # (layer, slot) being computed
        self.errors: list[str] = []
        self.loads = 0
        self.lock = threading.Lock()

    def load(self, layer, expert, slot=None):
        with self.lock:
            if (layer, expert) in self.fail:
                raise OSError(f"blk.{layer}.{expert}.gguf: Input/output error")
            if (layer, slot) in self.in_use:
                self.errors.append(f"load into slot {layer}:{slot} while a step uses it")
            self.content[layer][slot] = "loading"
        time.sleep(self.delay)
        with self.lock:
            self.content[layer][slot] = expert
            self.loads += 1
        return slot

    def bytes_held(self):
        with self.lock:
            return self.nbytes * sum(isinstance(e, int) for c in self.content.values() for e in c)

    def expert_bytes(self, layer):
        return self.nbytes


N_EXPERT, K = 16, 2


@pytest.fixture(scope="module")
def trace() -> RoutingTrace:
    # Two topics, switching once after 200 tokens; every layer concentrated on a few experts.
    return topic_trace(n_layer=3, n_expert=N_EXPERT, n_tokens=400, n_topics=2, switch_every=200,
                       sharpness=3.0, seed=1)


# -- routing -----------------------------------------------------------------------------------
def test_topk_and_masked_topk():
    probs = np.array([[0.1, 0.4, 0.3, 0.2], [0.25, 0.25, 0.3, 0.2]], dtype=np.float32)
    ids, w = topk(probs, 2)
    assert ids.tolist() == [[1, 2], [2, 0]]
    np.testing.assert_allclose(w, [[0.4, 0.3], [0.3, 0.25]])
    ids, w = masked_topk(probs, np.array([True, False, False, True]), 2, renormalize=True)
    assert ids.tolist() == [[3, 0], [0, 3]]
    np.testing.assert_allclose(w, [[2 / 3, 1 / 3], [0.25 / 0.45, 0.2 / 0.45]], rtol=1e-6)
    # Without renormalisation the weights are still relative to the resident experts (the
    # engine masks the logits before its softmax), here the same since both are chosen.
    _, w = masked_topk(probs, np.array([True, False, True, True]), 2)
    np.testing.assert_allclose(w, [[0.3 / 0.6, 0.2 / 0.6], [0.3 / 0.75, 0.25 / 0.75]], rtol=1e-6)
    with pytest.raises(ValueError, match="at least 2 resident"):
        masked_topk(probs, np.array([True, False, False, False]), 2)


def test_adaptive_gate_is_adapmoe_rule_for_top2():
    ids = np.array([[3, 5], [1, 2], [7, 0]], dtype=np.int32)
    w = np.array([[0.9, 0.1], [0.6, 0.4], [0.45, 0.15]], dtype=np.float32)  # last not renormalised
    s, t = 2.0, 0.1
    out_ids, out_w = adaptive_gate(ids, w, s, t)
    # token 0: 2 * 0.1^2 = 0.02 < 0.1 -> drop; token 1: 2 * 0.4^2 = 0.32 -> keep;
    # token 2: w2 renormalised = 0.25, 2 * 0.0625 = 0.125 -> keep.
    assert out_ids.tolist() == [[3, -1], [1, 2], [7, 0]]
    np.testing.assert_allclose(out_w, [[1.0, 0.0], [0.6, 0.4], [0.45, 0.15]], rtol=1e-6)
    # Dropping keeps the total gate mass of a non-renormalising architecture.
    out_ids, out_w = adaptive_gate(ids[2:], w[2:], s, 0.2)
    assert out_ids.tolist() == [[7, -1]] and out_w[0, 0] == pytest.approx(0.6)
    # k > 2: only a contiguous tail goes, and the first expert always stays.
    ids4 = np.array([[0, 1, 2, 3]]); w4 = np.array([[0.5, 0.2, 0.25, 0.05]])
    assert adaptive_gate(ids4, w4, 1.0, 0.05)[0].tolist() == [[0, 1, 2, -1]]
    assert adaptive_gate(ids4, w4, 1.0, 10.0)[0].tolist() == [[0, -1, -1, -1]]


# -- LRU bookkeeping and its simulation ----------------------------------------------------------
def test_layer_cache_lru_order_and_protection():
    c = SlotTable(2, 10)
    assert c.reserve(5) == (0, None); c.commit(5, 0)
    assert c.reserve(6) == (1, None); c.commit(6, 1)
    c.touch(5)                                  # 6 is now least recently used
    assert c.reserve(7) == (1, 6); c.commit(7, 1)
    assert c.reserve(8, protect={5, 7}) is None
    assert c.reserve(8, protect={7}) == (0, 5)
    assert c.array().tolist() == [-1] * 7 + [1, -1, -1]   # 5 retired, 8 not yet committed


def test_simulate_layer_counts_by_hand():
    wanted = [np.array([0, 1]), np.array([0, 2]), np.array([1, 2]), np.array([0, -1])]
    s = simulate_layer(wanted, n_slots=2)
    # t0: miss 0,1  t1: hit 0, miss 2 (evicts 1)  t2: hit 2, miss 1 (evicts 0)  t3: miss 0
    assert (s.hits, s.misses, s.wanted) == (2, 5, 7)
    assert (s.fill_misses, s.fill_prefetches, s.steady_misses) == (2, 0, 3)   # 0, 1 fill t0
    predicted = [np.array([0, 1]), np.array([2, 0]), np.array([3, 1]), np.array([0, 1])]
    s = simulate_layer(wanted, 2, predicted, n_prefetch=1)
    # t0: prefetch 0 (used, hit), miss 1.  t1: prefetch 2, evicting 1 since 0 is predicted too;
    # hits 0 and 2 (2 used).  t2: prefetch 3 evicts 0 (unused); hit 2, miss 1 evicts 3.
    # t3: prefetch 0 evicts 2; hit 0 (used).
    assert (s.prefetch_issued, s.prefetch_used, s.hits, s.misses) == (4, 3, 5, 2)
    assert (s.fill_prefetches, s.fill_misses) == (1, 1)   # t0: prefetch 0 and miss 1 fill


# -- ondemand -------------------------------------------------------------------------------------
def run_ondemand(trace, slots, n_prefetch, delay=0.0, sync_prefetch=False, **kw):
    pool = FakePool(slots, delay=delay)
    with OnDemandPolicy(pool, slots, N_EXPERT, K, n_prefetch=n_prefetch, **kw) as pol:
        pol.warm()
        chosen = {l: [] for l in slots}
        for t in range(trace.n_tokens):
            for l in trace.layers:
                ids, w = topk(trace.probs[l][t:t + 1], K, renormalize=True)
                ids, w = pol.gate(l, ids, w, decode=True)
                slot_map = pol.ensure(l, ids)
                # Exactness: every selected expert sits in the slot the policy says, right now.
                for e, s in slot_map.items():
                    assert pool.content[l][s] == e
                chosen[l].append(ids[0])
                nxt = l + 1
                if n_prefetch and nxt in trace.predicted:
                    pol.prefetch(nxt, trace.predicted[nxt][t:t + 1])
                    if sync_prefetch:
                        pol.wait_idle()
            pol.end_step(1)
        counters = pol.telemetry.counters
    assert not pool.errors
    return chosen, counters, pool


@pytest.mark.parametrize("n_prefetch", [0, 1, 2])
def test_ondemand_is_exact_and_matches_simulation(trace, n_prefetch):
    slots = {l: 5 for l in trace.layers}
    chosen, c, _ = run_ondemand(trace, slots, n_prefetch, sync_prefetch=True)
    for l in trace.layers:
        # The selected set is the unmasked top-k at every step: no redirect, no drop.
        np.testing.assert_array_equal(np.array(chosen[l]), trace.wanted(l, K))
    sims = [simulate_layer(trace.wanted(l, K), 5,
                           trace.predicted_ids(l, K) if n_prefetch else None, n_prefetch)
            for l in trace.layers]
    assert c.hits == sum(s.hits for s in sims)
    assert c.misses == sum(s.misses for s in sims)
    assert c.prefetch_issued == sum(s.prefetch_issued for s in sims)
    assert c.prefetch_used == sum(s.prefetch_used for s in sims)
    assert c.redirects == 0 and c.experts_run == K * trace.n_tokens * len(trace.layers)
    assert c.loads == c.misses + c.prefetch_issued
    if n_prefetch:
        assert c.prefetch_used > 0.5 * c.prefetch_issued   # the noisy predictor is mostly right
        assert c.misses < sum(simulate_layer(trace.wanted(l, K), 5).misses for l in trace.layers)


def test_ondemand_exact_with_slow_concurrent_prefetch(trace):
    # Reads take time and prefetches race with demand loads: still exact, nothing hangs.
    short = RoutingTrace({l: p[:60] for l, p in trace.probs.items()},
                         {l: x[:60] for l, x in trace.x_norm.items()},
                         {l: p[:60] for l, p in trace.predicted.items()})
    slots = {l: K for l in trace.layers}                    # the minimum: top-k slots
    chosen, c, pool = run_ondemand(short, slots, n_prefetch=1, delay=0.001)
    for l in short.layers:
        np.testing.assert_array_equal(np.array(chosen[l]), short.wanted(l, K))
    assert c.stall_seconds > 0 and c.bytes_read == pool.loads * pool.nbytes


def test_ondemand_adaptive_gating_drops_only_in_decode(trace):
    sens = {l: 1.0 for l in trace.layers}
    slots = {l: 5 for l in trace.layers}
    chosen, c, _ = run_ondemand(trace, slots, 0, sensitivity=sens, threshold=0.05)
    for l in trace.layers:
        want = trace.wanted(l, K, sensitivity=1.0, threshold=0.05)
        np.testing.assert_array_equal(np.array(chosen[l]), want)
    dropped = K * trace.n_tokens * len(trace.layers) - c.experts_run
    assert dropped > 0
    pool = FakePool(slots)
    with OnDemandPolicy(pool, slots, N_EXPERT, K, sensitivity=sens, threshold=0.05) as pol:
        ids, w = topk(trace.probs[0][:50], K, renormalize=True)
        assert (pol.gate(0, ids, w, decode=False)[0] == ids).all()   # prefill: never drops
    with pytest.raises(ValueError, match="sensitivity"):
        OnDemandPolicy(pool, slots, N_EXPERT, K, threshold=0.05)


def test_ondemand_groups_for_large_prefill(trace):
    slots = {l: 3 for l in trace.layers}
    pool = FakePool(slots)
    with OnDemandPolicy(pool, slots, N_EXPERT, K) as pol:
        ids, _ = topk(trace.probs[0][:40], K)
        with pytest.raises(ValueError, match="groups"):
            pol.ensure(0, ids)
        seen = []
        for g in pol.groups(0, ids):
            assert len(g) <= 3
            m = pol.ensure(0, g)
            assert all(pool.content[0][s] == e for e, s in m.items())
            seen += g.tolist()
        assert sorted(seen) == sorted(set(ids.ravel().tolist()))


def test_ondemand_unreadable_shard_is_a_clear_error(trace):
    slots = {0: 2}
    pool = FakePool(slots, fail={(0, 3)})
    with OnDemandPolicy(pool, slots, N_EXPERT, K) as pol:
        pol.ensure(0, np.array([[1, 2]]))
        with pytest.raises(ShardSetError, match="layer 0 expert 3.*Input/output error"):
            pol.ensure(0, np.array([[3, 1]]))


# -- masked policies ------------------------------------------------------------------------------
def run_masked(policy, pool, trace, step_seconds=0.0):
    """Decode the trace under masked gating; returns per-step resident sets of layer 0."""
    resident_sets = []
    for t in range(trace.n_tokens):
        for l in trace.layers:
            slot_of = policy.slot_of(l)
            ids, _ = masked_topk(trace.probs[l][t:t + 1], slot_of >= 0, K)
            used = {(l, int(slot_of[e])) for e in ids[0]}
            with pool.lock:
                # Masked gating never selects an expert whose read is not complete.
                for e in ids[0]:
                    assert pool.content[l][slot_of[e]] == e, (t, l, e)
                pool.in_use |= used
            time.sleep(step_seconds)
            with pool.lock:
                pool.in_use -= used
            if policy.observes:   # as the engine does
                policy.observe(l, trace.probs[l][t:t + 1], trace.x_norm[l][t:t + 1], ids)
        resident_sets.append(frozenset(np.flatnonzero(policy.slot_of(0) >= 0).tolist()))
        policy.end_step(1)
    return resident_sets


def expert_norms(trace):
    return {l: np.ones(N_EXPERT) for l in trace.layers}


def test_swap_adapts_after_topic_change_and_never_routes_to_absent(trace):
    slots = {l: 5 for l in trace.layers}
    pool = FakePool(slots, delay=0.002)
    with SwapPolicy(pool, slots, N_EXPERT, K, norms=expert_norms(trace), interval=8,
                    max_swaps=3) as pol:
        pol.warm()
        sets = run_masked(pol, pool, trace, step_seconds=0.0005)
        pol.wait_idle()
        c = pol.telemetry.counters
    assert not pool.errors, pool.errors[:3]
    assert c.absent_selected == 0
    assert c.swaps > 0 and c.experts_run == K * trace.n_tokens * len(trace.layers)
    # The resident set changes after the topic switch (token 200) ...
    assert sets[199] != sets[-1]
    # ... toward the experts topic B uses most in layer 0.
    top_b = set(np.argsort(-np.bincount(trace.wanted(0, K)[200:].ravel(),
                                        minlength=N_EXPERT))[:5].tolist())
    assert len(sets[-1] & top_b) >= 4
    # And routing then mostly finds the experts it wants: compare the hit rate of the last 100
    # tokens with the set held just before the switch (what static pruning would have kept).
    stale = np.mean([e in sets[199] for e in trace.wanted(0, K)[300:].ravel()])
    fresh = np.mean([e in sets[-1] for e in trace.wanted(0, K)[300:].ravel()])
    assert fresh > stale + 0.2 and fresh > 0.7


def test_swap_carries_on_when_a_shard_fails(trace):
    slots = {l: 5 for l in trace.layers}
    wanted_b = np.bincount(trace.wanted(0, K)[200:].ravel(), minlength=N_EXPERT)
    bad = int(np.argmax(wanted_b * ~np.isin(np.arange(N_EXPERT),
                                            trace.wanted(0, K)[:200].ravel())))
    pool = FakePool(slots, fail={(0, bad)})
    with SwapPolicy(pool, slots, N_EXPERT, K, norms=expert_norms(trace), interval=8) as pol:
        pol.warm()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sets = run_masked(pol, pool, trace)
            pol.wait_idle()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and f"expert {bad}" in msgs[0]
    assert bad not in sets[-1] and sets[-1] != sets[199]


def test_static_and_full(trace):
    slots = {l: 4 for l in trace.layers}
    scores = {l: np.arange(N_EXPERT, dtype=float) for l in trace.layers}   # keeps 15, 14, 13, 12
    pool = FakePool(slots)
    with StaticPolicy(pool, slots, N_EXPERT, K, scores=scores) as pol:
        pol.warm()
        sets = run_masked(pol, pool, trace)
        assert pol.telemetry.counters.loads == 4 * len(trace.layers)      # never swaps
        assert pol.telemetry.counters.redirects > 0
    assert set(sets) == {frozenset({12, 13, 14, 15})}
    # The telemetry check can fail: an engine selecting an absent expert is counted.
    with StaticPolicy(FakePool(slots), slots, N_EXPERT, K, scores=scores) as pol:
        pol.warm()
        pol.slot_of(0)
        pol.observe(0, trace.probs[0][:1], trace.x_norm[0][:1], np.array([[15, 3]]))
        assert pol.telemetry.counters.absent_selected == 1
        assert "NON-RESIDENT SELECTED 1" in pol.telemetry.summary()
    full_slots = {l: N_EXPERT for l in trace.layers}
    pool = FakePool(full_slots)
    with FullPolicy(pool, N_EXPERT, K, trace.layers) as pol:
        pol.warm()
        run_masked(pol, pool, trace)
        c = pol.telemetry.counters
    assert c.redirects == 0 and c.hits == K * trace.n_tokens * len(trace.layers)
    with pytest.raises(ValueError, match="between top-k"):
        StaticPolicy(FakePool({0: 1}), {0: 1}, N_EXPERT, K, scores=scores)


def test_make_policy_names():
    from edgemoe.residency import make_policy

    slots = {0: 4, 1: 4}
    norms = {l: np.arange(N_EXPERT, dtype=float) for l in slots}
    usage = {l: np.arange(N_EXPERT)[::-1].astype(float) for l in slots}
    pool = FakePool({0: N_EXPERT, 1: N_EXPERT})
    made = [make_policy("full", pool, slots, N_EXPERT, K),
            make_policy("static", pool, slots, N_EXPERT, K, norms=norms, usage=usage),
            make_policy("swap", pool, slots, N_EXPERT, K, norms=norms, interval=4),
            make_policy("ondemand", pool, slots, N_EXPERT, K, n_prefetch=2)]
    assert [p.name for p in made] == ["full", "static", "swap", "ondemand"]
    assert [p.masked for p in made] == [True, True, True, False]
    assert made[0].slots == {0: N_EXPERT, 1: N_EXPERT}
    assert list(made[1].initial_experts(0))[:4] == [0, 1, 2, 3]       # usage wins over norms
    assert made[2].max_swaps == 2 and made[3].n_prefetch == 2         # one swap per layer
    for p in made:
        p.close()
    with pytest.raises(ValueError, match="unknown policy 'lru'"):
        make_policy("lru", pool, slots, N_EXPERT, K)
    with pytest.raises(ValueError, match="norms"):
        make_policy("swap", pool, slots, N_EXPERT, K)


class GatedPool(FakePool):
    """Reads block until the test opens the gate: shows who waits for a read."""

    def __init__(self, slots):
        super().__init__(slots)
        self.gate = threading.Event()

    def load(self, layer, expert, slot=None):
        assert self.gate.wait(10), "a read was never released"
        return super().load(layer, expert, slot)


def test_swap_decode_never_waits_for_a_read(trace):
    slots = {l: 5 for l in trace.layers}
    pool = GatedPool(slots)
    pool.gate.set()
    with SwapPolicy(pool, slots, N_EXPERT, K, norms=expert_norms(trace), interval=4) as pol:
        pol.warm()
        pool.gate.clear()                  # from now on every read hangs until released
        done = threading.Event()

        def decode():
            run_masked(pol, pool, RoutingTrace({l: p[150:260] for l, p in trace.probs.items()},
                                               {l: x[150:260] for l, x in trace.x_norm.items()},
                                               {}))
            done.set()

        threading.Thread(target=decode, daemon=True).start()
        assert done.wait(10), "decode blocked on a swap read"
        stalled = sum(len(s) for s in pol._in_flight.values())
        assert stalled > 0 and pol.telemetry.counters.swaps == 0   # swaps planned, none landed
        pool.gate.set()
        pol.wait_idle()
        assert pol.telemetry.counters.swaps == stalled
        assert pol.telemetry.counters.absent_selected == 0
