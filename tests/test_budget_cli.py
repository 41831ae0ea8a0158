"""`edgemoe calibrate`, `edgemoe plan` and how run-time choices follow them: a budget
without a policy chooses swap, plan.json's slots are what the engine gets, the per-token stats."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tiny_models import make_tiny_shards

pytest.importorskip("transformers")

from edgemoe import cli  # noqa: E402
from edgemoe.errors import BudgetError, EdgeMoeError  # noqa: E402
from edgemoe.residency.calibration import Calibration  # noqa: E402
from edgemoe.residency.routing import topk  # noqa: E402
from edgemoe.residency.sensitivity import threshold_for_drop_rate  # noqa: E402
from edgemoe.residency.traces import RoutingTrace  # noqa: E402
from edgemoe.cli_run import open_model  # noqa: E402
from edgemoe.runtime import (PLAN_FILE, TRACE_FILE, ResidencyConfig, StepLog,  # noqa: E402
                             open_engine, write_stats_json)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget_cli")
    return make_tiny_shards("qwen3_moe", root, seed=7, num_experts=8)


def test_a_budget_without_policy_chooses_swap(shards):
    assert ResidencyConfig(memory_budget="50%").policy_name == "swap"
    assert ResidencyConfig(policy="ondemand").budget.fraction == 1.0
    engine, plan = open_engine(shards, ResidencyConfig(memory_budget="50%"), n_ctx=32, n_threads=1)
    with engine:
        assert engine.policy.name == "swap" and set(plan.slots.values()) == {4}


def test_stats_json_has_a_record_per_step(shards, tmp_path):
    log = StepLog()
    engine, _ = open_engine(shards, ResidencyConfig(memory_budget="25%", policy="ondemand"),
                            n_ctx=32, n_threads=1, telemetry=log)
    with engine:
        logits = engine.eval([3, 4, 5, 6], all_logits=False)
        for _ in range(5):
            logits = engine.eval([int(np.argmax(logits[-1]))])
        write_stats_json(engine, tmp_path / "stats.json")
    doc = json.loads((tmp_path / "stats.json").read_text())
    assert doc["policy"] == "ondemand" and doc["slots"] == {"0": 2, "1": 2}
    assert [s["tokens"] for s in doc["steps"]] == [4, 1, 1, 1, 1, 1]
    assert doc["run"]["tokens"] == 9 and doc["run"]["experts_per_token"] == 2.0
    assert sum(s["misses"] for s in doc["steps"]) == doc["run"]["misses"] > 0
    assert all(0.0 <= s["hit_rate"] <= 1.0 for s in doc["steps"])


def test_calibrate_then_plan_then_run_uses_the_plan(shards, capsys):
    assert cli.main(["calibrate", str(shards), "--tokens", "96", "--samples", "6",
                     "--window", "8", "-t", "1"]) == 0
    cal = Calibration.load(shards)
    trace = RoutingTrace.load(shards / TRACE_FILE)
    assert trace.n_tokens == 96 and sorted(trace.layers) == [0, 1]
    assert set(trace.predicted) == {1}                 # the first layer has no predictor
    assert all(u.sum() == 96 * 2 for u in cal.usage.values())
    assert cal.sensitivity_method == "isolated" and all(s > 0 for s in cal.sensitivity.values())
    assert all(np.all(n > 0) for n in cal.norms.values())

    assert cli.main(["plan", str(shards), "--budget", "50%", "-c", "32", "-t", "1"]) == 0
    out = capsys.readouterr().out
    for policy in ("static", "swap", "ondemand"):
        assert f"\n{policy}" in out
    assert "full      does not fit" in out and "tok/s" in out
    doc = json.loads((shards / PLAN_FILE).read_text())
    assert doc["budget"] == "50% of expert bytes" and doc["budget_fraction"] == 0.5
    assert (doc["n_ctx"], doc["kv_type"], doc["device"]) == (32, "f16", "CPU")
    slots = {int(l): n for l, n in doc["policies"]["ondemand"]["slots"].items()}
    assert sum(slots.values()) <= 8 and min(slots.values()) >= 2

    engine, plan = open_engine(shards, ResidencyConfig(memory_budget="50%", policy="ondemand"),
                               n_ctx=32, n_threads=1)
    with engine:
        assert dict(plan.slots) == slots
        # The prefetch depth the plan chose (the fastest it predicted), unless the user says.
        depth = doc["policies"]["ondemand"]["n_prefetch"]
        assert depth in (0, 1, 2) and "prefetch depth 0: " in out
        assert engine.policy.n_prefetch == depth
    # --quality balanced's wait threshold is the plan's (from the same calibration routing).
    planned_t = doc["policies"]["ondemand"]["wait_thresholds"]["balanced"]
    assert planned_t > 0
    doc["policies"]["ondemand"]["wait_thresholds"]["balanced"] = 2 * planned_t
    (shards / PLAN_FILE).write_text(json.dumps(doc))
    engine, _ = open_engine(shards, ResidencyConfig(memory_budget="50%", quality="balanced"),
                            n_ctx=32, n_threads=1)
    with engine:
        assert engine.policy.wait_threshold == 2 * planned_t
        assert engine.policy.substitute_threshold == float("inf")
    doc["policies"]["ondemand"]["wait_thresholds"]["balanced"] = planned_t
    # A plan made for another context size or KV type is not used (its prefetch depth 2 is
    # not taken: 1 without a plan), and the run says so once.
    (shards / PLAN_FILE).write_text(json.dumps(
        {**doc, "policies": {"ondemand": {**doc["policies"]["ondemand"], "n_prefetch": 2}}}))
    for kw in (dict(n_ctx=64), dict(n_ctx=32, kv_type="f32")):
        engine, plan = open_engine(shards, ResidencyConfig(memory_budget="50%",
                                                           policy="ondemand"), n_threads=1, **kw)
        with engine:
            assert engine.policy.n_prefetch == 1
        err = capsys.readouterr().err
        assert err.count("not used for budget 50% of expert bytes") == 1, err
        assert f"n_ctx {kw['n_ctx']}" in err and "rerun `edgemoe plan`" in err
    doc["policies"]["ondemand"]["n_prefetch"] = 2 if depth != 2 else 0
    (shards / PLAN_FILE).write_text(json.dumps(doc))
    for cfg_depth, want in ((None, doc["policies"]["ondemand"]["n_prefetch"]), (1, 1)):
        cfg = ResidencyConfig(memory_budget="50%", policy="ondemand", n_prefetch=cfg_depth)
        engine, _ = open_engine(shards, cfg, n_ctx=32, n_threads=1)
        with engine:
            assert engine.policy.n_prefetch == want

    # Adaptive gating with the calibrated s_l: T set for half the (token, layer) pairs to run one
    # expert; decode then runs between 1 and 2 experts per layer-token.
    w_last = {l: topk(trace.probs[l], 2, renormalize=True)[1][:, -1] for l in trace.layers}
    threshold = threshold_for_drop_rate(cal.sensitivity, w_last, 0.5)
    cfg = ResidencyConfig(memory_budget="50%", policy="ondemand", adaptive_gating=threshold)
    engine, _ = open_engine(shards, cfg, n_ctx=32, n_threads=1)
    with engine:
        logits = engine.eval([3, 4, 5], all_logits=False)
        before = engine.policy.telemetry.counters
        for _ in range(16):
            logits = engine.eval([int(np.argmax(logits[-1]))])
        c = engine.policy.telemetry.counters - before
    assert 1.0 < c.experts_run / c.layer_steps < 2.0
    with pytest.raises(EdgeMoeError, match="ondemand policy only"):
        open_engine(shards, ResidencyConfig(memory_budget="50%", adaptive_gating=0.1), n_ctx=32)

    # A plan that no longer fits the budget (edited, or the model changed) is refused.
    doc["policies"]["ondemand"]["slots"] = {"0": 8, "1": 8}
    (shards / PLAN_FILE).write_text(json.dumps(doc))
    with pytest.raises(BudgetError, match="rerun `edgemoe plan`"):
        open_engine(shards, ResidencyConfig(memory_budget="50%", policy="ondemand"), n_ctx=32)
    (shards / PLAN_FILE).unlink()


def test_plan_refuses_a_budget_below_the_minimum(shards, capsys):
    assert cli.main(["plan", str(shards), "--budget", "10%", "-t", "1"]) == 1
    assert "below the minimum of 25%" in capsys.readouterr().err


def test_swap_schedule_from_plan_or_trace(shards, capsys):
    """swap's interval and decay: what `edgemoe plan` stored (printed and in plan.json, read back
    by the run), the chooser's on the calibration trace when the plan is for another key, the
    user's flags above both."""
    from edgemoe.residency.planner import choose_swap_schedule

    assert cli.main(["calibrate", str(shards), "--tokens", "96", "--samples", "0", "-t", "1"]) == 0
    assert cli.main(["plan", str(shards), "--budget", "50%", "-c", "32", "-t", "1"]) == 0
    out = capsys.readouterr().out
    entry = json.loads((shards / PLAN_FILE).read_text())["policies"]["swap"]
    interval, decay = entry["swap_interval"], entry["swap_decay"]
    assert f"swap every {interval} tok, decay {decay:g}" in out
    assert "swap schedule by top-k router mass" in out and 0 < entry["swap_coverage"] <= 1

    def opened(**kw):
        engine, plan = open_engine(shards, ResidencyConfig(memory_budget="50%", policy="swap",
                                                           **kw), n_ctx=32, n_threads=1)
        with engine:
            return engine.policy.interval, engine.policy.tracker.decay, plan

    # A schedule the chooser never picks on its own: the run takes it from the plan.
    doc = json.loads((shards / PLAN_FILE).read_text())
    doc["policies"]["swap"].update(swap_interval=3, swap_decay=0.3)
    (shards / PLAN_FILE).write_text(json.dumps(doc))
    assert opened()[:2] == (3, 0.3)
    assert opened(swap_interval=5)[:2][0] == 5          # the user's interval wins
    assert opened(swap_interval=5, swap_decay=0.1)[:2] == (5, 0.1)
    # A stale plan (another context size) is ignored: the chooser on the stored trace decides,
    # for the slots the run got.
    doc["n_ctx"] = 64
    (shards / PLAN_FILE).write_text(json.dumps(doc))
    got_interval, got_decay, plan = opened()
    assert "not used for budget 50%" in capsys.readouterr().err
    cal = Calibration.load(shards)
    want = choose_swap_schedule(RoutingTrace.load(shards / TRACE_FILE), plan.slots, 2, cal.norms,
                                len(plan.slots), 1.0, cal.usage)
    assert (got_interval, got_decay) == (want.interval, want.decay) != (3, 0.3)
    (shards / PLAN_FILE).unlink()
    # The CLI's flags reach the policy through the Python API.
    args = cli.build_parser().parse_args(["perplexity", str(shards), "-f", "x.txt", "-c", "32",
                                          "--memory-budget", "50%", "--swap-interval", "5",
                                          "--swap-decay", "0.25"])
    with open_model(args) as model:
        assert (model.engine.policy.interval, model.engine.policy.tracker.decay) == (5, 0.25)


def test_calibration_reads_the_text_in_windows(shards):
    """Routing is recorded in windows of --ctx-size tokens, each from an empty context: the
    second window's rows are those of calibrating on it alone, and differ from the rows of one
    long context (the router sees the positions a run of that length never reaches)."""
    from edgemoe.cli_budget import calibrate

    tokens = [3 + (7 * i) % 90 for i in range(48)]
    _, windowed = calibrate(shards, tokens, samples=0, n_threads=1, n_ctx=24)
    _, alone = calibrate(shards, tokens[24:], samples=0, n_threads=1)
    _, long = calibrate(shards, tokens, samples=0, n_threads=1)
    for l in windowed.layers:
        assert windowed.probs[l].shape == (48, 8)
        np.testing.assert_allclose(windowed.probs[l][24:], alone.probs[l], atol=1e-5)
        np.testing.assert_allclose(windowed.probs[l][:24], long.probs[l][:24], atol=1e-5)
        assert np.abs(windowed.probs[l][24:] - long.probs[l][24:]).max() > 1e-3
    assert set(windowed.predicted) == {1} and windowed.predicted[1].shape == (48, 8)
