"""The exported single GGUF runs in unmodified llama.cpp (llama-cpp-python's Llama)
and computes what transformers computes in float32.

This is the check that each architecture's metadata (hparams, routing switches, q/k layout) is
what llama.cpp's graph expects: logits on a fixed 16-token input within 1e-3 of the logit range,
and identical greedy 32-token continuations.
"""
import numpy as np
import pytest

import converters
from tiny_models import ARCHS, LLAMACPP_GRAPH_DIFFERS, cached_checkpoint, load_reference

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from llamacpp_ref import open_llama  # noqa: E402

PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, 300, size=16)]
N_NEW = 32


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tiny"


def transformers_run(model, prompt: list[int], n_new: int):
    """(logits of the prompt, greedy continuation, each step's top-1 minus top-2 logit),
    recomputing the whole sequence each step."""
    tokens, margins = list(prompt), []
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].numpy()
        for _ in range(n_new):
            row = model(torch.tensor([tokens])).logits[0, -1]
            top = torch.topk(row, 2).values
            margins.append(float(top[0] - top[1]))
            tokens.append(int(row.argmax()))
    return logits, tokens[len(prompt):], margins


def llamacpp_run(gguf_path, prompt: list[int], n_new: int) -> tuple[np.ndarray, list[int]]:
    llm = open_llama(gguf_path, logits_all=True, n_ctx=64, n_batch=64, n_threads=2)
    llm.eval(prompt)
    logits = np.array(llm.scores[:len(prompt)])
    out = []
    for _ in range(n_new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    llm.close()
    return logits, out


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in LLAMACPP_GRAPH_DIFFERS])
def test_exported_gguf_matches_transformers(tiny_root, tmp_path, arch):
    tokenizer = "spm" if arch == "mixtral" else "bpe"
    ckpt = cached_checkpoint(tiny_root, arch, tokenizer=tokenizer)
    shards = tmp_path / "shards"
    converters.convert(ckpt, shards, expert_type="F32", dense_type="F32", progress=False)
    gguf_path = converters.export(shards, tmp_path / "model.gguf")

    ref_logits, ref_tokens, margins = transformers_run(load_reference(ckpt), PROMPT, N_NEW)
    got_logits, got_tokens = llamacpp_run(gguf_path, PROMPT, N_NEW)

    assert got_logits.shape == ref_logits.shape
    span = float(ref_logits.max() - ref_logits.min())
    diff = float(np.abs(got_logits - ref_logits).max())
    assert diff < 1e-3 * span, f"{arch}: max |logit diff| {diff:.2e} vs range {span:.2f}"
    # Equal up to the first step transformers itself decides by less than twice the logit error
    # just measured (a tie at float precision, which one rounding order breaks one way and
    # another the other way).
    n = next((i for i, m in enumerate(margins) if m < 2 * diff), N_NEW)
    assert got_tokens[:n] == ref_tokens[:n], f"{arch}: differs before step {n}"


def test_exported_quantized_gguf_loads_and_tracks_reference(tiny_root, tmp_path):
    # Q8_0 experts and dense weights: llama.cpp must load the fused quantized tensors; the
    # logits move by quantization noise only.
    ckpt = cached_checkpoint(tiny_root, "qwen2_moe", tokenizer="bpe")
    shards = tmp_path / "shards"
    converters.convert(ckpt, shards, expert_type="Q8_0", dense_type="Q8_0", progress=False)
    gguf_path = converters.export(shards, tmp_path / "model.gguf")
    ref_logits, _, _ = transformers_run(load_reference(ckpt), PROMPT, 0)
    got_logits, _ = llamacpp_run(gguf_path, PROMPT, 0)
    span = float(ref_logits.max() - ref_logits.min())
    assert float(np.abs(got_logits - ref_logits).max()) < 0.05 * span
    assert np.mean(got_logits.argmax(-1) == ref_logits.argmax(-1)) >= 0.9
