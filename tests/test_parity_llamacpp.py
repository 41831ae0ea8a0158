"""The runtime against llama.cpp: a shard set and the same weights exported as one GGUF, run by
llama-cpp-python, give the same greedy 64-token continuation and logits within 1e-2 of the
logit range (same quant types, same KV cache type).

llama.cpp is run with flash attention on, the attention kernel edgemoe uses (llama-cpp-python
defaults to the soft_max path, whose F16 rounding of the attention probabilities differs by
~0.5% of the logit range on Q8_0 weights), and without extra buffer types: on this machine's CPU
llama.cpp picks its AMX Q8_0 kernels for them and crashes in ggml_backend_amx_mul_mat.
"""
from __future__ import annotations

import numpy as np
import pytest

from tiny_models import ARCHS, LLAMACPP_GRAPH_DIFFERS, make_tiny_checkpoint

pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")

from llamacpp_ref import open_llama  # noqa: E402

import converters  # noqa: E402
from edgemoe.engine import Engine  # noqa: E402

N_GENERATE = 64
PROMPT = [3, 17, 42, 99, 7, 250, 31, 8]


def _llama(path, n_ctx: int):
    return open_llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True,
                      flash_attn=True)


def _greedy_llamacpp(path) -> tuple[list[int], np.ndarray]:
    llm = _llama(path, 128)
    llm.eval(PROMPT)
    out, logits = [], []
    for _ in range(N_GENERATE):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        logits.append(row)
        out.append(int(row.argmax()))
        llm.eval([out[-1]])
    llm.close()
    return out, np.stack(logits)


def _greedy_edgemoe(shards) -> tuple[list[int], np.ndarray]:
    with Engine(shards, n_ctx=128, n_threads=1) as engine:
        row = engine.eval(PROMPT)[-1]
        out, logits = [], []
        for _ in range(N_GENERATE):
            logits.append(row)
            out.append(int(row.argmax()))
            row = engine.eval([out[-1]])[-1]
    return out, np.stack(logits)


def _same_as_llamacpp(tmp_path, arch, expert_type="Q8_0"):
    ckpt = make_tiny_checkpoint(arch, tmp_path / "hf", seed=2)
    shards = tmp_path / "shards"
    converters.convert(ckpt, shards, expert_type=expert_type, dense_type="Q8_0", progress=False)
    gguf_path = converters.export(shards, tmp_path / "model.gguf")

    ref_tokens, ref_logits = _greedy_llamacpp(gguf_path)
    tokens, logits = _greedy_edgemoe(shards)

    assert tokens == ref_tokens
    span = float(ref_logits.max() - ref_logits.min())
    assert np.abs(logits - ref_logits).max() <= 1e-2 * span


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in LLAMACPP_GRAPH_DIFFERS])
def test_same_greedy_continuation_and_logits(tmp_path, arch):
    _same_as_llamacpp(tmp_path, arch)


def test_mxfp4_experts(tmp_path):
    """gpt-oss's published expert type: MXFP4 expert slots under mul_mat_id, biases beside."""
    _same_as_llamacpp(tmp_path, "gpt_oss", expert_type="MXFP4")


def test_phimoe_differs_from_llamacpp_only_by_its_graph(tmp_path, monkeypatch):
    """llama.cpp's phimoe graph (src/models/phi3.cpp) applies RMSNorm where PhiMoE has LayerNorm
    (both add the bias) and renormalised softmax top-2 where it has sparsemixer. edgemoe follows
    transformers (test_parity_transformers); with those two pieces swapped for llama.cpp's, the
    exported GGUF runs identically in both, so the export and everything else agree."""
    from edgemoe import arch as arch_registry
    from edgemoe.arch.common import Decoder
    from edgemoe.arch.phimoe import Phimoe

    class LlamaCppPhimoe(Phimoe):
        expert_weights_norm = True

        def norm(self, o, x, kind, il=None):
            y = o.mul(o.rms_norm(x, self.hp.rms_eps), self.w.get(kind, il))
            return o.add(y, self.w.get(kind, il, "bias"))

        def gate(self, o, logits, n_tokens):
            return Decoder.gate(self, o, logits, n_tokens)

    monkeypatch.setitem(arch_registry.models(), "phimoe", LlamaCppPhimoe)
    _same_as_llamacpp(tmp_path, "phimoe")
