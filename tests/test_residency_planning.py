"""Budget arithmetic, slot allocation, sensitivity estimation, the planner's model, telemetry."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgemoe.errors import BudgetError
from edgemoe.residency import (MemoryNeeds, OnDemandPolicy, SwapPolicy, Telemetry, make_plan,
                               parse_budget, uniform_slots)
from edgemoe.residency.allocation import (allocate_slots, brute_force_allocation, loads_table,
                                          total_cost)
from edgemoe.residency.importance import ImportanceTracker, expert_norm, plan_swaps
from edgemoe.residency.planner import (SWAP_DECAYS, SWAP_INTERVALS, Profile, _Reader,
                                       allocate_for, choose_swap_schedule, ondemand_timeline,
                                       plan, predict)
from edgemoe.residency.replay import simulate_swap  # noqa: E402
from edgemoe.residency.routing import topk
from edgemoe.residency.sensitivity import (drop_rate, fit_sensitivity, output_change_proxy,
                                           threshold_for_drop_rate)
from edgemoe.residency.traces import RoutingTrace, topic_trace

GiB, MiB = 1 << 30, 1 << 20


# -- budget ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,bytes_,fraction", [
    ("2GiB", 2 * GiB, None), ("1.5GB", 1_500_000_000, None), ("512MiB", 512 * MiB, None),
    ("512 mib", 512 * MiB, None), ("3g", 3 * GiB, None), ("1000000", 1_000_000, None),
    ("50%", None, 0.5), ("12.5%", None, 0.125), ("100%", None, 1.0),
])
def test_parse_budget(text, bytes_, fraction):
    b = parse_budget(text)
    assert (b.bytes, b.fraction) == (bytes_, fraction)


@pytest.mark.parametrize("text,message", [
    ("lots", "expected a size"), ("2 parsecs", "unknown unit 'parsecs'"), ("0%", r"\(0, 100\]"),
    ("150%", r"\(0, 100\]"), ("0GiB", "more than 0"), ("-1GiB", "expected a size"),
])
def test_parse_budget_refuses(text, message):
    with pytest.raises(BudgetError, match=message):
        parse_budget(text)


NEEDS = MemoryNeeds(base_bytes=300 * MiB, kv_bytes=64 * MiB, compute_bytes=36 * MiB,
                    expert_bytes={0: 10 * MiB, 1: 10 * MiB, 2: 10 * MiB, 3: 10 * MiB},
                    n_expert=8, n_expert_used=2)


def test_budget_to_slots():
    # Fixed: base, KV, compute and one read in flight (2 x 10 MiB) = 420 MiB.
    assert NEEDS.fixed_bytes == 420 * MiB and NEEDS.minimum_bytes == 420 * MiB + 80 * MiB
    plan = uniform_slots(parse_budget("50%"), NEEDS)
    assert plan.slots == {0: 4, 1: 4, 2: 4, 3: 4} and plan.slot_bytes == 160 * MiB
    # 420 MiB fixed + 150 MiB: 3 slots everywhere (120 MiB), 30 MiB more gives layers 0-2 a 4th.
    plan = uniform_slots(parse_budget("570MiB"), NEEDS)
    assert plan.slots == {0: 4, 1: 4, 2: 4, 3: 3}
    assert plan.total_bytes == 570 * MiB
    # Never more than every expert, whatever the budget.
    assert uniform_slots(parse_budget("100GiB"), NEEDS).slots == {l: 8 for l in range(4)}
    assert make_plan({0: 2, 1: 8, 2: 2, 3: 2}, NEEDS).total_bytes == 420 * MiB + 140 * MiB
    # A pool that reads straight into its slots declares no transient bytes.
    from dataclasses import replace
    assert replace(NEEDS, read_bytes=0).minimum_bytes == 480 * MiB
    # The interpreter and libraries count too (the engine measures them before loading).
    from edgemoe.residency.budget import process_baseline_bytes
    baseline = process_baseline_bytes()
    assert 10 * MiB < baseline < 4096 * MiB
    assert replace(NEEDS, runtime_bytes=baseline).minimum_bytes == 500 * MiB + baseline


def test_budget_refusal_states_the_minimum():
    with pytest.raises(BudgetError, match=r"below the minimum of 500 MiB \(524288000 bytes\).*"
                                          r"runtime 0 B \+ base 300 MiB \+ KV 64 MiB \+ compute 36 MiB \+ "
                                          r"reads 20 MiB \+ 2 expert slots per layer 80 MiB"):
        uniform_slots(parse_budget("499MiB"), NEEDS)
    uniform_slots(parse_budget("500MiB"), NEEDS)           # exactly the minimum runs
    with pytest.raises(BudgetError, match=r"below the minimum of 25%"):
        uniform_slots(parse_budget("20%"), NEEDS)


# -- slot allocation ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def skewed() -> RoutingTrace:
    # Layer 0 spreads over all experts, layer 3 concentrates on a handful.
    return topic_trace(n_layer=4, n_expert=12, n_tokens=300, n_topics=1,
                       sharpness={0: 0.2, 1: 1.0, 2: 2.5, 3: 6.0}, seed=3)


def test_dp_beats_uniform_on_skewed_layers(skewed):
    cost = loads_table(skewed, k=2)
    eb = {l: 1000 for l in skewed.layers}
    slots = allocate_slots(cost, eb, allowance=4 * 6 * 1000, k=2)
    assert sum(slots.values()) <= 24 and not len(set(slots.values())) == 1
    assert slots[0] > slots[3]                       # the spread-out layer gets more slots
    uniform = total_cost(cost, {l: 6 for l in skewed.layers})
    assert total_cost(cost, slots) < 0.8 * uniform


@pytest.mark.parametrize("seed", range(6))
def test_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_layer, n_expert, k = 3, 6, 2
    # Random decreasing cost curves and unequal expert sizes (mixed quant fallbacks).
    cost = {l: np.concatenate([[np.inf] * k, np.sort(rng.random(n_expert + 1 - k))[::-1] * 3])
            for l in range(n_layer)}
    eb = {l: int(rng.choice([256, 512, 768])) for l in range(n_layer)}
    allowance = int(rng.integers(k * sum(eb.values()), n_expert * sum(eb.values())))
    slots = allocate_slots(cost, eb, allowance, k)
    ref, best = brute_force_allocation(cost, eb, allowance, k)
    assert total_cost(cost, slots) == pytest.approx(best)
    assert sum(slots[l] * eb[l] for l in slots) <= allowance


def test_dp_refuses_too_small(skewed):
    with pytest.raises(BudgetError, match="top-2"):
        allocate_slots(loads_table(skewed, 2), {l: 1000 for l in skewed.layers}, 7999, 2)


# -- importance and swap planning -----------------------------------------------------------------
def test_importance_is_eq1():
    tr = ImportanceTracker({0: np.array([1.0, 2.0, 3.0])}, k=1)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    tr.observe(0, probs, np.array([2.0, 1.0, 4.0]))
    # expert 0: 2 * 0.7 * 1 + 4 * 0.5 * 1 = 3.4; expert 2: 1 * 0.6 * 3 = 1.8; expert 1 never top-1.
    np.testing.assert_allclose(tr.close_window()[0], [3.4, 0.0, 1.8])
    np.testing.assert_allclose(tr.close_window()[0], 0.0)


def test_expert_norm_from_quantized_shard(tmp_path):
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize

    from edgemoe.residency.importance import expert_norm_from_shard
    from edgemoe.shardset import ExpertShard, TensorInfo

    rng = np.random.default_rng(0)
    mats = {"ffn_gate": rng.standard_normal((64, 32)), "ffn_up": rng.standard_normal((64, 32)),
            "ffn_down": rng.standard_normal((32, 64))}
    tensors, blob, offset = {}, bytearray(), 4096
    for name, m in mats.items():
        q = quantize(m.astype(np.float32), GGMLQuantizationType.Q8_0).tobytes()
        blob += b"\0" * (offset - 4096 - len(blob)) + q
        tensors[name] = TensorInfo("Q8_0", (m.shape[1], m.shape[0]), offset, len(q))
        offset += -(-len(q) // 4096) * 4096
    path = tmp_path / "blk.0.0.gguf"
    path.write_bytes(b"\0" * 4096 + bytes(blob))
    shard = ExpertShard(layer=0, expert=0, path=path, bytes=path.stat().st_size, sha256="",
                        data_offset=4096, data_bytes=len(blob), tensors=tensors)
    assert expert_norm_from_shard(shard) == pytest.approx(expert_norm(mats.values()), rel=1e-3)
    # Streamed as the runtime does it (O_DIRECT reads, a few rows dequantized at a time).
    from edgemoe.pool import read_span
    from edgemoe.residency import importance

    importance._NORM_ROWS, rows = 7, importance._NORM_ROWS
    try:
        streamed = expert_norm_from_shard(shard, read_span)
    finally:
        importance._NORM_ROWS = rows
    assert streamed == pytest.approx(expert_norm_from_shard(shard), rel=1e-9)


def test_plan_swaps_bounds_and_keeps_topk_routable():
    imp = {0: np.array([5.0, 1.0, 0.5, 9.0, 8.0, 0.0]), 1: np.array([1.0, 1.0, 1.0, 1.0, 1, 1])}
    routable = {0: {0, 1, 2, 5}, 1: {0, 1}}
    none = {0: set(), 1: set()}
    plan = plan_swaps(imp, routable, none, {0: 0, 1: 0}, k=2, max_swaps=5)
    # Layer 0: 3 replaces 5 and 4 replaces 2, best gain first; a third victim would leave fewer
    # than k=2 experts routable while the reads are in flight.
    assert [(s.layer, s.victim, s.candidate) for s in plan] == [(0, 5, 3), (0, 2, 4)]
    plan = plan_swaps(imp, {0: {0, 1, 2}, 1: {0, 1}}, none, {0: 0, 1: 0}, k=2, max_swaps=5)
    assert [(s.layer, s.victim, s.candidate) for s in plan] == [(0, 2, 3)]
    assert len(plan_swaps(imp, routable, none, {0: 0, 1: 0}, 2, max_swaps=1)) == 1
    # An in-flight candidate is not planned twice; a free slot is filled without a victim.
    plan = plan_swaps(imp, routable, {0: {3}, 1: set()}, {0: 1, 1: 0}, 2, max_swaps=5)
    assert (0, None, 4) in [(s.layer, s.victim, s.candidate) for s in plan]
    assert all(s.candidate != 3 for s in plan)
    # The margin stops swaps between nearly equal experts (layer 1 is flat).
    assert plan_swaps({0: np.array([1.0, 1.0, 1.05])}, {0: {0, 1}}, {0: set()}, {0: 0}, 1, 5,
                      margin=0.1) == []


# -- sensitivity ----------------------------------------------------------------------------------
def _toy_layer(rng, n_embd, n_vocab, gain):
    """A residual layer whose output goes through a read-out of the given gain: the true loss
    change of dropping the second expert is the KL of the next-token distributions."""
    readout = gain * rng.standard_normal((n_embd, n_vocab)) / np.sqrt(n_embd)
    def kl(h, e1, e2, w2):
        full = h + (1 - w2)[:, None] * e1 + w2[:, None] * e2
        drop = h + e1
        lp = full @ readout; lq = drop @ readout
        lp -= lp.max(1, keepdims=True); lq -= lq.max(1, keepdims=True)
        p = np.exp(lp); p /= p.sum(1, keepdims=True)
        logq = lq - np.log(np.exp(lq).sum(1, keepdims=True))
        return (p * (np.log(p) - logq)).sum(1)
    return kl


def test_sensitivity_fit_predicts_kl_and_ranks_layers():
    rng = np.random.default_rng(0)
    n, d = 2000, 16
    s = {}
    for layer, gain in ((0, 4.0), (1, 1.0)):
        kl = _toy_layer(rng, d, 50, gain)
        h = rng.standard_normal((n, d)) * 3
        e1, e2 = rng.standard_normal((n, d)) * 0.3, rng.standard_normal((n, d)) * 0.3
        w2 = rng.uniform(0.0, 0.5, n)
        train = slice(0, 1000)
        s[layer] = fit_sensitivity(w2[train], kl(h, e1, e2, w2)[train])
        # Held-out tokens: s_l * w2^2 predicts the average KL at each w2 (second order holds;
        # s_l is a layer average, so single tokens scatter around it).
        held = slice(1000, None)
        pred, true = s[layer] * w2[held] ** 2, kl(h, e1, e2, w2)[held]
        for lo in (0.1, 0.2, 0.3, 0.4):
            in_bin = (w2[held] >= lo) & (w2[held] < lo + 0.1)
            assert np.mean(true[in_bin]) == pytest.approx(np.mean(pred[in_bin]), rel=0.3)
        # The gating rule bounds the loss: tokens below T change the loss by about T at most.
        T = float(np.median(pred))
        assert np.mean(true[pred < T]) < T
        # The isotropic proxy is a positive, w2-quadratic quantity too.
        proxy = output_change_proxy(w2, e1, e2, np.linalg.norm(h, axis=1))
        assert (proxy >= 0).all() and fit_sensitivity(w2, proxy) > 0
    assert s[0] > 4 * s[1]          # the amplifying read-out makes layer 0 more sensitive
    w2s = {0: rng.uniform(0, 0.5, 1000), 1: rng.uniform(0, 0.5, 1000)}
    t = threshold_for_drop_rate(s, w2s, 0.25)
    rates = drop_rate(s, w2s, t)
    assert np.mean(list(rates.values())) == pytest.approx(0.25, abs=0.002)
    assert rates[1] > rates[0]      # the less sensitive layer drops more often


# -- planner --------------------------------------------------------------------------------------
def _profile(layers, bw=90e6):
    return Profile(read_bytes_per_s=bw, read_latency_s=1e-4, layer_seconds={l: 2e-3 for l in layers},
                   expert_seconds={l: 1e-3 for l in layers}, other_seconds=5e-3)


@pytest.fixture(scope="module")
def topics() -> RoutingTrace:
    return topic_trace(n_layer=3, n_expert=16, n_tokens=300, n_topics=3, switch_every=100,
                       sharpness=3.0, seed=5)


def test_planner_ondemand_counts_match_the_policy(topics):
    """The planner's ondemand hit rate, prefetch accuracy and bytes read are the policy's,
    measured, over the whole trace and over a run's decode after a prompt."""
    from test_residency import FakePool

    slots = {l: 6 for l in topics.layers}
    eb = {l: 4 * MiB for l in topics.layers}
    pred = predict("ondemand", topics, slots, 2, _profile(topics.layers), eb, n_prefetch=1)
    window = predict("ondemand", topics, slots, 2, _profile(topics.layers), eb, n_prefetch=1,
                     prompt_tokens=100, decode_tokens=100)
    pool = FakePool(slots)
    marks = {}
    with OnDemandPolicy(pool, slots, 16, 2, n_prefetch=1) as pol:
        for t in range(topics.n_tokens):
            if t in (100, 200):
                marks[t] = pol.telemetry.counters
            for l in topics.layers:
                ids, w = pol.gate(l, *topk(topics.probs[l][t:t + 1], 2), decode=True)
                pol.ensure(l, ids)
                if l + 1 in topics.predicted:
                    pol.prefetch(l + 1, topics.predicted[l + 1][t:t + 1])
                    pol.wait_idle()
            pol.end_step()
        rec = json.loads(json.dumps(pol.end_step(0)))           # per-token record is JSON
        summary = pol.telemetry.summary()
        c = pol.telemetry.counters
    for p, run in ((pred, c), (window, marks[200] - marks[100])):
        assert p.hit_rate == pytest.approx(run.hits / (run.hits + run.misses))
        assert p.prefetch_accuracy == pytest.approx(run.prefetch_used / run.prefetch_issued, abs=0.02)
        # Every read decode makes, the filling of free slots included.
        assert p.bytes_read_per_token == pytest.approx(run.loads * 4 * MiB / run.tokens)
    assert "100 tokens decoded after a 100-token prompt" in window.line()
    assert rec["tokens"] == 0 and rec["hit_rate"] is None
    assert summary.startswith(f"residency: {topics.n_tokens} tok, 2.00 experts/layer-token, hit ")


def test_reader_token_bucket():
    """A throttle that lets a burst through: reads after a pause run at device speed until the
    burst is spent, then at the sustained rate; a pause refills the bucket."""
    p = Profile(read_bytes_per_s=400e6, read_latency_s=0.0, layer_seconds={}, expert_seconds={},
                other_seconds=0.0, sustained_bytes_per_s=100e6, burst_bytes=10e6)
    r = _Reader(p)
    assert r.read(0.0, 5_000_000) == pytest.approx(5e6 / 400e6)          # within the burst
    done = 0.0
    for _ in range(20):                                                  # 100 MB back to back
        done = r.read(0.0, 5_000_000)
    assert done == pytest.approx((105e6 - 10e6) / 100e6, rel=0.02)       # burst, then the rate
    later = done + 1.0                                                   # the bucket refills
    assert r.read(later, 5_000_000) - later == pytest.approx(5e6 / 400e6)
    # Without a sustained rate every read takes latency + bytes / bandwidth.
    q = _Reader(Profile(read_bytes_per_s=100e6, read_latency_s=1e-3, layer_seconds={},
                        expert_seconds={}, other_seconds=0.0))
    assert q.read(2.0, 1_000_000) == pytest.approx(2.0 + 1e-3 + 1e-2)


def test_ondemand_timeline_orders_reads_as_the_policy_does():
    """Two layers, hand-made reads: demand loads stall the clock one after another; a prefetch
    that is needed is waited for, an unneeded one already reading delays the demand load
    behind it, an unneeded one not started is cancelled."""
    layers = [0, 1]
    p = Profile(read_bytes_per_s=1e6, read_latency_s=0.0, layer_seconds={0: 1e-3, 1: 1e-3},
                expert_seconds={0: 1e-3, 1: 1e-3}, other_seconds=2e-3)
    eb = {0: 10_000, 1: 10_000}                                          # 10 ms per read
    runs = {0: np.array([2, 2]), 1: np.array([2, 2])}
    # token 0: layer 0 misses two experts; layer 1 prefetched expert 5 and needs it.
    # token 1: layer 1 prefetched 6 (not needed) and misses 7.
    reads = {0: [([], [1, 2], [1, 2], 0), ([], [], [1, 2], 0)],
             1: [([5], [], [5, 9], 1), ([6], [7], [7, 9], 0)]}
    seconds, stall = ondemand_timeline(p, layers, reads, runs, eb)
    # token 0: 2 + 1 (attn 0) + 20 (two loads) + 2 (experts) + 1 (attn 1) -> prefetch of 5 was
    # issued at 23 ms, done at 33: wait 7 ms; then 2 ms of experts: 35 ms, 27 ms stalled.
    # token 1: 2 + 1 + 0 + 2 + 1 = 41 ms; the prefetch of 6 issued at 38 ms reads until 48:
    # the demand load of 7 starts then, done at 58 (17 ms stalled); + 2 = 60 ms.
    assert seconds == pytest.approx(60e-3 / 2)
    assert stall == pytest.approx((27e-3 + 17e-3) / 2)
    # Two unneeded prefetches (n_prefetch 2): 6 is reading when layer 1 is reached, 8 is still
    # queued behind it and is cancelled, so the demand load of 7 waits for 6 only.
    reads[1][1] = ([6, 8], [7], [7, 9], 0)
    assert ondemand_timeline(p, layers, reads, runs, eb)[0] == pytest.approx(60e-3 / 2)


def test_planner_swap_replay_tracks_the_policy(topics):
    """The swap replay and the real SwapPolicy (reads effectively instant) agree closely."""
    from test_residency import FakePool, run_masked

    slots = {l: 6 for l in topics.layers}
    norms = {l: np.ones(16) for l in topics.layers}
    replay = simulate_swap(topics, slots, 2, norms, interval=8, max_swaps=2, read_tokens=0.0)
    pool = FakePool(slots)
    with SwapPolicy(pool, slots, 16, 2, norms=norms, interval=8, max_swaps=2) as pol:
        pol.warm()
        orig = pol.end_step
        def end_step(n=1):   # let each window's reads finish, as read_tokens=0 assumes
            rec = orig(n); pol.wait_idle(); return rec
        pol.end_step = end_step
        run_masked(pol, pool, topics)
        c = pol.telemetry.counters
    assert replay.hits == c.hits and replay.swaps == c.swaps


def test_planner_predictions_order_and_interval(topics):
    eb = {l: 4 * MiB for l in topics.layers}
    norms = {l: np.ones(16) for l in topics.layers}
    prof = _profile(topics.layers)
    slots = allocate_for("ondemand", topics, 2, eb, 3 * 8 * 4 * MiB)
    assert sum(slots.values()) <= 24
    full = predict("full", topics, slots, 2, prof, eb)
    ond = predict("ondemand", topics, slots, 2, prof, eb, n_prefetch=1)
    assert full.tok_per_s == pytest.approx(1 / (5e-3 + 3 * (2e-3 + 2e-3)))
    assert ond.tok_per_s < full.tok_per_s and ond.stall_per_token > 0
    assert ond.hit_rate < 1 and ond.bytes_read_per_token > 0
    # Faster storage: fewer stalls.
    fast = predict("ondemand", topics, slots, 2, _profile(topics.layers, 1.5e9), eb, n_prefetch=1)
    assert fast.tok_per_s > ond.tok_per_s
    swap = predict("swap", topics, slots, 2, prof, eb, norms, max_swaps=2)
    assert swap.tok_per_s == pytest.approx(full.tok_per_s) and swap.hit_rate < 1
    # The schedule is the chooser's for reads as long as the profile says.
    read_tokens = prof.read_seconds(4 * MiB) / full.seconds_per_token
    chosen = choose_swap_schedule(topics, slots, 2, norms, 2, read_tokens)
    assert (swap.swap_interval, swap.swap_decay) == (chosen.interval, chosen.decay)
    assert swap.coverage == chosen.replay.coverage
    assert swap.line().startswith("swap") and "swap every" in swap.line()
    with pytest.raises(ValueError, match="unknown policy"):
        predict("lru", topics, slots, 2, prof, eb)


def test_swap_schedule_keeps_the_most_router_mass_resident():
    """The chooser replays every (interval, decay) and keeps the best coverage: on routing that
    changes topic every 16 tokens, with reads lasting 2 decode steps, windows of 1 token swap on
    noise and route around reads in flight, windows of 64 miss topic changes; the winner is a
    middle interval whose coverage no candidate beats."""
    trace = topic_trace(2, 16, 1024, n_topics=2, switch_every=16, sharpness=4.0, seed=3)
    slots = {l: 6 for l in trace.layers}
    norms = {l: np.ones(16) for l in trace.layers}
    chosen = choose_swap_schedule(trace, slots, 2, norms, 4, read_tokens=2.0)
    assert set(chosen.tried) == {(i, d) for i in SWAP_INTERVALS for d in SWAP_DECAYS}
    cover = {key: r.coverage for key, r in chosen.tried.items()}
    assert cover[(chosen.interval, chosen.decay)] == max(cover.values())
    assert chosen.interval not in (1, 64)
    assert cover[(chosen.interval, chosen.decay)] > max(cover[(1, 0.0)], cover[(64, 0.0)]) + 0.02
    # Each candidate's score is the replay of the real policy with that schedule.
    again = simulate_swap(trace, slots, 2, norms, chosen.interval, 4, 2.0, decay=chosen.decay)
    assert again == chosen.replay
    # Reads in flight cost coverage: the same short schedule with instant reads covers more.
    instant = simulate_swap(trace, slots, 2, norms, 1, 4, 0.0)
    assert instant.coverage > cover[(1, 0.0)]
    assert "16 tok" in chosen.line() and "swap schedule" in chosen.line()


def test_swap_schedule_without_drift_reads_least():
    """Routing that never leaves the initial set: every schedule covers all of the top-k mass,
    and the tie goes to the longest interval (fewest reads) and no decay."""
    rng = np.random.default_rng(0)
    logits = np.full((256, 8), -30.0)
    logits[:, :4] = rng.standard_normal((256, 4))
    probs = {l: np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True) for l in (0, 1)}
    trace = RoutingTrace(probs, {l: np.ones(256, np.float32) for l in (0, 1)}, {})
    usage = {l: np.array([9, 8, 7, 6, 0, 0, 0, 0]) for l in (0, 1)}
    chosen = choose_swap_schedule(trace, {0: 4, 1: 4}, 2, {l: np.ones(8) for l in (0, 1)}, 2,
                                  1.0, usage)
    assert all(r.coverage == pytest.approx(1.0) for r in chosen.tried.values())
    assert (chosen.interval, chosen.decay, chosen.replay.swaps) == (64, 0.0, 0)


def test_plan_chooses_the_fastest_prefetch_depth(topics):
    """Left to itself the planner prefetches when the predictor is right and reads are cheap
    next to compute, and not when the predictor guesses and storage is the bottleneck."""
    eb = {l: 4 * MiB for l in topics.layers}
    needs = MemoryNeeds(base_bytes=100 * MiB, kv_bytes=10 * MiB, compute_bytes=10 * MiB,
                        expert_bytes=eb, n_expert=16, n_expert_used=2)
    budget = parse_budget("50%")
    layers = topics.layers
    exact = RoutingTrace(topics.probs, topics.x_norm,
                         {l: np.log(topics.probs[l]) for l in layers[1:]})
    rng = np.random.default_rng(1)
    guess = RoutingTrace(topics.probs, topics.x_norm,
                         {l: rng.normal(size=topics.probs[l].shape) for l in layers[1:]})
    fast = Profile(read_bytes_per_s=2e9, read_latency_s=1e-4, layer_seconds={l: 2e-3 for l in layers},
                   expert_seconds={l: 1e-3 for l in layers}, other_seconds=5e-3)
    slow = _profile(layers, 40e6)
    for trace, profile, prefetches in ((exact, fast, True), (guess, slow, False)):
        preds, lines = plan(budget, needs, trace, profile)
        ond = [p for p in preds if p.policy == "ondemand"][0]
        tried = {d: predict("ondemand", trace, allocate_for("ondemand", trace, 2, eb, 96 * MiB, d),
                            2, profile, eb, n_prefetch=d, prompt_tokens=32, decode_tokens=256)
                 for d in (0, 1, 2)}
        assert ond.tok_per_s == pytest.approx(max(p.tok_per_s for p in tried.values()))
        assert (ond.n_prefetch > 0) == prefetches, lines
        assert "prefetch depth 0: " in ond.line()
        fixed, _ = plan(budget, needs, trace, profile, n_prefetch=1)
        assert [p for p in fixed if p.policy == "ondemand"][0].n_prefetch == 1


def test_trace_roundtrip(tmp_path, topics):
    topics.save(tmp_path / "trace.npz")
    back = RoutingTrace.load(tmp_path / "trace.npz")
    assert back.layers == topics.layers and back.predicted.keys() == topics.predicted.keys()
    np.testing.assert_array_equal(back.probs[1], topics.probs[1])


def test_telemetry_counts_from_threads():
    import threading

    tel = Telemetry()
    threads = [threading.Thread(target=lambda: [tel.add(loads=1, bytes_read=10)
                                                for _ in range(1000)]) for _ in range(4)]
    [t.start() for t in threads]; [t.join() for t in threads]
    tel.add(layer_steps=2, experts_run=3, hits=2, misses=1)
    rec = tel.token_done(2)
    assert rec["loads"] == 4000 and rec["bytes_read_per_token"] == 20000
    assert rec["experts_per_token"] == 1.5 and rec["hit_rate"] == pytest.approx(2 / 3)
    assert tel.token_done(1)["loads"] == 0            # records are per step, counters per run
    assert tel.counters.loads == 4000


def test_plan_report(topics):
    from edgemoe.residency.planner import plan

    eb = {l: 4 * MiB for l in topics.layers}
    needs = MemoryNeeds(base_bytes=100 * MiB, kv_bytes=10 * MiB, compute_bytes=10 * MiB,
                        expert_bytes=eb, n_expert=16, n_expert_used=2)
    norms = {l: np.ones(16) for l in topics.layers}
    preds, lines = plan(parse_budget("50%"), needs, topics, _profile(topics.layers), norms)
    assert [p.policy for p in preds] == ["static", "swap", "ondemand"]
    assert lines[0].startswith("budget 50% of expert bytes: 96 MiB for expert slots of 192 MiB")
    assert "reads 8 MiB" in lines[0]
    assert "full      does not fit" in lines[1]
    for p in preds:
        assert sum(p.slots[l] * eb[l] for l in p.slots) <= 96 * MiB
    preds, _ = plan(parse_budget("1GiB"), needs, topics, _profile(topics.layers), None)
    assert [p.policy for p in preds] == ["full", "static", "ondemand"]
    with pytest.raises(BudgetError, match="minimum"):
        plan(parse_budget("100MiB"), needs, topics, _profile(topics.layers), norms)


# -- the split between substitutes and full slots ----------------------------------------------
def _tier_case(first, second, w_first, n_tokens=512, n_expert=8, seed=0):
    """Two layers whose every token picks `first(t)` with weight w_first and `second(t)` with
    the rest (probabilities: the two, a trace of the rest near zero)."""
    rng = np.random.default_rng(seed)
    probs = {}
    for l in (0, 1):
        p = np.full((n_tokens, n_expert), 1e-6)
        for t in range(n_tokens):
            p[t, first(t, rng)] = w_first
            p[t, second(t, rng)] = 1.0 - w_first
        probs[l] = p / p.sum(axis=1, keepdims=True)
    return RoutingTrace(probs, {l: np.ones(n_tokens, np.float32) for l in (0, 1)}, {})


def _tier_needs(n_expert=8):
    return MemoryNeeds(base_bytes=MiB, kv_bytes=MiB, compute_bytes=MiB,
                       expert_bytes={0: 8 * MiB, 1: 8 * MiB}, n_expert=n_expert,
                       n_expert_used=2)


def test_tier_split_substitutes_when_they_save_drops():
    """fast (never waits while something else can run): the first expert is always 0, the
    second one of the other 7 at random with 30% of the weight. Substitutes at 1/8 of an
    expert: with 3 experts' bytes per layer, 8 substitutes fit beside 2 full slots and serve
    every second choice; with none, 3 full slots leave most second choices to drop. The
    planner replays each count and takes every substitute; counts with fewer drop more."""
    from edgemoe.residency.planner import choose_tier_split, nominal_profile

    trace = _tier_case(lambda t, r: 0, lambda t, r: int(r.integers(1, 8)), 0.7)
    needs = _tier_needs()
    sub = {0: MiB, 1: MiB}
    split = choose_tier_split(trace, needs, 2 * 3 * 8 * MiB, sub,
                              nominal_profile(needs.expert_bytes), "fast",
                              {0: 1.0, 1: 1.0}, math.inf)
    assert [c.count for c in split.tried] == list(range(9))
    assert split.chosen.count == 8 and split.substitutes == {0: 8, 1: 8}
    assert split.slots == {0: 2, 1: 2}
    best = split.chosen.replay
    assert best.dropped_share == pytest.approx(0.0) and best.waits <= 2 * 2
    # The second full slot holds the last second choice (its fill): 1 in 7 repeats hit it.
    assert best.substitute_share == pytest.approx(0.3 * 6 / 7, abs=0.01)
    assert best.served_share == pytest.approx(1.0)
    none = split.tried[0].replay
    assert none.dropped_share > 0.15 and none.substitute_share == 0
    shares = [c.replay.served_share for c in split.tried]
    assert shares == sorted(shares)          # each substitute more serves more
    assert "8 substitutes per layer" in split.line() and "0: " in split.line()


def test_tier_split_keeps_full_slots_for_a_working_set():
    """balanced with a wait threshold every miss reaches: tokens use experts 0-3 with equal
    weights. Substitutes at 80% of an expert (the bundled model's Q4_0 beside Q5_0) and 4
    experts' bytes per layer: 4 full slots hold the working set and never wait after the first
    reads; 2 substitutes leave 2 full slots, which the substitutes' own background fills keep
    turning over, so the uncovered experts wait. Both serve all the weight: the faster wins."""
    from edgemoe.residency.planner import choose_tier_split, nominal_profile

    trace = _tier_case(lambda t, r: t % 4, lambda t, r: (t + 1 + t // 4) % 4 if (t // 4) % 3
                       else (t + 2) % 4, 0.5)
    needs = _tier_needs()
    sub = {0: int(6.4 * MiB), 1: int(6.4 * MiB)}
    split = choose_tier_split(trace, needs, 2 * 4 * 8 * MiB, sub,
                              nominal_profile(needs.expert_bytes), "balanced",
                              {0: 1.0, 1: 1.0}, 0.0)
    assert [c.count for c in split.tried] == [0, 1, 2]
    assert split.chosen.count == 0 and split.substitutes is None
    assert split.slots == {0: 4, 1: 4}
    assert split.chosen.replay.waits == 2 * 4        # the cold fills only
    assert all(c.replay.served_share == pytest.approx(1.0) for c in split.tried)
    assert split.tried[2].replay.waits > 10 * split.chosen.replay.waits
    assert split.tried[2].seconds_per_token > split.chosen.seconds_per_token
