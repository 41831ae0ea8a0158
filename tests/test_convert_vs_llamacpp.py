"""Our conversion against llama.cpp's own converter (convert_hf_to_gguf.py from the llama.cpp
source that llama-cpp-python vendors), on the same tiny checkpoints.

Shards converted from the HF checkpoint (F32) must be byte-identical to shards sliced from the
GGUF that llama.cpp's converter writes, base tensors included (so q/k row order, names, shapes,
which tensors exist), and every metadata key it writes must be present with the same value
except the descriptive general.* ones. llama.cpp's converter only recognises published
tokenizers, so the run patches its vocabulary step (tokenizers are not compared here).

Needs the llama.cpp source: set LLAMA_CPP_SRC (default: the unpacked llama-cpp-python sdist).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

import converters
from edgemoe.shardset import ShardSet
from tiny_models import ARCHS, cached_checkpoint

SRC = Path(os.environ.get("LLAMA_CPP_SRC", "/tmp/x/llama_cpp_python-0.3.36/vendor/llama.cpp"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SRC / "convert_hf_to_gguf.py").is_file(),
                       reason=f"llama.cpp source not found at {SRC} (set LLAMA_CPP_SRC)"),
]

# Runs llama.cpp's converter with its tokenizer detection bypassed: BPE everywhere, and a
# pre-tokenizer name it accepts. Only tensors and hyper-parameters are compared.
WRAPPER = """
import sys
sys.path[:0] = [{src!r} + "/gguf-py", {src!r}]
import conversion.base as base
import conversion.llama as llama
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
convert_hf_to_gguf.main()
"""
DESCRIPTIVE = ("general.name", "general.basename", "general.finetune", "general.size_label",
               "general.type", "general.file_type")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tiny"


def metadata(reader: GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith(("GGUF.", "tokenizer.", "edgemoe.")) and k not in DESCRIPTIVE}


# llama.cpp registers PhiMoE under the hub's spelling (PhiMoEForCausalLM, not transformers'
# PhimoeForCausalLM) and builds its vocabulary from a SentencePiece model only.
NOT_COMPARED = ("phimoe",)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in NOT_COMPARED])
def test_same_as_llama_cpp_converter(tiny_root, tmp_path, arch):
    ckpt = cached_checkpoint(tiny_root, arch, tokenizer="bpe")
    wrapper = tmp_path / "run_llamacpp_converter.py"
    wrapper.write_text(WRAPPER.format(src=str(SRC)))
    stock = tmp_path / "stock.gguf"
    run = subprocess.run([sys.executable, str(wrapper), str(ckpt), "--outfile", str(stock),
                          "--outtype", "f32"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    converters.convert(ckpt, ours, expert_type="F32", dense_type="F32", progress=False)
    converters.convert(stock, theirs, progress=False)
    a, b = ShardSet.open(ours), ShardSet.open(theirs)
    for shard in a.experts():
        assert shard.path.read_bytes() == b.expert(shard.layer, shard.expert).path.read_bytes()
    ra, rb = GGUFReader(a.base_path), GGUFReader(b.base_path)
    ta = {t.name: np.asarray(t.data).tobytes() for t in ra.tensors}
    tb = {t.name: np.asarray(t.data).tobytes() for t in rb.tensors}
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name] == tb[name], name
    ka, kb = metadata(ra), metadata(rb)
    missing = sorted(set(kb) - set(ka))
    assert not missing, f"keys llama.cpp writes that we do not: {missing}"
    for key, value in kb.items():
        assert ka[key] == pytest.approx(value) if isinstance(value, float) else ka[key] == value, key
