"""edgemoe.shardset: a damaged manifest is refused with a message naming what is wrong."""
import json
import shutil

import pytest

import converters
from edgemoe.errors import ShardSetError
from edgemoe.shardset import MANIFEST_FILE, ShardSet
from tiny_models import cached_checkpoint


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tiny"


@pytest.fixture(scope="module")
def good_set(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shardset") / "shards"
    converters.convert(cached_checkpoint(tiny_root, "olmoe", tokenizer="bpe"), out,
                       expert_type="Q8_0", progress=False)
    return out


def damaged(good_set, tmp_path, edit):
    out = tmp_path / "shards"
    shutil.copytree(good_set, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    edit(manifest)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


def test_open_exposes_the_manifest(good_set):
    ss = ShardSet.open(good_set)
    assert ss.arch == "olmoe" and ss.n_embd == 64 and ss.n_ff_exp == 64
    shard = ss.expert(1, 3)
    assert shard.path == good_set / "experts" / "blk.1.3.gguf"
    assert shard.tensors["ffn_down"].ne == (64, 64) and shard.tensors["ffn_up"].type == "Q8_0"
    assert ss.expert_bytes_total == sum(s.data_bytes for s in ss.experts())
    with pytest.raises(ShardSetError, match=r"no expert blk.2.0 \(expert layers \[0, 1\], 4 "
                                            r"experts\)"):
        ss.expert(2, 0)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(version=2), r"version 2, this edgemoe reads version 1"),
    (lambda m: m.update(format="other"), r"format should be 'edgemoe.shardset'"),
    (lambda m: m.pop("n_expert"), r"key 'n_expert' missing"),
    (lambda m: m.update(n_layer="2"), r"key 'n_layer' should be int, got '2'"),
    (lambda m: m["experts"].pop(5), r"1 expert\(s\) not listed, first blk.1.1"),
    (lambda m: m["experts"][0]["tensors"]["ffn_down"].update(offset=10**9),
     r"expert blk.0.0: tensor ffn_down \[1000000000, \d+\) lies outside the \d+-byte file"),
    (lambda m: m["experts"][0].update(data_offset=100),
     r"expert blk.0.0: data_offset 100 is not the 4096-aligned start of ffn_gate"),
    (lambda m: m["base"].update(bytes=1), r"base.gguf: \d+ bytes, manifest says 1"),
])
def test_damaged_manifest_is_refused(good_set, tmp_path, edit, message):
    with pytest.raises(ShardSetError, match=message):
        ShardSet.open(damaged(good_set, tmp_path, edit))


def test_unreadable_manifest_and_missing_directory(good_set, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(good_set, out)
    (out / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ShardSetError, match=r"manifest.json: unreadable"):
        ShardSet.open(out)
    with pytest.raises(ShardSetError, match=r"nowhere: not a directory"):
        ShardSet.open(tmp_path / "nowhere")


def test_substitutes_are_the_experts_at_a_low_bit_type(tiny_root, tmp_path):
    """--substitute-type writes every expert again (substitutes/), listed in the manifest; the
    bytes are the same weights at the low-bit type; a missing substitute is refused."""
    import numpy as np

    from edgemoe import quant

    out = tmp_path / "shards"
    plan = converters.convert(cached_checkpoint(tiny_root, "olmoe", tokenizer="bpe"), out,
                              expert_type="Q8_0", substitute_type="Q4_0", progress=False)
    assert len(plan.substitutes) == len(plan.experts) and plan.substitute_type == "Q4_0"
    ss = ShardSet.open(out)
    ss.verify()
    assert ss.substitute_type == "Q4_0"
    for shard in ss.experts():
        sub = shard.substitute
        assert sub.path == out / "substitutes" / f"blk.{shard.layer}.{shard.expert}.gguf"
        assert sub.data_bytes < shard.data_bytes
        raw, low = np.fromfile(shard.path, np.uint8), np.fromfile(sub.path, np.uint8)
        for proj, info in shard.tensors.items():
            s_info = sub.tensors[proj]
            assert s_info.type == "Q4_0" and s_info.ne == info.ne
            full = quant.dequantize(raw[info.offset:info.offset + info.nbytes],
                                    quant.GGMLType.Q8_0, info.ne)
            approx = quant.dequantize(low[s_info.offset:s_info.offset + s_info.nbytes],
                                      quant.GGMLType.Q4_0, s_info.ne)
            err = np.linalg.norm(approx - full) / np.linalg.norm(full)
            assert 0 < err < 0.2   # Q4_0 of the same weights: close, not the same
    sub = ss.expert(ss.expert_layers[0], 1).substitute
    sub.path.unlink()
    with pytest.raises(ShardSetError, match=r"substitutes/blk\.\d+\.1\.gguf"):
        ShardSet.open(out)
    with pytest.raises(Exception, match="safetensors"):
        converters.make_plan(tmp_path / "model.gguf", substitute_type="Q4_0")
