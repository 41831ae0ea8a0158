"""Convert tiny random checkpoints of every architecture, read every tensor back.

F32 output must be bit-exact with the source, Q8_0 output equal to ggml's own quantize ->
dequantize round trip of the same tensor. Source values come from safetensors' own reader
(numpy / torch), independent of converters.safetensors.
"""
import json

import numpy as np
import pytest
from gguf import GGUFReader
from safetensors.numpy import load_file

import converters
from converters import registry
from converters.arch.base import EXPERT_F32, F32
from edgemoe import quant
from edgemoe.quant import GGMLType
from edgemoe.shardset import ALIGNMENT, ShardSet, expert_tensor_name
from tiny_models import ARCHS, cached_checkpoint


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tiny"


def source_tensors(ckpt) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def read_back(shards) -> dict[str, np.ndarray]:
    """Every tensor of a shard set, dequantized, keyed by its GGUF name."""
    ss = ShardSet.open(shards)
    out = {}
    for t in GGUFReader(ss.base_path).tensors:
        shape = tuple(int(n) for n in reversed(list(t.shape)))
        out[t.name] = quant.dequantize(np.asarray(t.data).reshape(-1).view(np.uint8),
                                       GGMLType(t.tensor_type), shape)
    for shard in ss.experts():
        raw = shard.path.read_bytes()
        for proj, info in shard.tensors.items():
            data = np.frombuffer(raw, np.uint8, info.nbytes, info.offset)
            out[expert_tensor_name(shard.layer, shard.expert, proj)] = quant.dequantize(
                data, info.type, tuple(reversed(info.ne)))
    return out


def expected(ckpt, kind_type) -> dict[str, np.ndarray]:
    """What each GGUF tensor must hold: the source (transformed as the arch says) after the
    round trip through the type the converter was asked for."""
    config = json.loads((ckpt / "config.json").read_text())
    arch = registry.for_hf(config["architectures"])
    hp = arch.hparams(config)
    src = source_tensors(ckpt)
    out = {}
    for s in arch.tensor_specs(hp):
        rows = src[s.hf_name].astype(np.float32).reshape(-1, s.shape[-1])
        if s.source_rows is not None:  # a transform that reshapes what it reads
            x = s.transform(rows[s.row_offset:s.row_offset + s.source_rows])
        else:
            x = rows[s.row_offset:s.row_offset + s.n_rows].reshape(s.written_shape)
            if s.transform:
                x = s.transform(x)
        t = GGMLType.F32 if s.kind in (F32, EXPERT_F32) else kind_type
        out[s.gguf_name] = quant.dequantize(quant.quantize(x, t), t, x.shape)
    for name, values in arch.generated_tensors(hp):  # from config.json, kept in float32
        out[name] = np.asarray(values, dtype=np.float32)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_every_tensor_round_trips(tiny_root, tmp_path, arch, qtype):
    ckpt = cached_checkpoint(tiny_root, arch, tokenizer="bpe")
    out = tmp_path / "shards"
    plan = converters.convert(ckpt, out, expert_type=qtype, dense_type=qtype, progress=False)
    assert not plan.fallbacks
    got, want = read_back(out), expected(ckpt, GGMLType[qtype])
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    if qtype == "F32":  # bit-exact with the source itself, not only with our round trip
        src = source_tensors(ckpt)
        emb = src["model.embed_tokens.weight"]
        np.testing.assert_array_equal(got["token_embd.weight"].view(np.uint32), emb.view(np.uint32))


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_and_metadata(tiny_root, tmp_path, arch):
    ckpt = cached_checkpoint(tiny_root, arch, tokenizer="bpe")
    out = tmp_path / "shards"
    plan = converters.convert(ckpt, out, expert_type="Q8_0", progress=False)
    ss = ShardSet.open(out)
    ss.verify()
    config = json.loads((ckpt / "config.json").read_text())
    n_expert = config.get("num_local_experts",
                          config.get("num_experts", config.get("n_routed_experts")))
    n_layer, layers = config["num_hidden_layers"], plan.hp.expert_layers
    assert (ss.n_layer, ss.n_expert, ss.n_expert_used) == (n_layer, n_expert, 2)
    assert ss.expert_layers == layers and len(list(ss.experts())) == len(layers) * n_expert
    for shard in ss.experts():
        assert shard.data_offset % ALIGNMENT == 0
        keys = ss.expert_tensors  # the three projections (+ their biases)
        offsets = [shard.tensors[p].offset for p in keys]
        assert offsets == sorted(offsets) and all(o % ALIGNMENT == 0 for o in offsets)
        # one contiguous run: each tensor starts where the previous one's padding ends
        for a, b in zip(keys[:-1], keys[1:]):
            end = shard.tensors[a].offset + shard.tensors[a].nbytes
            assert shard.tensors[b].offset == -(-end // ALIGNMENT) * ALIGNMENT
        r = GGUFReader(shard.path)
        assert r.fields["general.architecture"].contents() == "edgemoe.expert"
        assert r.fields["general.alignment"].contents() == ALIGNMENT
        assert (r.fields["edgemoe.layer"].contents(), r.fields["edgemoe.expert"].contents()) == \
            (shard.layer, shard.expert)
        assert [t.name for t in r.tensors] == [expert_tensor_name(shard.layer, shard.expert, p)
                                               for p in keys]
        assert [int(t.data_offset) for t in r.tensors] == offsets
    base = GGUFReader(ss.base_path)
    kv = {k: f.contents() for k, f in base.fields.items()}
    a = plan.arch
    assert kv["general.architecture"] == a
    assert kv[f"{a}.expert_count"] == n_expert and kv[f"{a}.expert_used_count"] == 2
    assert kv[f"{a}.block_count"] == n_layer and kv[f"{a}.embedding_length"] == 64
    assert kv["edgemoe.format_version"] == 1 and kv["edgemoe.expert_layers"] == list(layers)
    assert kv["edgemoe.expert_type"] == "Q8_0" and kv["edgemoe.dense_type"] == "Q8_0"
    assert kv["tokenizer.ggml.model"] == "gpt2" and len(kv["tokenizer.ggml.tokens"]) == \
        config["vocab_size"]
    # routers and norms stay float32 as llama.cpp keeps them
    types = {t.name: GGMLType(t.tensor_type) for t in base.tensors}
    assert types[f"blk.{layers[0]}.ffn_gate_inp.weight"] is GGMLType.F32
    assert types["blk.0.attn_norm.weight"] is GGMLType.F32
    assert types["blk.0.attn_output.weight"] is GGMLType.Q8_0


def test_bf16_and_f16_sources_convert_exactly(tiny_root, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch

    for dtype in ("bfloat16", "float16"):
        ckpt = cached_checkpoint(tiny_root, "qwen3_moe", tokenizer="bpe", dtype=dtype)
        out = tmp_path / dtype
        converters.convert(ckpt, out, expert_type="F32", dense_type="F32", progress=False)
        got = read_back(out)
        src = load_torch(ckpt / "model.safetensors")
        assert src["model.embed_tokens.weight"].dtype == getattr(torch, dtype)
        np.testing.assert_array_equal(got["token_embd.weight"],
                                      src["model.embed_tokens.weight"].float().numpy())
        np.testing.assert_array_equal(got["blk.1.ffn_down.3.weight"],
                                      src["model.layers.1.mlp.experts.3.down_proj.weight"]
                                      .float().numpy())


def test_multi_file_checkpoint_equals_single_file(tiny_root, tmp_path):
    single = cached_checkpoint(tiny_root, "olmoe", tokenizer="bpe")
    multi = cached_checkpoint(tiny_root, "olmoe", tokenizer="bpe", max_shard_size="100KB")
    assert (multi / "model.safetensors.index.json").is_file()
    assert len(list(multi.glob("*.safetensors"))) > 1
    for name, ckpt in (("a", single), ("b", multi)):
        converters.convert(ckpt, tmp_path / name, expert_type="Q8_0", progress=False)
    experts = sorted((tmp_path / "a" / "experts").glob("*.gguf"))
    assert len(experts) == 8
    for f in experts:
        assert f.read_bytes() == (tmp_path / "b" / "experts" / f.name).read_bytes(), f
    # base.gguf differs only in general.name (the directory name)
    a, b = read_back(tmp_path / "a"), read_back(tmp_path / "b")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_k_quants_and_fallbacks_are_planned(tiny_root, tmp_path):
    # hidden 256: expert rows of 256 fit Q4_K; ffn_down rows (n_ff_exp = 64) do not.
    ckpt = cached_checkpoint(tiny_root, "qwen3_moe", tokenizer="bpe", hidden_size=256)
    out = tmp_path / "shards"
    plan = converters.convert(ckpt, out, expert_type="q4_k", dense_type="q6_k", progress=False)
    ss = ShardSet.open(out)
    shard = ss.expert(0, 0)
    assert shard.tensors["ffn_gate"].type == "Q4_K" and shard.tensors["ffn_up"].type == "Q4_K"
    assert shard.tensors["ffn_down"].type == "Q5_0"
    falls = {f["tensor"]: f for f in ss.fallbacks}
    assert falls["blk.0.ffn_down.0.weight"]["requested"] == "Q4_K"
    assert falls["blk.0.ffn_down.0.weight"]["used"] == "Q5_0"
    assert "64" in falls["blk.0.ffn_down.0.weight"]["why"]
    # attn_output rows are n_head * head_dim = 64 wide: Q6_K falls back to Q8_0
    assert falls["blk.0.attn_output.weight"]["used"] == "Q8_0"
    assert len(plan.fallbacks) == len(ss.fallbacks)
    got = read_back(out)
    src = source_tensors(ckpt)["model.layers.0.mlp.experts.0.gate_proj.weight"]
    want = quant.dequantize(quant.quantize(src, GGMLType.Q4_K), GGMLType.Q4_K, src.shape)
    np.testing.assert_array_equal(got["blk.0.ffn_gate.0.weight"], want)


def test_dry_run_prints_plan_and_writes_nothing(tiny_root, tmp_path, capsys):
    from edgemoe.cli import main

    ckpt = cached_checkpoint(tiny_root, "mixtral", tokenizer="bpe")
    out = tmp_path / "never"
    assert main(["convert", str(ckpt), str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "token_embd.weight" in text and "blk.0.ffn_gate_inp.weight" in text
    assert "fallback from Q4_K" in text and "Q5_0" in text
    assert "blk.*.ffn_down.*" in text and "expert shards" in text and "dry run" in text


def test_tied_embeddings_write_output_from_the_embedding(tiny_root, tmp_path):
    ckpt = cached_checkpoint(tiny_root, "qwen3_moe", tokenizer="bpe", tie_word_embeddings=True)
    assert "lm_head.weight" not in source_tensors(ckpt)
    out = tmp_path / "shards"
    converters.convert(ckpt, out, expert_type="Q8_0", dense_type="F16", progress=False)
    got = read_back(out)
    np.testing.assert_array_equal(got["output.weight"], got["token_embd.weight"])
