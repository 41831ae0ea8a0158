"""scripts/bench.py --quick: the command that writes docs/RESULTS.md, end to end on small models
(the CI check that keeps it working; the full run takes hours)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_writes_the_results_page(tmp_path):
    out, work = tmp_path / "docs", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick",
                           "--out", str(out), "--work", str(work)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (out / "RESULTS.md").read_text()
    results = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    from edgemoe.runtime import POLICIES

    for title in ("## Routing of the synthetic models", "## Quality against the budget",
                  "## Speed against the budget", "## Ablations", "## On a real board"):
        assert title in page
    quality = results["quality"]["figures"]["runners"]
    assert set(POLICIES) <= set(quality)                     # every policy the runtime has
    for name, by_budget in quality.items():
        assert set(by_budget) == {"100%", "75%", "50%", "35%", "25%"}
    # The exact policy equals the full model at every budget (up to the order in which a
    # prompt's expert groups are summed), and the page says so.
    for row in quality["ondemand"].values():
        assert row["kl"]["mean_kl"] < 1e-5 and row["kl"]["agreement"] >= 0.999
    assert "ondemand **equals the full model" in page
    # A lossy policy's loss at 50% is stated plainly when it passes 3%.
    for name, by_budget in quality.items():
        r = by_budget["50%"]
        if "error" not in r and r["kl"]["ppl_ratio"] > 1.03:
            assert f"**{name} loses" in page
    speed = results["speed"]["figures"]["budgets"]["50%"]
    rows = next(iter(speed["profiles"].values()))
    assert "llama.cpp" in rows and "swap" in rows and rows["swap"]["tok_s"] > 0
    loc = results["routing"]["figures"]["models"][0]["all_layers"]
    assert 0 < loc["reuse"]["1"] < loc["reuse"]["8"] <= 1
    for png in ("routing.png", "quality.png", "speed.png"):
        assert (out / "results" / png).stat().st_size > 1000
    assert "quick" in page
