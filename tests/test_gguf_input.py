"""A stock GGUF as input. export -> convert the GGUF back -> the expert shards are
byte-identical to the ones converted from safetensors (no requantization), for single and split
GGUF files and for mixed K-quant types."""
import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter, Keys

import converters
from converters.gguf_source import copy_metadata
from edgemoe.hparams import EXPERT_LAYERS_KEY
from edgemoe.shardset import ShardSet
from tiny_models import cached_checkpoint


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tiny"


def assert_same_shard_sets(a, b):
    sa, sb = ShardSet.open(a), ShardSet.open(b)
    sb.verify()
    assert (sa.arch, sa.n_layer, sa.n_expert, sa.expert_layers) == \
        (sb.arch, sb.n_layer, sb.n_expert, sb.expert_layers)
    for ea in sa.experts():
        eb = sb.expert(ea.layer, ea.expert)
        assert ea.path.read_bytes() == eb.path.read_bytes(), ea.path.name
        assert ea.tensors == eb.tensors
    ra, rb = GGUFReader(sa.base_path), GGUFReader(sb.base_path)
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    assert sorted(ta) == sorted(tb)
    for name, t in ta.items():
        assert t.tensor_type == tb[name].tensor_type, name
        assert np.asarray(t.data).tobytes() == np.asarray(tb[name].data).tobytes(), name
    T = Keys.Tokenizer
    for key in (T.LIST, T.MERGES, T.MODEL, T.CHAT_TEMPLATE,
                Keys.LLM.EXPERT_COUNT.format(arch=sa.arch),
                Keys.Rope.FREQ_BASE.format(arch=sa.arch), EXPERT_LAYERS_KEY):
        assert ra.fields[key].contents() == rb.fields[key].contents(), key


@pytest.mark.parametrize("arch,expert_type,dense_type,hidden", [
    ("qwen2_moe", "Q8_0", "Q8_0", 64),
    ("mixtral", "F16", "BF16", 64),
    ("qwen3_moe", "Q4_K", "Q6_K", 256),   # ffn_down falls back to Q5_0: mixed types per expert
    ("phimoe", "Q8_0", "Q8_0", 64),       # norm and output biases, an edgemoe key of its own
    ("deepseek_v2_q_lora", "Q8_0", "Q8_0", 64),  # MLA's 3-D attn_k_b / attn_v_b, a dense layer
    ("gpt_oss", "MXFP4", "Q8_0", 64),     # expert biases sliced with their experts, MXFP4
])
def test_gguf_round_trip_is_byte_exact(tiny_root, tmp_path, arch, expert_type, dense_type,
                                       hidden):
    ckpt = cached_checkpoint(tiny_root, arch, tokenizer="bpe", hidden_size=hidden)
    first = tmp_path / "from_safetensors"
    converters.convert(ckpt, first, expert_type=expert_type, dense_type=dense_type,
                       progress=False)
    gguf_path = converters.export(first, tmp_path / "model.gguf")
    second = tmp_path / "from_gguf"
    plan = converters.convert(gguf_path, second, progress=False)
    assert plan.source["kind"] == "gguf"
    assert_same_shard_sets(first, second)


def write_split(src, out_path, max_tensors: int) -> list:
    """Rewrite a GGUF as a split -0000k-of-0000N set with gguf-py's writer."""
    reader = GGUFReader(src)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(out_path, reader.fields["general.architecture"].contents(),
                   split_max_tensors=max_tensors)
    copy_metadata(reader, w, skip=lambda k: False)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(out_path.parent.glob(f"{out_path.stem}-*-of-*.gguf"))


def test_split_gguf_input(tiny_root, tmp_path):
    ckpt = cached_checkpoint(tiny_root, "olmoe", tokenizer="bpe")
    first = tmp_path / "from_safetensors"
    converters.convert(ckpt, first, expert_type="Q8_0", progress=False)
    single = converters.export(first, tmp_path / "model.gguf")
    parts = write_split(single, tmp_path / "split" / "model.gguf", max_tensors=10)
    assert len(parts) >= 3 and parts[0].name == f"model-00001-of-{len(parts):05d}.gguf"
    second = tmp_path / "from_split"
    converters.convert(parts[0], second, progress=False)
    assert_same_shard_sets(first, second)
    # a missing part is named
    parts[-1].unlink()
    from edgemoe.errors import ConvertError
    with pytest.raises(ConvertError, match=rf"{parts[-1].name}: missing part {len(parts)} of"):
        converters.convert(parts[0], tmp_path / "x", progress=False)
