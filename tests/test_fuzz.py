"""Mutated shard sets of the bundled model through the real CLI (tests/fuzz_shardset.py): every
case ends in a one-line error or a correct run, never a crash, hang, memory blow-up, traceback or
a file opened outside the set. `--fuzz-cases N` runs more (the campaign: 10000)."""
from pathlib import Path

import pytest

import converters
import fuzz_shardset as fuzz

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "edgemoe-tiny-shakespy"


@pytest.fixture(scope="module")
def good_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "shards"
    converters.convert(BUNDLED, out, progress=False)
    return out


def test_mutated_shard_sets_fail_cleanly(good_set, tmp_path, request):
    n = request.config.getoption("--fuzz-cases")
    seed = request.config.getoption("--fuzz-seed")
    campaign = fuzz.Campaign(good_set, tmp_path / "work", seed)
    results = [r for i in range(n) for r in campaign.case(i)]
    bad = [r for r in results if r.outcome in fuzz.BAD or r.outcome == "silent"]
    report = fuzz.table(results) + "".join(
        f"\ncase {r.case} [{r.klass}] {r.what} / {r.command}: {r.outcome} {r.detail[-300:]}"
        for r in bad[:10])
    print(report)
    assert len({r.case for r in results}) == n
    # every class was exercised, and the good set's own output was the oracle of the runs
    assert len({r.klass for r in results}) == len(campaign.mutator.classes) or n < 100
    assert not bad, report
