"""The engine's two routing shapes driven by residency policies (edgemoe.residency): exact
routing (per-layer graphs, experts loaded on demand) and masked routing (swap)."""
from __future__ import annotations

import numpy as np
import pytest

from tiny_models import greedy_tokens, make_tiny_shards

pytest.importorskip("transformers")

from edgemoe.engine import Engine  # noqa: E402
from edgemoe.residency.observer import EngineObserver  # noqa: E402
from edgemoe.residency.policies import OnDemandPolicy, SwapPolicy  # noqa: E402

PROMPT = [5, 9, 33, 2, 100, 7, 8, 61, 12, 90, 4, 77, 3, 19]
N_GEN = 24


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    return {arch: make_tiny_shards(arch, root, "Q8_0", seed=4) for arch in ("qwen3_moe", "qwen2_moe")}


def _greedy(engine: Engine, n: int = N_GEN) -> list[int]:
    return greedy_tokens(engine, PROMPT, n)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_exact_routing_equals_one_graph(shard_sets, arch):
    with Engine(shard_sets[arch], n_ctx=64, n_threads=1) as full:
        want = full.eval(PROMPT)
        want_step = full.eval([11])
    all_slots = lambda pool: OnDemandPolicy(pool, {l: 4 for l in pool.layers}, 4, 2)
    with Engine(shard_sets[arch], n_ctx=64, n_threads=1, policy=all_slots) as exact:
        assert np.array_equal(exact.eval(PROMPT), want)
        assert np.array_equal(exact.eval([11]), want_step)
        assert exact.last_step["experts_per_token"] == 2.0


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("n_prefetch", [0, 1])
def test_ondemand_at_half_the_experts_is_lossless(shard_sets, arch, n_prefetch):
    """2 of 4 expert slots per layer: a 14-token prompt needs every expert, so the prefill runs
    in groups (the shared expert of qwen2_moe must be added once); decode loads misses."""
    with Engine(shard_sets[arch], n_ctx=64, n_threads=1) as full:
        want = _greedy(full)
    engine = Engine(shard_sets[arch], n_ctx=64, n_threads=1, n_slots=2,
                    policy=lambda pool: OnDemandPolicy(pool, {l: 2 for l in pool.layers}, 4, 2,
                                                       n_prefetch=n_prefetch))
    with engine:
        assert _greedy(engine) == want
        assert engine.pool.loads > 2 * len(engine.pool.layers)  # experts were swapped in and out
        assert all(len(engine.policy.resident(l)) <= 2 for l in engine.pool.layers)
        assert engine.last_step["tokens"] == 1


class _Selected(EngineObserver):
    def __init__(self):
        self.selected, self.logits = {}, {}

    def routed(self, layer, logits, x_norm, selected):
        self.selected[layer], self.logits[layer] = selected.copy(), logits.copy()


def test_swap_runs_only_resident_experts(shard_sets):
    norms = {l: np.ones(4) for l in (0, 1)}
    engine = Engine(shard_sets["qwen3_moe"], n_ctx=64, n_threads=1, n_slots=2,
                    policy=lambda pool: SwapPolicy(pool, {l: 2 for l in pool.layers}, 4, 2,
                                                   norms=norms, interval=2))
    with engine:
        policy, layers = engine.policy, engine.pool.layers
        seen = _Selected()
        engine.add_observer(seen)
        row = engine.eval(PROMPT)[-1]
        for _ in range(N_GEN):
            tables = {l: policy.slot_of(l) for l in layers}
            row = engine.eval([int(row.argmax())])[-1]
            for l in layers:
                assert (tables[l][seen.selected[l]] >= 0).all()  # every selected expert was routable
                assert seen.logits[l].shape == (1, engine.hparams.n_expert)
            assert engine.last_step["absent_selected"] == 0
