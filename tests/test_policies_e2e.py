"""Residency policies on the real engine: ondemand is lossless, swap only ever runs resident experts
and adapts when the input changes, budgets below the minimum are refused before any expert is read,
and unreadable shards are handled (swap warns once and carries on, ondemand stops naming the shard,
nothing hangs)."""
from __future__ import annotations

import shutil
import threading
import warnings

import numpy as np
import pytest

from tiny_models import ARCHS, expert_count_key, greedy_tokens, make_tiny_checkpoint

pytest.importorskip("transformers")

import converters  # noqa: E402
from edgemoe.engine import Engine  # noqa: E402
from edgemoe.errors import BudgetError, ShardSetError  # noqa: E402
from edgemoe.residency.observer import EngineObserver  # noqa: E402
from edgemoe.runtime import ResidencyConfig, empty_policy, needs_from_files, open_engine  # noqa: E402
from edgemoe.shardset import ShardSet  # noqa: E402

PROMPT = [5, 9, 33, 2, 100, 7, 8, 61, 12, 90, 4, 77]
N_DECODE = 64
# 8 experts, top-2: 50% of expert bytes is 4 slots per layer, 25% is 2 (= top-k).
EXPERTS = {arch: {expert_count_key(arch): 8} for arch in ARCHS}


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    out = {}
    for arch, experts in EXPERTS.items():
        ckpt = make_tiny_checkpoint(arch, root / f"{arch}_hf", seed=5, **experts)
        out[arch] = root / arch
        converters.convert(ckpt, out[arch], expert_type="F32", dense_type="F32", progress=False)
    return out


def _open(path, **cfg):
    # One thread: the suite shares two cores, and ggml's spinning workers suffer when oversubscribed.
    return open_engine(path, ResidencyConfig(**cfg), n_ctx=256, n_threads=1)


def _greedy(engine, prompt=PROMPT, n=N_DECODE, records=None):
    return greedy_tokens(engine, prompt, n, records)


@pytest.mark.parametrize("arch", sorted(EXPERTS))
def test_ondemand_is_lossless(shard_sets, arch):
    """ondemand at 50% and 25% of expert bytes, with and without prefetch, gives
    exactly the greedy continuation of full."""
    engine, _ = _open(shard_sets[arch])
    with engine:
        want = _greedy(engine)
    for budget, slots in (("50%", 4), ("25%", 2)):
        for n_prefetch in (0, 1):
            engine, plan = _open(shard_sets[arch], memory_budget=budget, policy="ondemand",
                                 n_prefetch=n_prefetch)
            with engine:
                assert set(plan.slots.values()) == {slots}
                got = _greedy(engine)
                c = engine.policy.telemetry.counters
            assert got == want, f"{arch} ondemand {budget} prefetch={n_prefetch}"
            assert c.misses > 0 and c.loads > c.misses - 1     # it really loaded on demand
            assert (c.prefetch_issued > 0) == (n_prefetch > 0)


@pytest.mark.parametrize("arch", sorted(EXPERTS))
@pytest.mark.parametrize("policy", ["swap", "static"])
def test_masked_policies_run_every_architecture(shard_sets, arch, policy):
    """Routing restricted to resident experts works whatever sits beside them (dense layers,
    shared experts, expert biases): every step selects resident experts only."""
    engine, plan = _open(shard_sets[arch], memory_budget="50%", policy=policy)
    records = []
    with engine:
        out = _greedy(engine, n=16, records=records)
        assert set(plan.slots) == set(engine.hparams.expert_layers)
    assert len(out) == 16 and all(r["absent_selected"] == 0 for r in records)


def test_swap_routes_only_to_resident_experts_and_adapts(shard_sets):
    """With swap every selected expert of every step was resident (the graph's
    own selection audited against the step's slot table), and the resident set moves when the
    input changes topic."""
    engine, plan = _open(shard_sets["qwen3_moe"], memory_budget="50%", policy="swap",
                         swap_interval=4)
    with engine:
        policy = engine.policy
        n_expert = engine.hparams.n_expert
        resident = lambda: {l: frozenset(np.flatnonzero(policy.slot_of(l) >= 0).tolist())
                            for l in policy.layers}
        records = []
        topic_a = [10 + (i * 7) % 40 for i in range(48)]
        topic_b = [250 + (i * 11) % 90 for i in range(48)]
        for tok in topic_a:
            engine.eval([tok])
            records.append(engine.last_step)
        policy.wait_idle()
        after_a = resident()
        for tok in topic_b:
            engine.eval([tok])
            records.append(engine.last_step)
        policy.wait_idle()
        after_b = resident()
        records_gen = []
        _greedy(engine, prompt=[3], n=32, records=records_gen)
        c = policy.telemetry.counters
    assert len(records) == 96 and all(r["absent_selected"] == 0 for r in records + records_gen)
    assert c.absent_selected == 0 and c.layer_steps > 0
    assert c.redirects > 0                # masking was in force: some wanted experts were absent
    assert c.swaps > 0 and after_a != after_b
    assert all(len(s) <= plan.slots[l] < n_expert for l, s in after_b.items())


def test_budgets_below_the_minimum_are_refused_before_any_expert_is_read(shard_sets,
                                                                         monkeypatch):
    from edgemoe.pool import ExpertPool

    reads = []
    monkeypatch.setattr(ExpertPool, "load", lambda self, *a, **k: reads.append(a))
    path = shard_sets["olmoe"]
    with pytest.raises(BudgetError, match=r"minimum of 25%"):
        _open(path, memory_budget="20%", policy="ondemand")
    # Before anything is loaded the compute buffers are unknown: the minimum is a lower bound.
    with pytest.raises(BudgetError, match=r"below the minimum of at least .*runtime .* base .* KV"
                                          r".* compute buffers \(not measured before loading\)"):
        _open(path, memory_budget="1MiB")
    # Just above what the files alone demand: the probe's compute buffers push it below.
    needs = needs_from_files(ShardSet.open(path), 256, "f16")
    with pytest.raises(BudgetError, match=r"below the minimum of (?!at least).* \+ compute [1-9]"):
        _open(path, memory_budget=str(needs.minimum_bytes + 1024), policy="swap")
    with pytest.raises(BudgetError, match="policy full needs every expert"):
        _open(path, memory_budget="50%", policy="full")
    assert reads == []


def test_absolute_budget_bounds_what_the_engine_holds(shard_sets):
    path = shard_sets["qwen3_moe"]
    shards = ShardSet.open(path)
    one = sum(shards.expert(l, 0).data_bytes for l in shards.expert_layers)
    with Engine(path, n_ctx=256, n_slots=2, policy=empty_policy("swap", 2)) as probe:
        compute = probe.memory()["compute"]
    needs = needs_from_files(shards, 256, "f16", compute)
    budget = needs.minimum_bytes + 3 * one + one // 2      # room for about 3 more slots per layer
    engine, plan = _open(path, memory_budget=str(budget), policy="swap")
    with engine:
        held = sum(engine.memory().values())
        assert 2 < min(plan.slots.values()) < shards.n_expert
        assert plan.total_bytes <= budget
        assert engine.memory_needs.runtime_bytes + engine.memory_needs.io_bytes + held <= budget
        _greedy(engine, n=8)


def _in_thread(fn, timeout=120):
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # surfaced to the test below
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "generation hung"
    return result


def test_swap_carries_on_when_shards_become_unreadable(shard_sets, tmp_path):
    path = tmp_path / "set"
    shutil.copytree(shard_sets["qwen3_moe"], path)
    engine, _ = _open(path, memory_budget="50%", policy="swap", swap_interval=2)
    with engine:
        policy = engine.policy
        routable = {l: set(np.flatnonzero(policy.slot_of(l) >= 0).tolist()) for l in policy.layers}
        for s in ShardSet.open(path).experts():
            if s.expert not in routable[s.layer]:
                s.path.unlink()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = _in_thread(lambda: _greedy(engine, n=48))
            policy.wait_idle()
        assert "error" not in result and len(result["value"]) == 48
        swap_warnings = [w for w in caught if issubclass(w.category, RuntimeWarning)
                         and "swap:" in str(w.message)]
        assert len(swap_warnings) == 1 and "cannot be read" in str(swap_warnings[0].message)
        assert policy.telemetry.counters.absent_selected == 0


def test_ondemand_stops_naming_the_unreadable_shard(shard_sets, tmp_path):
    path = tmp_path / "set"
    shutil.copytree(shard_sets["olmoe"], path)
    engine, _ = _open(path, memory_budget="25%", policy="ondemand", n_prefetch=1)
    with engine:
        gone = [s.path for s in ShardSet.open(path).experts()
                if s.layer == 0 and s.expert not in engine.policy.tables[0]]
        for p in gone:
            p.unlink()
        result = _in_thread(lambda: _greedy(engine, n=64))
    assert isinstance(result.get("error"), ShardSetError)
    assert any(str(p) in str(result["error"]) for p in gone)


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe"])
def test_masked_gating_agrees_with_the_numpy_reference(shard_sets, arch):
    """The graph's masked choice equals routing.masked_topk on its own unmasked logits (the
    residency simulations use the latter), also for architectures without renormalisation."""
    from edgemoe.residency.routing import masked_topk, softmax

    class Routed(EngineObserver):
        def routed(self, layer, logits, x_norm, selected):
            self.last[layer] = (logits.copy(), selected.copy())

    seen = Routed()
    seen.last = {}
    engine, _ = _open(shard_sets[arch], memory_budget="50%", policy="static")
    with engine:
        engine.add_observer(seen)
        k = engine.hparams.n_expert_used
        compared = 0
        for tok in PROMPT * 2:
            engine.eval([tok])
            for l in engine.policy.layers:
                mask = engine.policy.slot_of(l) >= 0
                logits, got = seen.last[l]
                want, _ = masked_topk(softmax(logits), mask, k)
                assert np.array_equal(np.sort(got, axis=1), np.sort(want, axis=1))
                compared += got.size
    assert compared == 2 * len(PROMPT) * k * 2


SHAKESPEARE = """\
Shall I compare thee to a summer's day? Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles,
and by opposing end them. To die, to sleep, no more; and by a sleep to say we end
the heart-ache and the thousand natural shocks that flesh is heir to.
"""
PYTHON = """\
import os
import sys

def read_lines(path, encoding="utf-8"):
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\\n") for line in f]

class Counter(dict):
    def __missing__(self, key):
        return 0

    def update(self, items):
        for item in items:
            self[item] += 1
        return self
"""


def test_swap_follows_a_topic_change_on_the_bundled_model(tmp_path):
    """Swap on a trained model whose experts split into a Shakespeare half and a Python
    half: after the text switches, swap brings the other half in (the resident set changes) and
    serves more of what the router wants than static pruning to a fixed half."""
    from pathlib import Path

    from edgemoe.tokenizer import Vocab

    model = Path(__file__).resolve().parent.parent / "models" / "edgemoe-tiny-shakespy"
    if not (model / "model.safetensors").exists():
        pytest.skip("bundled model not present")
    shards = tmp_path / "shakespy"
    converters.convert(model, shards, expert_type="F32", dense_type="F32", progress=False)
    with Vocab(shards / "base.gguf") as vocab:
        text_a, text_b = vocab.tokenize(SHAKESPEARE)[:160], vocab.tokenize(PYTHON, False)[:160]
    hit = {}
    for name in ("swap", "static"):
        engine, _ = open_engine(shards, ResidencyConfig(memory_budget="50%", policy=name,
                                                        swap_interval=4), n_ctx=512, n_threads=1)
        with engine:
            policy = engine.policy
            # Every read completes before the next token (a fast device), so the figures do not
            # depend on thread timing.
            for tok in text_a:
                engine.eval([tok])
                policy.wait_idle()
            after_a = {l: set(np.flatnonzero(policy.slot_of(l) >= 0).tolist())
                       for l in policy.layers}
            records = []
            for tok in text_b:
                engine.eval([tok])
                records.append(engine.last_step)
                policy.wait_idle()
            after_b = {l: set(np.flatnonzero(policy.slot_of(l) >= 0).tolist())
                       for l in policy.layers}
            assert policy.telemetry.counters.absent_selected == 0
        late = records[len(records) // 2:]
        hit[name] = sum(r["hits"] for r in late) / sum(r["hits"] + r["redirects"] for r in late)
        if name == "swap":
            assert after_a != after_b
    assert hit["swap"] > hit["static"] + 0.1, hit


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_dropped_experts_are_left_out_of_the_graph_exactly(shard_sets, arch):
    """A decode step whose gating dropped experts runs a graph of fewer experts per token; its
    logits equal those of the full-width graph with the dropped choices weighted 0 (qwen2_moe
    also has a shared expert)."""
    from edgemoe.residency.policies import OnDemandPolicy

    def dropping(by_weight: bool):
        class Drop(OnDemandPolicy):
            def gate(self, layer, ids, weights, decode):
                ids, weights = np.array(ids), np.array(weights)
                if decode and layer % 2 == 0:     # drop the last-ranked choice
                    if by_weight:
                        weights[:, -1] = 0.0
                    else:
                        ids[:, -1] = -1
                return ids, weights
        return Drop

    runs = []
    for by_weight in (True, False):
        drop = dropping(by_weight)
        engine = Engine(shard_sets[arch], n_ctx=128, n_threads=1, n_slots=8,
                        policy=lambda pool: drop(pool, {l: 8 for l in pool.layers}, 8, 2,
                                                 n_prefetch=0))
        with engine:
            rows = [engine.eval(PROMPT, all_logits=False)[-1]]
            for _ in range(16):
                rows.append(engine.eval([int(np.argmax(rows[-1]))])[-1])
        runs.append(np.stack(rows))
    assert np.abs(runs[0] - runs[1]).max() <= 1e-6 * float(np.ptp(runs[0]))
