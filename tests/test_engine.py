"""Engine and expert pool behaviour: context bookkeeping, errors, threads, memory, masked routing."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from tiny_models import make_tiny_shards

pytest.importorskip("transformers")

from edgemoe import arch as arch_registry  # noqa: E402
from edgemoe.engine import Engine  # noqa: E402
from edgemoe.shardset import seal_manifest  # noqa: E402
from edgemoe.errors import (ContextOverflow, EdgeMoeError, ShardSetError,  # noqa: E402
                            UnsupportedArchitecture)
from edgemoe.residency.observer import EngineObserver  # noqa: E402
from edgemoe.residency.policies import MaskedPolicy, OnDemandPolicy  # noqa: E402
from edgemoe.runtime import empty_policy  # noqa: E402

TOKENS = [5, 9, 33, 2, 100, 7, 8, 61, 12, 90, 4, 77]


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    out = {arch: make_tiny_shards(arch, root, seed=3) for arch in ("qwen3_moe", "olmoe")}
    # A vocabulary far larger than the tokenizer's (the converter pads it), as real ones are.
    out["big_vocab"] = make_tiny_shards("qwen3_moe", root / "big", seed=3, vocab_size=16384)
    out["hf_qwen3_moe"] = root / "qwen3_moe_hf"
    return out


@pytest.fixture()
def qwen3(shard_sets, tmp_path):
    """A private copy of the qwen3_moe shard set that a test may damage."""
    dst = tmp_path / "set"
    shutil.copytree(shard_sets["qwen3_moe"], dst)
    return dst


def _relerr(a, b):
    return float(np.abs(a - b).max() / (b.max() - b.min()))


def test_truncate_then_reevaluate_gives_the_same_logits(shard_sets):
    with Engine(shard_sets["qwen3_moe"], n_ctx=32, n_threads=1, kv_type="f32") as engine:
        full = engine.eval(TOKENS)
        assert engine.n_past == len(TOKENS)
        engine.truncate(6)
        again = engine.eval(TOKENS[6:])
        assert engine.n_past == len(TOKENS)
        assert _relerr(again, full[6:]) < 1e-5
        with pytest.raises(EdgeMoeError, match="truncate"):
            engine.truncate(len(TOKENS) + 1)
        engine.reset()
        last = engine.eval(TOKENS, all_logits=False)
        assert last.shape == (1, engine.n_vocab)
        assert _relerr(last[0], full[-1]) < 1e-5


def _all_resident_ondemand(pool):
    return OnDemandPolicy(pool, {l: pool.n_expert for l in pool.layers}, pool.n_expert,
                          pool.shards.n_expert_used)


@pytest.mark.parametrize("routing", ["full", "observed", "exact"])
@pytest.mark.parametrize("n_outputs", [None, 1])
def test_logits_of_chosen_rows_match_all_rows(shard_sets, routing, n_outputs):
    """Rows from an index on (across batch boundaries, n_batch 5 over 12 tokens), the last row,
    or none: the same values as the rows of an all-logits eval. With buffers reserved for one
    row, asking for more grows them (and the graphs cached before are rebuilt). Under the full
    policy, watched by an observer (router outputs of every row), and under exact routing."""
    kw = dict(n_ctx=32, n_threads=1, kv_type="f32", n_batch=5,
              policy=_all_resident_ondemand if routing == "exact" else None)
    with Engine(shard_sets["qwen3_moe"], n_outputs=n_outputs, **kw) as engine:
        if routing == "observed":
            engine.add_observer(_Router())
        engine.eval(TOKENS, logits_from=-1)
        engine.reset()
        full = engine.eval(TOKENS)
        for start in (-1, -3, 0, 4, 5, 7, len(TOKENS) - 1, len(TOKENS)):
            engine.reset()
            got = engine.eval(TOKENS, logits_from=start)
            want = full[start:] if start < len(TOKENS) else full[:0]
            assert got.shape == want.shape
            if got.size:
                assert _relerr(got, want) < 1e-5
            assert engine.n_past == len(TOKENS)
        with pytest.raises(EdgeMoeError, match="logits_from"):
            engine.eval(TOKENS[:2], logits_from=3)


def test_compute_buffers_are_reserved_for_the_rows_asked(shard_sets):
    """One row of logits per batch (generation) reserves less than a whole batch of them."""
    kw = dict(n_ctx=256, n_threads=1, n_batch=128)
    with Engine(shard_sets["big_vocab"], **kw) as every, \
            Engine(shard_sets["big_vocab"], n_outputs=1, **kw) as one:
        row = one.n_vocab * 4
        assert every.memory()["compute"] >= 128 * row     # a batch of logits
        assert one.memory()["compute"] < every.memory()["compute"] - 96 * row
        assert one.n_outputs == 1 and every.n_outputs == 128


def test_graph_cache_is_bounded_by_bytes(shard_sets):
    """A chat evaluates a new prompt length every turn: the cached graphs stay within the bound
    memory() counts, and results do not change when graphs are rebuilt."""
    with Engine(shard_sets["qwen3_moe"], n_ctx=128, n_threads=1, n_batch=16, n_outputs=1,
                policy=_all_resident_ondemand) as engine:
        first = engine.eval(TOKENS, logits_from=-1)
        for n in range(1, 40):
            engine.reset()
            engine.eval((TOKENS * 4)[:n], logits_from=-1)
            assert engine._graph_bytes <= engine._graph_cap
        engine.reset()
        assert np.array_equal(engine.eval(TOKENS, logits_from=-1), first)
        assert engine.memory()["compute"] >= engine._graph_cap


def test_base_weights_mapped_in_place_or_read_give_the_same_logits(shard_sets, monkeypatch):
    """On the CPU base.gguf is mapped and used in place; a device that cannot map host memory
    gets each tensor read (O_DIRECT, in pieces) into its buffer: the same numbers either way."""
    from edgemoe import ggml
    from edgemoe.arch import common

    with Engine(shard_sets["qwen3_moe"], n_ctx=32, n_threads=1) as mapped:
        assert isinstance(mapped.weights.buffer, ggml.MappedBuffer)
        want = mapped.eval(TOKENS)
    monkeypatch.setattr(ggml.Backend, "maps_host_memory", property(lambda self: False))
    monkeypatch.setattr(common, "_READ_PIECE", 4096 + 512)   # pieces not aligned to pages
    with Engine(shard_sets["qwen3_moe"], n_ctx=32, n_threads=1) as read:
        assert isinstance(read.weights.buffer, ggml.Buffer)
        assert np.array_equal(read.eval(TOKENS), want)


def test_context_overflow_leaves_the_context_intact(shard_sets):
    with Engine(shard_sets["qwen3_moe"], n_ctx=16, n_threads=1) as engine:
        engine.eval(TOKENS[:10])
        with pytest.raises(ContextOverflow, match="n_ctx=16"):
            engine.eval(TOKENS[:10])
        assert engine.n_past == 10
        assert engine.eval(TOKENS[:6]).shape == (6, engine.n_vocab)


def test_bad_tokens_are_refused_before_compute(shard_sets):
    with Engine(shard_sets["qwen3_moe"], n_ctx=16, n_threads=1) as engine:
        with pytest.raises(EdgeMoeError, match="outside the vocabulary"):
            engine.eval([1, engine.n_vocab])
        with pytest.raises(EdgeMoeError, match="at least one token"):
            engine.eval([])
        assert engine.n_past == 0


def test_closed_engine_refuses_eval(shard_sets):
    engine = Engine(shard_sets["qwen3_moe"], n_ctx=16, n_threads=1)
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(EdgeMoeError, match="closed"):
        engine.eval([1])


def test_concurrent_evals_are_serialised(shard_sets):
    with Engine(shard_sets["olmoe"], n_ctx=64, n_threads=1) as engine:
        errors = []

        def worker(tokens):
            try:
                for t in tokens:
                    engine.eval([t])
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(TOKENS,)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert engine.n_past == 3 * len(TOKENS)


def test_memory_reports_every_part(shard_sets):
    with Engine(shard_sets["qwen3_moe"], n_ctx=64, n_threads=1, kv_type="f32") as engine:
        mem = engine.memory()
        hp = engine.hparams
        assert mem["kv_cache"] >= 2 * hp.n_layer * hp.n_embd_kv * 64 * 4
        tensor_bytes = sum(info.nbytes for s in engine.shards.experts() for info in s.tensors.values())
        assert mem["expert_slots"] >= tensor_bytes
        assert mem["base_weights"] > 0 and mem["compute"] > 0
        assert engine.device


class _Router(EngineObserver):
    def __init__(self):
        self.logits = {}

    def routed(self, layer, logits, x_norm, selected):
        self.logits[layer] = logits.copy()


class _Placed(MaskedPolicy):
    """A masked policy whose slot table the test sets: place(layer, {expert: slot})."""
    name = "placed"

    def initial_experts(self, layer):
        return []

    def place(self, layer, placement):
        table = self.tables[layer]
        for e in list(table.resident):
            table.free.append(table.retire(e))
        for e, slot in placement.items():
            self.pool.load(layer, e, slot)
            table.free.remove(slot)
            table.commit(e, slot)


def test_router_logits_match_transformers(shard_sets):
    """An observer sees the unmasked router logits (what importance scores are made from)."""
    torch = pytest.importorskip("torch")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(shard_sets["hf_qwen3_moe"],
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([TOKENS]), output_router_logits=True).router_logits
    with Engine(shard_sets["qwen3_moe"], n_ctx=32, n_threads=1, kv_type="f32") as engine:
        router = _Router()
        engine.add_observer(router)
        engine.eval(TOKENS)
        assert set(router.logits) == set(engine.pool.layers)
        for layer, got in router.logits.items():
            want = ref[layer].reshape(len(TOKENS), -1).numpy()
            assert got.shape == want.shape
            assert _relerr(got, want) < 1e-4


def test_masked_routing_follows_the_slot_table(shard_sets):
    path = shard_sets["qwen3_moe"]
    with Engine(path, n_ctx=32, n_threads=1, kv_type="f32") as full:
        want = full.eval(TOKENS)
        assert full.last_step["hit_rate"] == 1.0
        # An observer changes nothing but what the graph outputs.
        full.add_observer(_Router())
        full.reset()
        assert _relerr(full.eval(TOKENS), want) < 1e-6
    policy = []

    def placed(pool):
        policy.append(_Placed(pool, {l: 4 for l in pool.layers}, 4, 2))
        return policy[0]

    with Engine(path, n_ctx=32, n_threads=1, kv_type="f32", policy=placed) as engine:
        pool, policy = engine.pool, policy[0]
        for layer in pool.layers:  # every expert resident, in reversed slots
            policy.place(layer, {e: pool.n_expert - 1 - e for e in range(pool.n_expert)})
        assert _relerr(engine.eval(TOKENS), want) < 1e-5

        # Only experts 1 and 2 resident (top-2 of 4): routing is restricted to them, wherever
        # they sit, and the result differs from unrestricted routing.
        restricted = []
        for placement in ({1: 0, 2: 1}, {1: 3, 2: 2}):
            for layer in pool.layers:
                policy.place(layer, placement)
                assert dict(policy.tables[layer].resident) == placement
            engine.reset()
            restricted.append(engine.eval(TOKENS))
        assert _relerr(restricted[0], restricted[1]) < 1e-5
        assert _relerr(restricted[0], want) > 1e-3
        assert engine.last_step["redirects"] > 0


def test_pool_writes_bytes_into_slots(shard_sets):
    with Engine(shard_sets["qwen3_moe"], n_ctx=16, n_threads=1, n_slots=2,
                policy=empty_policy("static", 2)) as engine:
        pool = engine.pool
        assert pool.n_slots(0) == 2 and pool.loads == 0   # never warmed: nothing read
        pool.load(0, 3, 1)
        assert pool.loads == 1 and pool.bytes_read == engine.shards.expert(0, 3).data_bytes
        with pytest.raises(EdgeMoeError, match="slot 2 is out of range"):
            pool.load(0, 2, 2)
    with pytest.raises(EdgeMoeError, match="between top-k"):
        Engine(shard_sets["qwen3_moe"], n_slots=1, policy=empty_policy("static", 2))


def test_unreadable_expert_shard_names_the_file(qwen3):
    with Engine(qwen3, n_ctx=16, n_threads=1, n_slots=2,
                policy=empty_policy("static", 2)) as engine:
        shard = engine.shards.expert(1, 2)
        with open(shard.path, "r+b") as f:
            f.truncate(shard.data_offset + 100)
        with pytest.raises(ShardSetError, match=r"blk\.1\.2\.gguf.*truncated"):
            engine.pool.load(1, 2, 0)


def test_missing_or_resized_shard_is_refused_at_open(qwen3):
    (qwen3 / "experts" / "blk.0.1.gguf").unlink()
    with pytest.raises(ShardSetError, match=r"blk\.0\.1\.gguf: missing"):
        Engine(qwen3)


def test_base_from_another_model_is_refused(qwen3, shard_sets):
    base = qwen3 / "base.gguf"
    shutil.copyfile(shard_sets["olmoe"] / "base.gguf", base)
    manifest = json.loads((qwen3 / "manifest.json").read_text())
    other = json.loads((shard_sets["olmoe"] / "manifest.json").read_text())
    manifest["base"] = other["base"]
    (qwen3 / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    with pytest.raises(ShardSetError, match="do not match"):
        Engine(qwen3)


def test_corrupt_base_is_a_clear_error(qwen3):
    base = qwen3 / "base.gguf"
    data = bytearray(base.read_bytes())
    data[:4] = b"XXXX"
    base.write_bytes(bytes(data))
    with pytest.raises(ShardSetError, match="base.gguf: not a GGUF file"):
        Engine(qwen3)


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedArchitecture, match="qwen3moe") as info:
        arch_registry.get("gpt2")
    assert "'gpt2'" in str(info.value)


def test_unknown_device_lists_the_available_ones(shard_sets):
    with pytest.raises(EdgeMoeError, match="CPU"):
        Engine(shard_sets["qwen3_moe"], device="NoSuchDevice0")
