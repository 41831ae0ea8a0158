"""Synthetic models of real shapes written straight into quantized blocks (scripts/synthetic_gguf.py,
make_synthetic.py --preset): sane blocks, a shard set edgemoe runs and a GGUF llama.cpp runs with
the same weights, and routers whose routing on text has the locality the design promises."""
from __future__ import annotations

import dataclasses

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import synthetic_gguf as sg  # noqa: E402
from edgemoe import quant  # noqa: E402
from edgemoe.residency.traces import (SelectionTrace, locality, lru_stack_distances,  # noqa: E402
                                      reuse_distances)

TINY = dict(arch="qwen3_moe", n_layer=2, n_expert=16, n_expert_used=4, n_embd=256, n_ff_exp=256,
            n_head=4, n_head_kv=2, head_dim=128, n_vocab=2048)


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0"])
def test_random_blocks_have_the_scale_asked(kind):
    rng = np.random.default_rng(0)
    make = sg.q4_k_blocks if kind == "Q4_K" else sg.q8_0_blocks
    n_per = 256 if kind == "Q4_K" else 32
    blocks = make(rng, 4000, 0.05)
    x = quant.dequantize(blocks.reshape(-1), kind, (4000, n_per))   # ggml's own decoding
    assert x.std() == pytest.approx(0.05, rel=0.05)
    assert abs(x.mean()) < 0.002
    assert np.isfinite(x).all()


def test_presets_are_the_public_shapes():
    q = sg.PRESETS["qwen3-30b-a3b"]
    assert (q.n_layer, q.n_expert, q.n_expert_used, q.n_embd, q.n_ff_exp, q.n_head, q.n_head_kv,
            q.head_dim, q.n_vocab) == (48, 128, 8, 2048, 768, 32, 4, 128, 151936)
    assert 16e9 < q.expert_bytes() < 17e9          # 15.2 GiB of Q4_K experts
    o = sg.PRESETS["olmoe-1b-7b"]
    assert (o.n_layer, o.n_expert, o.n_expert_used, o.n_embd, o.n_ff_exp, o.n_head_kv,
            o.n_vocab) == (16, 64, 8, 2048, 1024, 16, 50304)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic.py"), "/tmp/x",
                          "--preset", "qwen3-30b-a3b", "--dry-run"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "15.19 GiB as Q4_K" in out.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    spec = sg.QuantSpec(**TINY)
    sg.write_synthetic(spec, root / "shards", root / "model.gguf")
    return spec, root / "shards", root / "model.gguf"


def _prediction(shards: Path, tokens: np.ndarray, spec) -> dict[int, np.ndarray]:
    """The design's routing computed from the file's weights: layer 0's recency attention over
    the token codes by its closed form, then each router on (code, summary)."""
    from gguf import GGUFReader

    reader = GGUFReader(shards / "base.gguf")
    t = {x.name: x for x in reader.tensors}
    emb = t["token_embd.weight"]
    n_vocab, h = int(emb.shape[1]), int(emb.shape[0])
    e = quant.dequantize(np.asarray(emb.data).reshape(-1), emb.tensor_type.name,
                         (n_vocab, h))[tokens]
    d, r, n = spec.routing, spec.routing.code_dims, len(tokens)
    theta = spec.rope_theta ** (-2 * np.arange(d.pairs[0], d.pairs[1] + 1) / spec.head_dim)
    score = d.recency * np.cos(np.arange(n)[:, None] * theta).sum(1)    # by distance
    att = np.full((n, n), -np.inf)
    for i in range(n):
        att[i, :i + 1] = score[i - np.arange(i + 1)]
    att = np.exp(att - att.max(1, keepdims=True))
    att /= att.sum(1, keepdims=True)
    norm = e / np.sqrt((e ** 2).mean(1, keepdims=True) + 1e-6)
    summary = att @ norm[:, :r]
    out = {}
    for layer in range(spec.n_layer):
        g = np.asarray(t[f"blk.{layer}.ffn_gate_inp.weight"].data).reshape(spec.n_expert, h)
        z = e[:, :r] @ g[:, :r].T + summary @ g[:, r:2 * r].T
        out[layer] = np.sort(np.argsort(-z, 1)[:, :spec.n_expert_used], 1)
    return out


def test_engine_routes_as_designed(tiny):
    import routing_locality

    from edgemoe.engine import Engine

    spec, shards, _ = tiny
    tokens = np.random.default_rng(1).integers(0, 2000, 192)
    with Engine(shards, n_ctx=256, n_threads=1) as engine:
        trace = routing_locality.record_selections(engine, list(tokens), 192, 1)
    want = _prediction(shards, tokens, spec)
    for layer, ids in trace.ids.items():
        same = (np.sort(ids, 1) == want[layer]).all(1).mean()
        assert same > 0.95, (layer, same)     # Q8_0 rounding flips a few near-ties


def test_llama_cpp_runs_the_same_weights(tiny):
    llama_cpp = pytest.importorskip("llama_cpp")
    from edgemoe.engine import Engine

    _, shards, gguf = tiny
    tokens = list(range(5, 69))
    llm = llama_cpp.Llama(str(gguf), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    llm.eval(tokens)
    theirs = np.array(llm.scores[:len(tokens)])
    llm.close()
    with Engine(shards, n_ctx=128, n_threads=1) as engine:
        ours = engine.eval(tokens)
    spread = ours.max() - ours.min()
    assert np.abs(theirs - ours).max() < 0.02 * spread
    assert (theirs.argmax(1) == ours.argmax(1)).mean() > 0.9


def test_only_the_routers_change_with_reuse_experts(tiny, tmp_path):
    spec, shards, _ = tiny
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    before = {p.name: p.stat().st_mtime_ns for p in (copy / "experts").iterdir()}
    other = sg.QuantSpec(**TINY, routing=sg.RoutingDesign(context_weight=2.0))
    sg.write_synthetic(other, copy, reuse_experts=True)
    after = {p.name: p.stat().st_mtime_ns for p in (copy / "experts").iterdir()}
    assert before == after
    from edgemoe.shardset import ShardSet

    ShardSet.open(copy).verify()           # the manifest matches the rewritten base


def test_reuse_and_lru_distances_by_hand():
    ids = np.array([[0, 1], [1, 2], [0, 3], [1, 2]])
    assert reuse_distances(ids).tolist() == [[0, 0], [1, 0], [2, 0], [2, 2]]
    assert lru_stack_distances(ids).tolist() == [[-1, -1], [0, -1], [2, -1], [3, 3]]
    loc = locality({0: ids}, 4, windows=(1, 2), fractions=(0.5, 1.0), warmup=1,
                   touched_after=(2,))
    assert loc.reuse == {1: pytest.approx(1 / 6), 2: pytest.approx(3 / 4)}
    assert loc.lru_hit == {0.5: pytest.approx(1 / 6), 1.0: pytest.approx(4 / 6)}
    assert loc.touched == {2: 3.0}


def test_selection_trace_round_trip(tmp_path):
    ids = {3: np.array([[1, 2], [2, -1]], dtype=np.int32)}
    w = {3: np.array([[0.6, 0.4], [1.0, 0.0]], dtype=np.float32)}
    SelectionTrace(ids, w).save(tmp_path / "t.npz")
    back = SelectionTrace.load(tmp_path / "t.npz")
    assert back.n_tokens == 2
    np.testing.assert_array_equal(back.ids[3], ids[3])
    np.testing.assert_array_equal(back.weights[3], w[3])
    np.savez(tmp_path / "bad.npz", **{"ids.0": ids[3]})
    with pytest.raises(ValueError, match="ids.L and weights.L"):
        SelectionTrace.load(tmp_path / "bad.npz")


def test_synthetic_routing_has_real_locality(tmp_path):
    """The 30B shape's router design, on 4 layers x 128 experts top-8, routes the bundled
    held-out text within the published Qwen3-30B-A3B ranges."""
    import routing_locality

    spec = sg.preset("qwen3-30b-a3b", n_layer=4, n_embd=512, n_ff_exp=256, n_vocab=4096)
    sg.write_synthetic(spec, tmp_path / "s")
    loc, _, _ = routing_locality.measure(tmp_path / "s", n_ctx=512, n_chunks=4, verbose=False)
    assert 0.38 <= loc.reuse[1] <= 0.47
    assert 0.75 <= loc.reuse[8] <= 0.85
    assert 0.88 <= loc.lru_hit[0.4] <= 0.96


def test_replay_forces_a_recorded_routing(tiny):
    import routing_locality

    from edgemoe.errors import EdgeMoeError
    from edgemoe.residency.traces import ReplayPolicy
    from edgemoe.runtime import ResidencyConfig, open_engine

    spec, shards, _ = tiny
    tokens = list(np.random.default_rng(2).integers(0, 2000, 64))
    cfg = ResidencyConfig(memory_budget="50%", policy="ondemand")
    engine, _ = open_engine(shards, cfg, n_ctx=128, n_threads=1)
    with engine:
        own = routing_locality.record_selections(engine, tokens, 64, 1)   # the model's routing
        engine.reset()
        want = engine.eval(tokens)
    # The model's own trace replayed: the same run.
    engine, _ = open_engine(shards, cfg, n_ctx=128, n_threads=1)
    with engine:
        engine.policy = ReplayPolicy(engine.policy, own)
        np.testing.assert_allclose(engine.eval(tokens), want, rtol=1e-5, atol=1e-5)
    # Another routing: every token on experts 0..k-1, which then always hit. Without prefetch:
    # a prefetch follows the model's own router, and one that starts reading before the layer
    # runs may evict a forced expert (a misprediction's cost, not the replay's).
    k = spec.n_expert_used
    forced = SelectionTrace({l: np.tile(np.arange(k, dtype=np.int32), (64, 1)) for l in own.ids},
                            {l: np.full((64, k), 1 / k, np.float32) for l in own.ids})
    engine, _ = open_engine(shards, dataclasses.replace(cfg, n_prefetch=0), n_ctx=128,
                            n_threads=1)
    with engine:
        engine.policy = ReplayPolicy(engine.policy, forced)
        before = engine.policy.telemetry.counters
        engine.eval(tokens[:8])
        for t in tokens[8:24]:
            engine.eval([t])
        c = engine.policy.telemetry.counters - before
        assert not np.allclose(engine.eval(tokens[24:25]), want[24:25])
        assert c.misses <= k * spec.n_layer            # loaded once, then resident
        engine.policy = engine.policy.inner
    engine, _ = open_engine(shards, ResidencyConfig(memory_budget="50%", policy="swap"),
                            n_ctx=128, n_threads=1)
    with engine, pytest.raises(EdgeMoeError, match="exact-routing"):
        ReplayPolicy(engine.policy, own)
