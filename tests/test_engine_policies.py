"""The engine's two routing shapes driven by residency policies (edgemoe.residency): exact
routing (per-layer graphs, experts loaded on demand) and masked routing (swap)."""
from __future__ import annotations

import numpy as np
import pytest

from tiny_models import make_tiny_shards

pytest.importorskip("transformers")

from edgemoe.engine import Engine  # noqa: E402
from edgemoe.errors import EdgeMoeError  # noqa: E402
from edgemoe.residency.policies import OnDemandPolicy, SwapPolicy  # noqa: E402

PROMPT = [5, 9, 33, 2, 100, 7, 8, 61, 12, 90, 4, 77, 3, 19]
N_GEN = 24


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    return {arch: make_tiny_shards(arch, root, "Q8_0", seed=4) for arch in ("qwen3_moe", "qwen2_moe")}


def _greedy(engine: Engine, n: int = N_GEN) -> list[int]:
    row = engine.eval(PROMPT)[-1]
    out = []
    for _ in range(n):
        out.append(int(row.argmax()))
        row = engine.eval([out[-1]])[-1]
    return out


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_exact_routing_equals_one_graph(shard_sets, arch):
    with Engine(shard_sets[arch], n_ctx=64, n_threads=1) as full:
        want = full.eval(PROMPT)
        want_step = full.eval([11])
    with Engine(shard_sets[arch], n_ctx=64, n_threads=1, routing="exact") as exact:
        assert np.array_equal(exact.eval(PROMPT), want)
        assert np.array_equal(exact.eval([11]), want_step)
        assert set(exact.selected) == set(exact.pool.layers)
        assert exact.selected[0].shape == (1, exact.hparams.n_expert_used)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("n_prefetch", [0, 1])
def test_ondemand_at_half_the_experts_is_lossless(shard_sets, arch, n_prefetch):
    """2 of 4 expert slots per layer: a 14-token prompt needs every expert, so the prefill runs
    in groups (the shared expert of qwen2_moe must be added once); decode loads misses."""
    with Engine(shard_sets[arch], n_ctx=64, n_threads=1) as full:
        want = _greedy(full)
    engine = Engine(shard_sets[arch], n_ctx=64, n_threads=1, routing="exact", n_slots=2,
                    load_experts=False)
    try:
        hp = engine.hparams
        policy = OnDemandPolicy(engine.pool, {l: 2 for l in engine.pool.layers}, hp.n_expert,
                                hp.n_expert_used, n_prefetch=n_prefetch)
        engine.set_policy(policy)
        assert _greedy(engine) == want
        assert engine.pool.loads > 2 * len(engine.pool.layers)  # experts were swapped in and out
        assert all(len(engine.pool.resident(l)) <= 2 for l in engine.pool.layers)
        assert engine.last_step["tokens"] == 1
    finally:
        engine.close()


def test_swap_runs_only_resident_experts(shard_sets):
    engine = Engine(shard_sets["qwen3_moe"], n_ctx=64, n_threads=1, routing="masked", n_slots=2,
                    load_experts=False)
    try:
        layers = engine.pool.layers
        norms = {l: np.ones(engine.hparams.n_expert) for l in layers}
        policy = SwapPolicy(engine.pool, {l: 2 for l in layers}, engine.hparams.n_expert,
                            engine.hparams.n_expert_used, norms=norms, interval=2)
        engine.set_policy(policy)
        row = engine.eval(PROMPT)[-1]
        for _ in range(N_GEN):
            tables = {l: policy.slot_of(l) for l in layers}
            row = engine.eval([int(row.argmax())])[-1]
            for l in layers:
                chosen = engine.selected[l]
                assert (tables[l][chosen] >= 0).all()  # every selected expert was routable
                assert engine.router_logits[l].shape == (1, engine.hparams.n_expert)
            assert engine.last_step["absent_selected"] == 0
    finally:
        engine.close()


def test_policy_must_match_the_routing(shard_sets):
    with Engine(shard_sets["qwen3_moe"], n_ctx=16, n_threads=1, routing="masked", n_slots=2,
                load_experts=False) as engine:
        policy = OnDemandPolicy(engine.pool, {l: 2 for l in engine.pool.layers}, 4, 2)
        try:
            with pytest.raises(EdgeMoeError, match="needs exact routing"):
                engine.set_policy(policy)
        finally:
            policy.close()
    with Engine(shard_sets["qwen3_moe"], n_ctx=16, n_threads=1) as engine:
        with pytest.raises(EdgeMoeError, match="masked or exact"):
            engine.set_policy(object())
