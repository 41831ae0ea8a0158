"""edgemoe.shardset: a damaged manifest is refused with a message naming what is wrong."""
import json
import os
import shutil

import pytest

import converters
from edgemoe.errors import ShardSetError
from edgemoe.shardset import MANIFEST_FILE, ShardSet, seal_manifest
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


def damaged(good_set, tmp_path, edit, seal=True):
    """A copy of the set whose manifest `edit` changed; sealed again (a consistent but wrong
    manifest) unless seal=False."""
    out = tmp_path / "shards"
    shutil.copytree(good_set, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    edit(manifest)
    (out / MANIFEST_FILE).write_text(json.dumps(seal_manifest(manifest) if seal else manifest))
    return out


def test_open_exposes_the_manifest(good_set):
    ss = ShardSet.open(good_set)
    assert ss.arch == "olmoe" and ss.n_embd == 64 and ss.n_ff_exp == 64
    shard = ss.expert(1, 3)
    assert shard.path == good_set.resolve() / "experts" / "blk.1.3.gguf"
    assert shard.tensors["ffn_down"].ne == (64, 64) and shard.tensors["ffn_up"].type == "Q8_0"
    assert ss.expert_bytes_total == sum(s.data_bytes for s in ss.experts())
    assert ss.checksummed and all(isinstance(s.crc32, int) for s in ss.experts())
    with pytest.raises(ShardSetError, match=r"no expert blk.2.0 \(expert layers \[0, 1\], 4 "
                                            r"experts\)"):
        ss.expert(2, 0)


def _tensor(proj, **kw):
    return lambda m: m["experts"][0]["tensors"][proj].update(**kw)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(version=2), r"version 2, this edgemoe reads version 1"),
    (lambda m: m.update(format="other"), r"format should be 'edgemoe.shardset'"),
    (lambda m: m.pop("n_expert"), r"key 'n_expert' missing"),
    (lambda m: m.update(n_layer="2"), r"key 'n_layer' should be int, got '2'"),
    (lambda m: m.update(n_expert=2**62), r"key 'n_expert' is 4611686018427387904, expected "
                                         r"1..1024"),
    (lambda m: m.update(fallbacks=-1), r"key 'fallbacks' should be a list of objects, got -1"),
    (lambda m: m.update(expert_layers=[1, 0]), r"expert_layers \[1, 0\] should be distinct"),
    (lambda m: m["experts"].pop(5), r"7 expert entries, expected 8 \(2 expert layers x 4\)"),
    (lambda m: m["experts"].__setitem__(5, m["experts"][4]), r"blk.1.0 is listed twice"),
    (_tensor("ffn_down", offset=10**9), r"expert blk.0.0 ffn_down: key 'offset' is 1000000000, "
                                        r"expected 0..\d+"),
    (_tensor("ffn_up", offset=100), r"expert blk.0.0: tensor ffn_up at 100 overlaps what "
                                    r"precedes it"),
    (_tensor("ffn_up", ne=[64.0, 64.0]), r"ffn_up: ne \[64.0, 64.0\], the model's n_embd 64 "
                                         r"and n_ff_exp 64 give \[64, 64\]"),
    (_tensor("ffn_up", ne=[64, 32]), r"ffn_up: ne \[64, 32\]"),
    (_tensor("ffn_up", type="I32"), r"ffn_up: tensor type 'I32' is not a ggml weight type"),
    (_tensor("ffn_up", nbytes=1), r"ffn_up: holds 1 bytes, Q8_0 \[64, 64\] needs 4352"),
    (lambda m: m["experts"][0].update(data_bytes=-5), r"key 'data_bytes' is -5, expected 0"),
    (lambda m: m["experts"][0].update(data_offset=100),
     r"expert blk.0.0: data_offset 100 is not the 4096-aligned start of ffn_gate"),
    (lambda m: m["experts"][0].update(crc32=-1), r"key 'crc32' is -1, expected 0..4294967295"),
    (lambda m: m["experts"][0].update(file="../outside.gguf"),
     r"file '../outside.gguf', the format fixes it to experts/blk.0.0.gguf"),
    (lambda m: m["base"].update(file="/etc/passwd"), r"base file '/etc/passwd', the format "
                                                     r"fixes it to base.gguf"),
    (lambda m: m["base"].update(bytes=1), r"base.gguf: \d+ bytes, manifest says 1"),
])
def test_damaged_manifest_is_refused(good_set, tmp_path, edit, message):
    with pytest.raises(ShardSetError, match=message) as info:
        ShardSet.open(damaged(good_set, tmp_path, edit))
    assert "\n" not in str(info.value)


def test_manifest_digest_catches_an_edit(good_set, tmp_path):
    out = damaged(good_set, tmp_path, lambda m: m.update(dense_type="F32"), seal=False)
    with pytest.raises(ShardSetError, match=r"manifest.json: its content does not match its "
                                            r"manifest_sha256"):
        ShardSet.open(out)


def test_links_and_special_files_are_refused(good_set, tmp_path):
    outside = tmp_path / "outside.gguf"
    shutil.copyfile(good_set / "experts" / "blk.0.0.gguf", outside)
    out = damaged(good_set, tmp_path, lambda m: None)
    shard = out / "experts" / "blk.0.0.gguf"
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(ShardSetError, match=r"blk.0.0.gguf: resolves to .*outside.gguf, outside "
                                            r"the shard set"):
        ShardSet.open(out)
    shard.unlink()
    shard.symlink_to("/dev/zero")
    with pytest.raises(ShardSetError, match=r"outside the shard set"):
        ShardSet.open(out)
    shard.unlink()
    shard.mkdir()
    with pytest.raises(ShardSetError, match=r"blk.0.0.gguf: is a directory, expected a regular "
                                            r"file"):
        ShardSet.open(out)
    shard.rmdir()
    os.mkfifo(shard)
    with pytest.raises(ShardSetError, match=r"blk.0.0.gguf: is a named pipe"):
        ShardSet.open(out)
    shard.unlink()
    # a link that stays inside the set is followed
    shutil.copyfile(outside, out / "experts" / "real.gguf")
    shard.symlink_to("real.gguf")
    ShardSet.open(out)


@pytest.mark.parametrize("content,message", [
    ("{not json", r"manifest.json: unreadable"),
    ("[" * 100000 + "]" * 100000, r"manifest.json: unreadable"),
    ('{"n": ' + "9" * 5000 + "}", r"manifest.json: unreadable"),
    ('{"format": "edgemoe.shardset", "version": 1, "n": NaN}', r"key 'arch' missing"),
])
def test_unreadable_manifest(good_set, tmp_path, content, message):
    out = tmp_path / "shards"
    shutil.copytree(good_set, out)
    (out / MANIFEST_FILE).write_text(content)
    with pytest.raises(ShardSetError, match=message) as info:
        ShardSet.open(out)
    assert "\n" not in str(info.value)


def test_not_a_shard_set_says_what_it_is(good_set, tmp_path):
    with pytest.raises(ShardSetError, match=r"nowhere: not a directory"):
        ShardSet.open(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShardSetError, match=r"empty: not a shard set \(no manifest.json; "
                                            r"expected a directory written by `edgemoe convert`"):
        ShardSet.open(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(ShardSetError, match=r"empty: a Hugging Face checkpoint, not a shard set"):
        ShardSet.open(empty)
    partial = tmp_path / "partial"
    shutil.copytree(good_set, partial)
    (partial / MANIFEST_FILE).unlink()
    with pytest.raises(ShardSetError, match=r"manifest.json: missing; the shard set is "
                                            r"incomplete \(an interrupted conversion"):
        ShardSet.open(partial)


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
