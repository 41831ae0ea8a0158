"""The backend seam on the CPU (what every build has): devices with memory and features, the
repacked expert slots, and the device budget's refusal on the CPU."""
from __future__ import annotations

import numpy as np
import pytest

from tiny_models import make_tiny_shards

pytest.importorskip("transformers")

from edgemoe import ggml  # noqa: E402
from edgemoe.engine import Engine  # noqa: E402
from edgemoe.errors import BudgetError, EdgeMoeError  # noqa: E402
from edgemoe.runtime import ResidencyConfig, open_engine  # noqa: E402

PROMPT = [5, 9, 33, 2, 100, 7, 8, 61, 12, 90]


@pytest.fixture(scope="module")
def q4_shards(tmp_path_factory):
    return make_tiny_shards("qwen3_moe", tmp_path_factory.mktemp("seam"), "Q4_0", seed=3)


def test_devices_report_memory_and_the_cpu_its_features():
    cpu = next(d for d in ggml.list_devices() if d["kind"] == "cpu")
    assert 0 < cpu["memory_free"] <= cpu["memory_total"]
    assert ggml.backend_features("CPU")   # e.g. {"AVX2": "1", ..., "REPACK": "1"}


def test_repacked_slots_compute_what_plain_slots_do(q4_shards):
    """Each expert is repacked as it is written into its slot; where ggml has a repacked
    Q4_0 layout for this CPU (AVX2, NEON) the logits match the plain slots'."""
    with Engine(q4_shards, n_ctx=64, n_threads=1) as plain:
        want = plain.eval(PROMPT)
        assert not plain.pool.repacked
    with Engine(q4_shards, n_ctx=64, n_threads=1, repack=True) as packed:
        if ggml.backend_features("CPU").get("REPACK") != "1":
            assert not packed.pool.repacked
            return
        assert packed.pool.repacked
        assert packed.pool.buffer.buffer_type == packed.backend.extra_buffer_types()["CPU_REPACK"]
        got = packed.eval(PROMPT)
    err = float(((want - got) ** 2).sum() / (want ** 2).sum())
    assert err <= 5e-4 and (want.argmax(-1) == got.argmax(-1)).mean() >= 0.9


def test_ondemand_with_repack_keeps_the_stored_layout_and_is_lossless(q4_shards):
    """Slots rewritten while decoding (ondemand at 50%) are not repacked (see ExpertPool), and
    decode what every expert resident, repacked, does."""
    def greedy(engine, n=16):
        row = engine.eval(PROMPT, all_logits=False)[-1]
        out = []
        for _ in range(n):
            out.append(int(row.argmax()))
            row = engine.eval([out[-1]])[-1]
        return out

    full, _ = open_engine(q4_shards, ResidencyConfig(), n_ctx=64, n_threads=1, repack=True)
    with full:
        want = greedy(full)
    engine, _ = open_engine(q4_shards, ResidencyConfig(memory_budget="50%", policy="ondemand"),
                            n_ctx=64, n_threads=1, repack=True)
    with engine:
        assert not engine.pool.repacked
        assert greedy(engine) == want
        assert engine.policy.telemetry.counters.misses > 0


def test_device_budget_on_the_cpu_is_refused(q4_shards):
    with pytest.raises(BudgetError, match="CPU, whose memory --memory-budget bounds"):
        open_engine(q4_shards, ResidencyConfig(device_budget="1GiB"), n_ctx=64, n_threads=1,
                    device="CPU")


def test_rpc_endpoints_are_checked_before_ggml_sees_them():
    with pytest.raises(EdgeMoeError, match="expected HOST:PORT"):
        ggml.add_rpc_server("localhost")
