"""The backend seam on the CPU (what every build has): devices with memory and features, the
repacked expert slots, and the device budget's refusal on the CPU."""
from __future__ import annotations

import numpy as np
import pytest

from tiny_models import greedy_tokens, make_tiny_shards

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


def test_ondemand_with_repacked_slots_is_lossless(q4_shards):
    """Slots rewritten while decoding (ondemand at 50%) are repacked as they are written, and
    decode what every expert resident, repacked, does. The prompt needs more distinct experts
    than a layer has slots, so its layers run in groups whose other choices weigh 0: on the
    repacked kernel they must name slots of their own (engine.spare_slots), else the text
    diverged after 8 tokens and degenerated."""
    def greedy(engine):
        return greedy_tokens(engine, PROMPT, 16)

    full, _ = open_engine(q4_shards, ResidencyConfig(), n_ctx=64, n_threads=1, repack=True)
    with full:
        want = greedy(full)
    engine, _ = open_engine(q4_shards, ResidencyConfig(memory_budget="50%", policy="ondemand"),
                            n_ctx=64, n_threads=1, repack=True)
    with engine:
        assert engine.pool.repacked == (ggml.backend_features("CPU").get("REPACK") == "1")
        assert greedy(engine) == want
        assert engine.policy.telemetry.counters.misses > 0


def test_spare_slots_give_every_choice_of_a_token_its_own_slot():
    from edgemoe.engine import spare_slots

    slot_ids = np.array([[0, 0, 0], [2, 0, 0], [0, 3, 0], [1, 2, 3]], dtype=np.int32)
    mask = np.array([[False] * 3, [True, False, False], [False, True, False], [True] * 3])
    got = spare_slots(slot_ids, mask, 4)
    assert (got[mask] == slot_ids[mask]).all()   # the choices that count stay where they are
    assert got.tolist() == [[0, 1, 2], [2, 0, 1], [0, 3, 1], [1, 2, 3]]
    # Fewer slots than choices: as distinct as they can be.
    assert spare_slots(np.zeros((1, 3), np.int32), np.zeros((1, 3), bool), 2).tolist() == [[0, 1, 1]]


def test_device_budget_on_the_cpu_is_refused(q4_shards):
    with pytest.raises(BudgetError, match="CPU, whose memory --memory-budget bounds"):
        open_engine(q4_shards, ResidencyConfig(device_budget="1GiB"), n_ctx=64, n_threads=1,
                    device="CPU")


def test_rpc_endpoints_are_checked_before_ggml_sees_them():
    with pytest.raises(EdgeMoeError, match="expected HOST:PORT"):
        ggml.add_rpc_server("localhost")
