"""The substitute tier: low-bit copies of the experts (`convert --substitute-type`) kept resident
beside full-precision slots, so a masked policy runs an absent expert's substitute instead of
redirecting the token to another expert."""
from __future__ import annotations

import numpy as np
import pytest

from tiny_models import make_tiny_checkpoint

pytest.importorskip("transformers")

import converters  # noqa: E402
from edgemoe.engine import Engine  # noqa: E402
from edgemoe.errors import EdgeMoeError  # noqa: E402
from edgemoe.residency.policies import OnDemandPolicy, StaticPolicy  # noqa: E402
from edgemoe.runtime import ResidencyConfig, open_engine  # noqa: E402

TOKENS = [5, 9, 33, 2, 100, 7, 8, 61, 12, 90, 4, 77]


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """qwen3_moe (4 experts, top-2) with Q8_0 experts, and substitutes at Q8_0 (the same bytes:
    an exact oracle) and at Q4_0."""
    root = tmp_path_factory.mktemp("substitutes")
    ckpt = make_tiny_checkpoint("qwen3_moe", root / "hf", seed=3)
    for sub in ("Q8_0", "Q4_0"):
        converters.convert(ckpt, root / sub, expert_type="Q8_0", dense_type="Q8_0",
                           substitute_type=sub, progress=False)
    return root


def _static(path, substitutes: bool):
    """Two full slots per layer (experts 2 and 3), and every expert's substitute or none."""
    def policy(pool):
        return StaticPolicy(pool, {l: 2 for l in pool.layers}, 4, 2,
                            scores={l: np.arange(4.0) for l in pool.layers},
                            substitutes={l: 4 for l in pool.layers} if substitutes else None)
    engine = Engine(path, n_ctx=32, n_threads=1, kv_type="f32", n_slots=2, policy=policy,
                    n_substitutes={0: 4, 1: 4} if substitutes else None)
    with engine:
        return engine.eval(TOKENS), engine.policy.telemetry.counters


def _relerr(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_substitutes_run_in_place_of_absent_experts(shard_sets):
    with Engine(shard_sets / "Q8_0", n_ctx=32, n_threads=1, kv_type="f32") as full:
        want = full.eval(TOKENS)
    # Substitutes of the same type are the experts themselves: the two tiers together are the
    # whole model, so the split graph must give the full model's logits.
    same, c = _static(shard_sets / "Q8_0", True)
    assert _relerr(same, want) < 1e-6
    assert c.substituted > 0 and c.redirects == 0 and c.absent_selected == 0
    assert c.hits + c.substituted == c.experts_run
    # Q4_0 substitutes: not exact, far closer than redirecting tokens to resident experts.
    low, c = _static(shard_sets / "Q4_0", True)
    redirected, r = _static(shard_sets / "Q4_0", False)
    assert 0 < _relerr(low, want) < 0.25 * _relerr(redirected, want)
    assert r.substituted == 0 and r.redirects > 0


def test_a_budget_is_split_between_substitutes_and_full_slots(shard_sets):
    cfg = ResidencyConfig(memory_budget="75%", policy="static")
    engine, plan = open_engine(shard_sets / "Q4_0", cfg, n_ctx=32, n_threads=1)
    with engine:
        needs = engine.memory_needs
        allowance = int(0.75 * needs.expert_bytes_total)
        assert plan.substitutes and all(n >= 1 for n in plan.substitutes.values())
        assert all(n >= 2 for n in plan.slots.values())
        assert plan.slot_bytes <= allowance
        assert engine.memory()["expert_slots"] <= plan.slot_bytes   # shards pad each tensor
        engine.eval(TOKENS)
        assert engine.policy.telemetry.counters.absent_selected == 0
        assert "substitutes" in engine.policy.telemetry.summary()
    # Opted out, or too small a budget for one substitute beside top-k slots: none.
    for cfg in (ResidencyConfig(memory_budget="75%", policy="static", substitutes=False),
                ResidencyConfig(memory_budget="50%", policy="static")):
        engine, plan = open_engine(shard_sets / "Q4_0", cfg, n_ctx=32, n_threads=1)
        with engine:
            assert plan.substitutes is None and not engine.pool.substitutes


def test_a_substitute_tier_needs_a_policy_that_uses_it(shard_sets):
    with pytest.raises(EdgeMoeError, match="substitute tier"):
        Engine(shard_sets / "Q4_0", n_ctx=16, n_threads=1, n_substitutes={0: 1, 1: 1},
               policy=lambda pool: OnDemandPolicy(pool, {l: 4 for l in pool.layers}, 4, 2))
