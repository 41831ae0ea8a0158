"""The policies drive the real expert slot pool (edgemoe.pool) of a converted shard set: the
bytes in the slot a policy names are the bytes of that expert's shard."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import make_synthetic as ms  # noqa: E402

from edgemoe import ggml  # noqa: E402
from edgemoe.pool import ExpertPool  # noqa: E402
from edgemoe.residency import OnDemandPolicy, SwapPolicy  # noqa: E402
from edgemoe.residency.traces import topic_trace  # noqa: E402
from edgemoe.shardset import EXPERT_TENSORS, ShardSet  # noqa: E402

N_EXPERT, K, SLOTS = 8, 2, 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> ShardSet:
    import converters

    out = tmp_path_factory.mktemp("residency_pool")
    ms.make_synthetic(out / "hf", ms.SynthSpec(arch="mixtral", n_layer=2, n_expert=N_EXPERT,
                                               n_expert_used=K, n_embd=128, n_ff_exp=128,
                                               n_vocab=512, dtype="f32"),
                      shard_bytes=1 << 20)
    converters.convert(out / "hf", out / "shards", expert_type="Q8_0", progress=False)
    return ShardSet.open(out / "shards")


@pytest.fixture()
def pool(shards):
    backend = ggml.Backend("cpu", 1)
    p = ExpertPool(shards, backend, {l: SLOTS for l in shards.expert_layers})
    yield p
    p.close()
    backend.close()


def slot_holds(pool: ExpertPool, shards: ShardSet, layer: int, expert: int, slot: int) -> bool:
    shard = shards.expert(layer, expert)
    raw = np.fromfile(shard.path, dtype=np.uint8)
    for proj in EXPERT_TENSORS:
        info, size = shard.tensors[proj], pool.slot_bytes[layer][proj]
        got = ggml.tensor_get(pool.tensors(layer)[proj], np.empty(size, np.uint8), slot * size)
        if not np.array_equal(got, raw[info.offset:info.offset + size]):
            return False
    return True


def test_ondemand_on_the_real_pool(shards, pool):
    trace = topic_trace(n_layer=2, n_expert=N_EXPERT, n_tokens=40, sharpness=2.0, seed=4)
    slots = {l: SLOTS for l in shards.expert_layers}
    with OnDemandPolicy(pool, slots, N_EXPERT, K, n_prefetch=1) as pol:
        for t in range(trace.n_tokens):
            for l in shards.expert_layers:
                ids = trace.wanted(l, K)[t:t + 1]
                got = pol.ensure(l, ids)
                assert got == {e: int(s) for e, s in enumerate(pol.slot_of(l)) if e in got}
                for e, s in got.items():
                    assert slot_holds(pool, shards, l, e, s)
                if l + 1 in trace.predicted:
                    pol.prefetch(l + 1, trace.predicted[l + 1][t:t + 1])
            pol.end_step()
        c = pol.telemetry.counters
    assert c.misses > 0 and c.bytes_read == c.loads * pool.expert_bytes(0)


def test_swap_on_the_real_pool(shards, pool):
    trace = topic_trace(n_layer=2, n_expert=N_EXPERT, n_tokens=80, sharpness=3.0, seed=6)
    slots = {l: SLOTS for l in shards.expert_layers}
    norms = {l: np.ones(N_EXPERT) for l in shards.expert_layers}
    with SwapPolicy(pool, slots, N_EXPERT, K, norms=norms, interval=4) as pol:
        pol.warm()
        for t in range(trace.n_tokens):
            for l in shards.expert_layers:
                slot_of = pol.slot_of(l)
                for e in np.flatnonzero(slot_of >= 0):
                    assert slot_holds(pool, shards, l, int(e), int(slot_of[e]))
                pol.observe(l, trace.probs[l][t:t + 1], trace.x_norm[l][t:t + 1])
            pol.end_step()
        pol.wait_idle()
        assert pol.telemetry.counters.swaps > 0


@pytest.mark.parametrize("direct", [True, False])
def test_read_span_returns_the_file_bytes(shards, monkeypatch, direct):
    """Unaligned spans of a shard, through O_DIRECT (where /tmp's filesystem takes it) or the
    buffered fallback, equal the file's bytes; a span past the end is a short read."""
    import edgemoe.pool as pool_mod

    monkeypatch.setattr(pool_mod, "_direct", direct and pool_mod._direct)
    shard = shards.expert(shards.expert_layers[0], 3)
    raw = Path(shard.path).read_bytes()
    for offset, nbytes in ((shard.data_offset, shard.data_bytes), (1, 5000), (4095, 4098)):
        got = pool_mod.read_span(shard.path, offset, nbytes)
        assert got.tobytes() == raw[offset:offset + nbytes]
    with pytest.raises(EOFError, match=f"of {len(raw)} bytes"):
        pool_mod.read_span(shard.path, 100, len(raw))


def test_a_filesystem_refusing_o_direct_falls_back(shards, monkeypatch):
    import errno
    import os

    import edgemoe.pool as pool_mod

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_open = os.open

    def tmpfs_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(pool_mod, "_direct", True)
    monkeypatch.setattr(pool_mod.os, "open", tmpfs_open)
    shard = shards.expert(shards.expert_layers[1], 0)
    got = pool_mod.read_span(shard.path, shard.data_offset, shard.data_bytes)
    assert pool_mod._direct is False
    with open(shard.path, "rb") as f:
        f.seek(shard.data_offset)
        assert got.tobytes() == f.read(shard.data_bytes)


def test_measure_reads_and_record_a_trace(shards):
    from edgemoe.residency.planner import measure_reads
    from edgemoe.residency.traces import TraceRecorder

    bandwidth, latency, sustained, burst = measure_reads(shards, samples=4)
    assert bandwidth > 1e6 and 0.0 <= latency < 0.1
    assert sustained is None or 0 < sustained < bandwidth
    assert burst == 0.0 if sustained is None else burst > 0
    rec = TraceRecorder()
    rng = np.random.default_rng(0)
    for step in range(3):
        for l in shards.expert_layers:
            rec.add(l, rng.random((2, N_EXPERT)), rng.random(2),
                    rng.random((2, N_EXPERT)) if l else None)
    tr = rec.trace()
    assert tr.n_tokens == 6 and tr.layers == list(shards.expert_layers)
    assert list(tr.predicted) == [1] and tr.predicted[1].shape == (6, N_EXPERT)


def test_calibration_file_roundtrip(shards, tmp_path):
    from edgemoe.errors import ShardSetError
    from edgemoe.residency.calibration import Calibration, compute_norms
    from edgemoe.residency.importance import expert_norm

    norms = compute_norms(shards)
    assert set(norms) == set(shards.expert_layers) and (norms[0] > 0).all()
    # Oracle: the norm of the safetensors weights the shard was quantized from (Q8_0: ~0.5%).
    from safetensors.numpy import load_file
    hf = {}
    for f in sorted((shards.root.parent / "hf").glob("*.safetensors")):
        hf.update(load_file(f))
    w = [hf[f"model.layers.0.block_sparse_moe.experts.3.{p}.weight"].astype(np.float32)
         for p in ("w1", "w3", "w2")]
    assert norms[0][3] == pytest.approx(expert_norm(w), rel=0.01)
    cal = Calibration(norms=norms, usage={l: np.arange(N_EXPERT) for l in norms},
                      sensitivity={l: 0.5 * (l + 1) for l in norms}, sensitivity_method="isolated",
                      tokens=1000)
    cal.save(tmp_path)
    back = Calibration.load(tmp_path)
    np.testing.assert_allclose(back.norms[1], norms[1])
    assert back.usage[0].tolist() == list(range(N_EXPERT))
    assert back.sensitivity == {0: 0.5, 1: 1.0} and back.sensitivity_method == "isolated"
    with pytest.raises(ShardSetError, match="run `edgemoe calibrate`"):
        Calibration.load(tmp_path / "nowhere")
    (tmp_path / "calibration.json").write_text('{"format": "other", "version": 1}')
    with pytest.raises(ShardSetError, match="expected format edgemoe.calibration"):
        Calibration.load(tmp_path)
