"""edgemoe.gguf_header against gguf-py's GGUFReader, and damaged headers as clear errors."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from edgemoe.errors import ShardSetError
from edgemoe.gguf_header import GGUFHeader


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("hdr") / "x.gguf"
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_block_count(3)
    w.add_float32("f", 0.5)
    w.add_string("s", "héllo")
    w.add_array("ints", [1, 2, 3])
    w.add_array("big", list(range(70_000)))
    w.add_token_list([f"t{i}" for i in range(5000)])
    w.add_tensor("a.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b.weight", np.ones((3, 5), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_header_matches_gguf_reader(sample):
    h, r = GGUFHeader(sample), gguf.GGUFReader(sample)
    assert h.fields[gguf.Keys.LLM.BLOCK_COUNT.format(arch="qwen3moe")].contents() == 3
    assert h.fields["f"].contents() == 0.5 and h.fields["s"].contents() == "héllo"
    assert h.fields["ints"].contents() == [1, 2, 3]
    # Long arrays and string arrays are counted, not kept.
    assert h.fields["big"].value is None and h.fields["big"].count == 70_000
    assert h.fields[gguf.Keys.Tokenizer.LIST].count == 5000
    assert [t.name for t in h.tensors] == [t.name for t in r.tensors]
    for a, b in zip(h.tensors, r.tensors):
        assert a.shape == tuple(int(x) for x in b.shape)
        assert (a.n_bytes, a.data_offset) == (int(b.n_bytes), int(b.data_offset))
        assert int(a.tensor_type) == int(b.tensor_type)


@pytest.mark.parametrize("cut", [3, 20, 200, 2000, -40])
def test_a_truncated_file_is_a_clear_error(sample, tmp_path, cut):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(sample.read_bytes()[:cut])
    with pytest.raises(ShardSetError, match="bad.gguf"):
        GGUFHeader(bad)


def test_huge_counts_are_refused_without_allocating(sample, tmp_path):
    data = bytearray(sample.read_bytes())
    data[16:24] = struct.pack("<Q", 1 << 40)          # n_kv
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardSetError, match="do not fit the file"):
        GGUFHeader(bad)
