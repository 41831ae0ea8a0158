"""Every bad input fails at once with one clear line naming the file, tensor or key
and what was expected, and leaves no shard set behind."""
import errno
import json
import shutil
import struct
from collections import namedtuple

import numpy as np
import pytest
from gguf import GGUFWriter, Keys
from safetensors.numpy import load_file, save_file

import converters
from converters import writer
from edgemoe.cli import main
from edgemoe.errors import ConvertError, EdgeMoeError, UnsupportedArchitecture
from edgemoe.shardset import MANIFEST_FILE
from tiny_models import cached_checkpoint

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tiny"


@pytest.fixture
def ckpt(tiny_root, tmp_path):
    """A private copy of a tiny OLMoE checkpoint that a test may damage."""
    src = cached_checkpoint(tiny_root, "olmoe", tokenizer="bpe")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def convert_fails(src, out, match, exc=ConvertError, **kw):
    with pytest.raises(exc, match=match) as info:
        converters.convert(src, out, progress=False, **kw)
    assert "\n" not in str(info.value)
    assert not (out / MANIFEST_FILE).exists()
    return info.value


def edit_tensors(path, fn):
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_missing_tensor(ckpt, tmp_path):
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    edit_tensors(ckpt / WEIGHTS, lambda t: t.pop(name))
    convert_fails(ckpt, tmp_path / "out", rf"tensor {name} \(shape \[64, 64\]\) is missing")


def test_extra_tensor(ckpt, tmp_path):
    name = "model.layers.0.mlp.experts.9.up_proj.weight"
    edit_tensors(ckpt / WEIGHTS, lambda t: t.update({name: np.zeros((64, 64), np.float32)}))
    convert_fails(ckpt, tmp_path / "out", rf"{WEIGHTS}: unexpected tensor {name} ")


def test_rotary_buffers_are_not_extra_tensors(ckpt, tmp_path):
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    edit_tensors(ckpt / WEIGHTS, lambda t: t.update({name: np.ones(8, np.float32)}))
    converters.convert(ckpt, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / MANIFEST_FILE).is_file()


def test_shape_mismatch_against_config(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(config))
    convert_fails(ckpt, tmp_path / "out",
                  rf"{WEIGHTS}: tensor model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight has "
                  r"shape \[64, 64\], config.json implies \[96, 64\]")


def test_unsupported_dtype(ckpt, tmp_path):
    name = "model.layers.0.self_attn.q_norm.weight"
    edit_tensors(ckpt / WEIGHTS, lambda t: t.update({name: t[name].astype(np.float64)}))
    convert_fails(ckpt, tmp_path / "out",
                  rf"{WEIGHTS}: tensor {name} has unsupported dtype F64 \(supported: F32, F16, "
                  r"BF16\)")


def test_truncated_safetensors(ckpt, tmp_path):
    path = ckpt / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    convert_fails(ckpt, tmp_path / "out", rf"{WEIGHTS}: truncated: tensor \S+ needs data bytes")
    path.write_bytes(data[:5])
    convert_fails(ckpt, tmp_path / "out", rf"{WEIGHTS}: truncated safetensors file \(5 bytes")


def test_corrupt_safetensors_header(ckpt, tmp_path):
    path = ckpt / WEIGHTS
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json!!!!"
    path.write_bytes(bytes(data))
    convert_fails(ckpt, tmp_path / "out", rf"{WEIGHTS}: corrupt safetensors header")
    data[:8] = struct.pack("<Q", 1 << 40)
    path.write_bytes(bytes(data))
    convert_fails(ckpt, tmp_path / "out",
                  rf"{WEIGHTS}: corrupt or truncated safetensors header \(header length "
                  rf"{1 << 40} bytes")


def test_unsupported_architecture(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["GemmaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    err = convert_fails(ckpt, tmp_path / "out", r"\['GemmaForCausalLM'\] is not supported",
                        exc=UnsupportedArchitecture)
    for name in ("MixtralForCausalLM (GGUF llama)", "Qwen2MoeForCausalLM (GGUF qwen2moe)",
                 "Qwen3MoeForCausalLM (GGUF qwen3moe)", "OlmoeForCausalLM (GGUF olmoe)"):
        assert name in str(err)


def test_config_llama_cpp_cannot_run(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["norm_topk_prob"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    convert_fails(ckpt, tmp_path / "out", "norm_topk_prob=True, but llama.cpp's olmoe graph uses "
                                          "False")


def test_missing_config_and_source(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    convert_fails(ckpt, tmp_path / "out", rf"{ckpt}: no config.json")
    convert_fails(tmp_path / "nowhere", tmp_path / "out", "nowhere: no such file or directory")


def test_unknown_type_name(ckpt, tmp_path):
    convert_fails(ckpt, tmp_path / "out", "unsupported tensor type 'Q7_K'; supported: F32",
                  exc=EdgeMoeError, expert_type="Q7_K")


def test_existing_non_empty_out(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    convert_fails(ckpt, out, rf"{out}: exists and is not empty; pass --resume .* or --force")
    assert (out / "notes.txt").read_text() == "mine"
    # --force replaces a shard set but leaves files that are not ours
    converters.convert(ckpt, out, force=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and (out / MANIFEST_FILE).is_file()


def test_disk_full_before_writing(ckpt, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    convert_fails(ckpt, tmp_path / "out", r"disk full: .*out has 0.0 MB free, the conversion "
                                          r"needs about \d+\.\d MB more")


def test_disk_full_while_writing(ckpt, tmp_path, monkeypatch):
    # The disk fills up in the middle of an expert shard (ENOSPC from write).
    real_write = writer._HashingFile.write
    budget = {"bytes": 150_000}

    def write(self, data):
        n = memoryview(data).nbytes
        if budget["bytes"] < n:
            raise OSError(errno.ENOSPC, "No space left on device")
        budget["bytes"] -= n
        return real_write(self, data)

    monkeypatch.setattr(writer._HashingFile, "write", write)
    out = tmp_path / "out"
    convert_fails(ckpt, out, r"disk full while writing .*out/experts/blk\.\d\.\d\.gguf "
                             r"\(No space left on device\)")
    assert not list(out.rglob("*.tmp")), "no partial file may survive"


def test_corrupt_and_truncated_gguf(ckpt, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    convert_fails(bad, tmp_path / "out", r"bad.gguf: corrupt GGUF header at byte 8: GGUF "
                                         r"version 4294967295")
    bad.write_bytes(b"NOPE" * 32)
    convert_fails(bad, tmp_path / "out", r"bad.gguf: not a GGUF file \(magic b'NOPE'")
    shards = tmp_path / "shards"
    converters.convert(ckpt, shards, expert_type="Q8_0", progress=False)
    model = converters.export(shards, tmp_path / "model.gguf")
    data = model.read_bytes()
    model.write_bytes(data[:len(data) - 5000])
    convert_fails(model, tmp_path / "out2", r"model.gguf: tensor \S+ ends at byte \d+, past "
                                            r"the end of the \d+-byte file \(truncated\?\)")


def test_unsupported_or_dense_gguf(tmp_path):
    w = GGUFWriter(tmp_path / "gemma.gguf", "gemma")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    err = convert_fails(tmp_path / "gemma.gguf", tmp_path / "out",
                        "GGUF general.architecture 'gemma' is not supported; supported:",
                        exc=UnsupportedArchitecture)
    assert "qwen3moe" in str(err)
    w = GGUFWriter(tmp_path / "dense.gguf", "llama")
    for key, value in ((Keys.LLM.BLOCK_COUNT, 1), (Keys.LLM.EMBEDDING_LENGTH, 4),
                       (Keys.Attention.HEAD_COUNT, 1), (Keys.LLM.EXPERT_COUNT, 0)):
        w.add_uint32(key.format(arch="llama"), value)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    convert_fails(tmp_path / "dense.gguf", tmp_path / "out",
                  r"GGUF has no blk.0.ffn_gate_exps.weight \(fused expert tensors\); it is not a "
                  "MoE model")


def test_cli_prints_one_line_and_exits_1(ckpt, tmp_path, capsys):
    (ckpt / "config.json").unlink()
    assert main(["convert", str(ckpt), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgemoe convert: error: ") and "config.json" in err[0]
