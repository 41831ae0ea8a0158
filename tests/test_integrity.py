"""Read-time integrity: a flipped byte in any tensor's data of base.gguf or of an expert shard
(or in base.gguf's header) is reported at load or at that expert's read, naming the file; swap
skips an expert it cannot read with one warning, ondemand fails the step that needs it."""
import json
import shutil
import warnings
from pathlib import Path

import pytest

import converters
import edgemoe
from edgemoe.errors import ShardSetError
from edgemoe.gguf_header import read_header
from edgemoe.shardset import CHECKSUM_KEY, ShardSet

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "edgemoe-tiny-shakespy"


@pytest.fixture(scope="module")
def good_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity") / "shards"
    converters.convert(BUNDLED, out, progress=False)
    return out


@pytest.fixture
def shards(good_set, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(good_set, out)
    return out


def flip(path: Path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ 0x10]))


def generate(shards, n=8, **kw):
    with edgemoe.Model(shards, n_ctx=128, n_threads=1, **kw) as m:
        return m.generate("ROMEO:", max_tokens=n, temperature=0)


@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_flipped_byte_in_base_tensor_data(shards, which):
    h = read_header(shards / "base.gguf")
    t = {"first": h.tensors[0], "middle": h.tensors[len(h.tensors) // 2],
         "last": h.tensors[-1]}[which]
    flip(shards / "base.gguf", t.offset + t.nbytes // 2)
    with pytest.raises(ShardSetError, match=rf"base.gguf: tensor {t.name} fails its checksum"):
        generate(shards)


def test_flipped_byte_in_base_header(shards):
    data = (shards / "base.gguf").read_bytes()
    flip(shards / "base.gguf", data.index(b"edgemoe-tiny-shakespy") + 3)  # general.name
    with pytest.raises(ShardSetError, match=r"base.gguf: its header .* fails its checksum"):
        generate(shards)


@pytest.mark.parametrize("where", [0, 0.5, 1])
def test_flipped_byte_in_expert_data_full(shards, where):
    shard = ShardSet.open(shards).expert(2, 5)
    flip(shard.path, shard.data_offset + min(int(where * shard.data_bytes), shard.data_bytes - 1))
    with pytest.raises(ShardSetError, match=r"experts/blk.2.5.gguf: expert data fails its "
                                            r"checksum"):
        generate(shards)


def test_swapped_expert_files_are_caught(shards):
    a, b = shards / "experts" / "blk.1.2.gguf", shards / "experts" / "blk.1.3.gguf"
    tmp = a.with_suffix(".x")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    with pytest.raises(ShardSetError, match=r"blk.1.[23].gguf: holds 'edgemoe.expert' layer 1 "
                                            r"expert [23], the manifest lists it as"):
        generate(shards)


def _corrupt_every_expert(shards):
    for shard in ShardSet.open(shards).experts():
        flip(shard.path, shard.data_offset + 7)


def test_ondemand_fails_the_step_that_reads_a_corrupt_expert(shards):
    with edgemoe.Model(shards, n_ctx=128, n_threads=1, memory_budget="50%",
                       policy="ondemand") as m:
        _corrupt_every_expert(shards)  # after the experts it warmed were read
        with pytest.raises(ShardSetError, match=r"experts/blk\.\d\.\d\.gguf: expert data fails "
                                                r"its checksum"):
            m.generate("ROMEO: what light through yonder window breaks", max_tokens=32,
                       temperature=0)


def test_swap_skips_a_corrupt_expert_with_one_warning(shards):
    with edgemoe.Model(shards, n_ctx=256, n_threads=1, memory_budget="50%", policy="swap") as m:
        _corrupt_every_expert(shards)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text = m.generate("ROMEO: what light through yonder window breaks", max_tokens=96,
                              temperature=0)
        failed = m.engine.policy._failed
    swap_warnings = [w for w in caught if "swap:" in str(w.message)]
    assert sum(len(f) for f in failed.values()) >= 1, "no swap was attempted"
    assert len(swap_warnings) == 1 and "fails its checksum" in str(swap_warnings[0].message)
    assert text


def test_a_set_without_checksums_runs_with_a_warning(shards, good_set):
    m = json.loads((shards / "manifest.json").read_text())
    del m[CHECKSUM_KEY], m["base"]["tensor_crc32"], m["base"]["header_crc32"]
    for e in m["experts"]:
        del e["crc32"]
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(RuntimeWarning, match=r"without checksums; .*reconvert"):
        assert generate(shards) == generate(good_set)


def test_checksums_recorded_match_the_files(good_set):
    ss = ShardSet.open(good_set)
    import zlib
    for shard in ss.experts():
        data = shard.path.read_bytes()[shard.data_offset:shard.data_offset + shard.data_bytes]
        assert zlib.crc32(data) == shard.crc32
    base = (good_set / "base.gguf").read_bytes()
    h = read_header(good_set / "base.gguf")
    assert zlib.crc32(base[:h.data_start]) == ss.base_header_crc32
    assert {t.name: zlib.crc32(base[t.offset:t.offset + t.nbytes]) for t in h.tensors} \
        == ss.base_crc32
    ss.verify()
