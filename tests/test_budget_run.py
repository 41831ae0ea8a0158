"""run / chat / the Python API under a memory budget: the knob, the summary line after
every run, --stats-json, refusal below the minimum, and ondemand's text equal to full's."""
from __future__ import annotations

import json

import pytest

from tiny_models import make_tiny_shards

pytest.importorskip("transformers")

from edgemoe import cli  # noqa: E402
from edgemoe.api import Model  # noqa: E402
from edgemoe.errors import BudgetError  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget_run")
    return make_tiny_shards("qwen3_moe", root, seed=11, num_experts=8)


def test_run_prints_the_residency_summary_and_writes_stats(shards, tmp_path, capsys):
    stats = tmp_path / "stats.json"
    rc = cli.main(["run", str(shards), "-p", "the cat sat", "-n", "8", "--temp", "0", "-t", "1",
                   "--memory-budget", "25%", "--policy", "ondemand", "--stats-json", str(stats)])
    assert rc == 0
    err = capsys.readouterr().err
    line = [l for l in err.splitlines() if l.startswith("residency:")]
    assert len(line) == 1 and "[ondemand]" in line[0] and "hit" in line[0]
    doc = json.loads(stats.read_text())
    assert doc["policy"] == "ondemand" and set(doc["slots"].values()) == {2}
    assert sum(s["tokens"] for s in doc["steps"]) == doc["run"]["tokens"] >= 8
    assert doc["run"]["bytes_read"] > 0


def test_run_refuses_a_budget_below_the_minimum(shards, capsys):
    assert cli.main(["run", str(shards), "-p", "x", "-n", "2", "--memory-budget", "1MiB"]) == 1
    assert "below the minimum" in capsys.readouterr().err


def test_api_budget_keeps_the_greedy_text_with_ondemand(shards):
    with Model(shards, n_ctx=128, n_threads=1) as full:
        want = full.generate("once upon a time", max_tokens=24, temperature=0)
        assert "hit 100.0%" in full.residency_summary() and full.residency_summary().endswith("[full]")
    with Model(shards, n_ctx=128, n_threads=1, memory_budget="25%", policy="ondemand") as m:
        assert m.generate("once upon a time", max_tokens=24, temperature=0) == want
        assert m.residency_summary().endswith("[ondemand]")
        assert 0.0 < m.status()["hit_rate"] < 1.0
    with pytest.raises(BudgetError, match="minimum"):
        Model(shards, memory_budget="10%")


def test_conversion_stores_the_expert_norms(shards):
    """swap and static need ||E_i||: the converter stores them (the first budgeted run reads
    no expert to compute them)."""
    import numpy as np

    from edgemoe.residency.calibration import Calibration, compute_norms
    from edgemoe.shardset import ShardSet

    stored = Calibration.load(shards).norms
    again = compute_norms(ShardSet.open(shards))
    assert sorted(stored) == sorted(again)
    for layer in again:
        np.testing.assert_allclose(stored[layer], again[layer], rtol=1e-9)
        assert np.all(stored[layer] > 0)
