"""The substitute tier: low-bit copies of the experts (`convert --substitute-type`) kept resident
beside full-precision slots, so a masked policy runs an absent expert's substitute instead of
redirecting the token to another expert, and ondemand's per-miss decisions (`--quality`) run it
instead of waiting for the expert's read."""
from __future__ import annotations

import math

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
DECODE = TOKENS + [3, 18, 41, 66]


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


# -- ondemand's per-miss decisions (routing.miss_decisions) on the substitute tier --------------

def _decode(path, wait_threshold=None, substitutes=True, n_prefetch=1,
            substitute_threshold=math.inf):
    """Prompt of 4 tokens, then one token per step; (logits of every token, counters of the
    decode steps, policy)."""
    def policy(pool):
        return OnDemandPolicy(pool, {l: 2 for l in pool.layers}, 4, 2, n_prefetch=n_prefetch,
                              sensitivity={l: 1.0 for l in pool.layers},
                              wait_threshold=wait_threshold,
                              substitute_threshold=substitute_threshold,
                              substitutes={l: 4 for l in pool.layers} if substitutes else None)
    with Engine(path, n_ctx=32, n_threads=1, kv_type="f32", n_slots=2, policy=policy,
                n_substitutes={0: 4, 1: 4} if substitutes else None) as engine:
        rows = [engine.eval(DECODE[:4])]
        engine.policy.wait_idle()
        before = engine.policy.telemetry.counters
        for t in DECODE[4:]:
            rows.append(engine.eval([t]))
            engine.policy.wait_idle()   # background fills land between tokens (deterministic)
        return np.concatenate(rows), engine.policy.telemetry.counters - before, engine.policy


def test_threshold_zero_is_exact_bit_for_bit(shard_sets):
    # No prefetch: whether a prefetch lands before the layer asks is a race the counts show.
    exact, ce, _ = _decode(shard_sets / "Q4_0", None, n_prefetch=0)
    zero, cz, _ = _decode(shard_sets / "Q4_0", 0.0, n_prefetch=0, substitute_threshold=0.0)
    assert np.array_equal(exact, zero)
    assert cz.misses == ce.misses > 0 and cz.substituted == cz.dropped == 0


def test_fast_never_waits_and_substitutes_run_in_place(shard_sets):
    with Engine(shard_sets / "Q8_0", n_ctx=32, n_threads=1, kv_type="f32") as full:
        want = full.eval(DECODE)
    got, c, pol = _decode(shard_sets / "Q8_0", math.inf)
    # Q8_0 substitutes are the experts: running them instead of waiting changes nothing.
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-5
    assert c.misses == 0 and c.stall_seconds == 0.0 and c.dropped == 0
    assert c.substituted > 0
    # Every wanted expert was a hit or a substitute; all of them ran.
    assert c.hits + c.substituted == c.layer_steps * 2 == c.experts_run
    # Each substitute run queued its full weights: they arrived for later tokens.
    assert c.loads >= c.substituted // 2 and pol._filling == {l: set() for l in pol.layers}


def test_balanced_substitutes_rather_than_waits(shard_sets):
    # Waiting for every miss without a substitute (none here: all 4 resident) and substituting
    # otherwise never waits in decode, as fast does.
    got, c, _ = _decode(shard_sets / "Q8_0", 0.0)
    assert c.misses == 0 and c.substituted > 0 and c.dropped == 0
    # Without the tier, wait_threshold 0 is exact.
    exact, _, _ = _decode(shard_sets / "Q4_0", None, substitutes=False, n_prefetch=0)
    zero, cz, _ = _decode(shard_sets / "Q4_0", 0.0, substitutes=False, n_prefetch=0)
    assert np.array_equal(exact, zero) and cz.dropped == cz.substituted == 0


def test_drops_mask_only_missing_experts_and_are_counted(shard_sets):
    exact, _, _ = _decode(shard_sets / "Q4_0", None, substitutes=False)
    got, c, _ = _decode(shard_sets / "Q4_0", math.inf, substitutes=False, n_prefetch=0)
    assert c.dropped > 0 and c.substituted == 0
    # Each (token, layer) keeps at least one expert; what ran is what was not dropped.
    assert c.experts_run == c.layer_steps * 2 - c.dropped
    assert c.hits + c.misses + c.dropped == c.layer_steps * 2
    # A wait happens only for a token whose every expert missed (its best then waits).
    assert c.misses <= c.layer_steps
    assert not np.array_equal(got, exact)
    assert np.isfinite(got).all()


def test_quality_knob_sets_the_decisions_and_the_tier(shard_sets, tmp_path):
    import shutil

    from edgemoe.cli_budget import calibrate
    from edgemoe.residency.planner import choose_tier_split, nominal_profile
    from edgemoe.runtime import TRACE_FILE, residency_summary, substitute_bytes
    from edgemoe.shardset import ShardSet

    path = tmp_path / "Q4_0"
    shutil.copytree(shard_sets / "Q4_0", path)
    with pytest.raises(EdgeMoeError, match="calibrate"):
        open_engine(path, ResidencyConfig(memory_budget="75%", quality="balanced"), n_ctx=32,
                    n_threads=1)
    cal, trace = calibrate(path, TOKENS * 2, samples=4, window=4, n_threads=1)
    cal.save(path)
    trace.save(path / TRACE_FILE)
    with pytest.raises(EdgeMoeError, match="does not apply to --policy swap"):
        ResidencyConfig(memory_budget="75%", policy="swap", quality="fast").policy_name
    for quality, want in (("exact", None), ("balanced", "finite"), ("fast", math.inf)):
        cfg = ResidencyConfig(memory_budget="75%", quality=quality)
        engine, plan = open_engine(path, cfg, n_ctx=32, n_threads=1)
        with engine:
            pol = engine.policy
            assert pol.name == "ondemand" and pol.quality == quality
            if want is None:   # exact: no decisions, no substitute tier
                assert pol.wait_threshold is None and not plan.substitutes
            else:
                # The split is the planner's on the calibration trace (no plan.json).
                split = choose_tier_split(
                    trace, engine.memory_needs, int(0.75 * engine.memory_needs.expert_bytes_total),
                    substitute_bytes(ShardSet.open(path)), nominal_profile(
                        engine.memory_needs.expert_bytes), quality, cal.sensitivity,
                    pol.wait_threshold, pol.n_prefetch, cal.usage)
                assert (dict(plan.slots), plan.substitutes) == (split.slots, split.substitutes)
                assert bool(pol.sub_tables) == bool(plan.substitutes)
                assert plan.slot_bytes <= int(0.75 * engine.memory_needs.expert_bytes_total)
                if want == "finite":
                    assert 0 < pol.wait_threshold < math.inf
                else:
                    assert pol.wait_threshold == want
            for t in DECODE:
                engine.eval([t])
            c = pol.telemetry.counters
            assert c.hits + c.misses + c.substituted + c.dropped == c.layer_steps * 2
            assert residency_summary(engine).endswith(f"[ondemand, quality {quality}]")


def test_plan_file_split_is_used_and_a_stale_one_ignored(shard_sets, tmp_path, capsys):
    """plan.json's ondemand "tiers" entry (what `edgemoe plan` writes per --quality) sets the
    substitutes and full slots of a run at that quality and key; for another context size it is
    ignored and the planner's choice on the calibration trace decides."""
    import json
    import shutil

    from edgemoe.cli_budget import calibrate
    from edgemoe.residency.budget import parse_budget
    from edgemoe.runtime import PLAN_FILE, TRACE_FILE, PlanKey

    path = tmp_path / "Q4_0"
    shutil.copytree(shard_sets / "Q4_0", path)
    cal, trace = calibrate(path, TOKENS * 2, samples=4, window=4, n_threads=1)
    cal.save(path)
    trace.save(path / TRACE_FILE)
    cfg = ResidencyConfig(memory_budget="75%", quality="fast")
    engine, from_trace = open_engine(path, cfg, n_ctx=32, n_threads=1)
    engine.close()
    # `edgemoe plan` weighs the splits per quality, prints them and stores the choice.
    from edgemoe import cli

    assert cli.main(["plan", str(path), "--budget", "75%", "-c", "32", "-t", "1"]) == 0
    out = capsys.readouterr().out
    assert "ondemand --quality balanced: " in out and "ondemand --quality fast: " in out
    assert "served " in out and "full slots " in out
    tiers = json.loads((path / PLAN_FILE).read_text())["policies"]["ondemand"]["tiers"]
    assert set(tiers) == {"balanced", "fast"}
    for quality, tier in tiers.items():
        engine, plan = open_engine(path, ResidencyConfig(memory_budget="75%", quality=quality),
                                   n_ctx=32, n_threads=1)
        engine.close()
        subs = {int(l): n for l, n in tier["substitutes"].items() if n}
        assert dict(plan.slots) == {int(l): n for l, n in tier["slots"].items()}
        assert (plan.substitutes or {}) == subs
    # A split the trace's planner does not give: one substitute and two full slots per layer.
    planned = {"substitutes": {"0": 1, "1": 1}, "slots": {"0": 2, "1": 2}}
    assert (dict(from_trace.slots), from_trace.substitutes) != ({0: 2, 1: 2}, {0: 1, 1: 1})
    key = PlanKey.of(parse_budget("75%"), 32, "f16", None)
    doc = {**key.fields(), "policies": {"ondemand": {
        "slots": {"0": 3, "1": 3}, "n_prefetch": 1, "tiers": {"fast": planned}}}}
    (path / PLAN_FILE).write_text(json.dumps(doc))
    engine, plan = open_engine(path, cfg, n_ctx=32, n_threads=1)
    with engine:
        assert dict(plan.slots) == {0: 2, 1: 2} and plan.substitutes == {0: 1, 1: 1}
        assert {l: t.n_slots for l, t in engine.policy.sub_tables.items()} == {0: 1, 1: 1}
        for t in DECODE:
            engine.eval([t])
        c = engine.policy.telemetry.counters
        assert c.hits + c.misses + c.substituted + c.dropped == c.layer_steps * 2
    doc["n_ctx"] = 64
    (path / PLAN_FILE).write_text(json.dumps(doc))
    engine, stale = open_engine(path, cfg, n_ctx=32, n_threads=1)
    engine.close()
    assert "not used for budget 75%" in capsys.readouterr().err
    assert (dict(stale.slots), stale.substitutes) == (dict(from_trace.slots),
                                                      from_trace.substitutes)
    # A planned split the budget cannot hold is refused.
    doc["n_ctx"] = 32
    doc["policies"]["ondemand"]["tiers"]["fast"] = {"substitutes": {"0": 4, "1": 4},
                                                    "slots": {"0": 3, "1": 3}}
    (path / PLAN_FILE).write_text(json.dumps(doc))
    with pytest.raises(EdgeMoeError, match="rerun `edgemoe plan`"):
        open_engine(path, cfg, n_ctx=32, n_threads=1)
