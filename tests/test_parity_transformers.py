"""The engine against transformers on tiny random models.

Per architecture: F32 shards reproduce transformers' logits over a teacher-forced 32-token
sequence within 1e-3 of the logit range; batched prefill equals token-by-token decode; Q8_0
shards stay within mean KL 0.01 of the F32 reference.

Top-1 agreement of Q8_0 is ~95% on these random models, not the 99% the issue asks: their
routers and logits are near-uniform (median top-1 margin ~3.5% of the logit range), so Q8_0 noise
flips expert choices and near-tied tokens. `python scripts/q8_agreement.py` shows whose doing it
is: llama.cpp on the same Q8_0 weights gives logits bit-identical to ours and the same ~95%, and
transformers in float32 on the Q8_0-rounded weights (exact arithmetic) reaches only 95-98%; the
random-model test asserts 0.9 as a regression guard. On the bundled trained model (confident
predictions, as a real LM makes) Q8_0 agrees on 99.0% of 4096 teacher-forced tokens of Python
source with mean KL 0.0002; that test asserts 0.985 so that another CPU's rounding cannot flake it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tiny_models import ARCHS, make_tiny_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import converters  # noqa: E402
from edgemoe.engine import Engine  # noqa: E402

N_TOKENS = 32
# PhiMoE's sparsemixer drops experts past a hard relative threshold, so rounding moves whole
# routing weights: transformers in float32 on the Q8_0-rounded weights agrees with itself on only
# 91% of these positions (scripts/q8_agreement.py), edgemoe's Q8_0 on 88%.
Q8_TOP1 = {"phimoe": 0.85}
N_SEQS = 4  # 128 teacher-forced positions for the Q8_0 statistics


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """arch -> (sequences (N_SEQS, N_TOKENS), transformers logits, shard dirs by type)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"parity_{arch}")
            ckpt = make_tiny_checkpoint(arch, root / "hf", seed=1)
            model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
            rng = np.random.default_rng(7)
            seqs = rng.integers(0, model.config.vocab_size, (N_SEQS, N_TOKENS))
            with torch.no_grad():
                logits = model(torch.tensor(seqs)).logits.numpy()  # (N_SEQS, N_TOKENS, n_vocab)
            shards = {}
            for qtype in ("F32", "Q8_0"):
                shards[qtype] = root / qtype
                converters.convert(ckpt, shards[qtype], expert_type=qtype, dense_type=qtype,
                                   progress=False)
            cache[arch] = (seqs, logits, shards)
        return cache[arch]

    return get


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_match_transformers(reference, arch):
    seqs, ref, shards = reference(arch)
    with Engine(shards["F32"], n_ctx=64, kv_type="f32", n_threads=1) as engine:
        engine.eval(seqs[0, :5])  # a stale context must not leak into the next sequence
        engine.reset()
        prefill = engine.eval(seqs[0])
        engine.reset()
        decode = np.concatenate([engine.eval(seqs[0, i:i + 1]) for i in range(N_TOKENS)])
    span = float(ref[0].max() - ref[0].min())
    assert prefill.shape == ref[0].shape
    assert np.abs(prefill - ref[0]).max() <= 1e-3 * span
    assert np.abs(decode - ref[0]).max() <= 1e-3 * span
    # Batched prefill and one-token decode run different kernels (mul_mat_id over many tokens
    # vs one); they must still agree far tighter than the transformers tolerance.
    assert np.abs(prefill - decode).max() <= 1e-4 * span


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_agrees_with_f32_reference(reference, arch):
    seqs, ref, shards = reference(arch)
    with Engine(shards["Q8_0"], n_ctx=64, n_threads=1) as engine:
        got = []
        for seq in seqs:
            engine.reset()
            got.append(engine.eval(seq))
    got = np.stack(got)  # (N_SEQS, N_TOKENS, n_vocab)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    p, q = _softmax(ref.astype(np.float64)), _softmax(got.astype(np.float64))
    kl = float((p * (np.log(p) - np.log(q))).sum(-1).mean())
    assert top1 >= Q8_TOP1.get(arch, 0.9), f"top-1 agreement {top1:.3f}"
    assert kl < 0.01, f"mean KL {kl:.5f}"


def test_prefill_split_into_batches_equals_one_batch(reference):
    """n_batch smaller than the prompt: the prompt runs as several graphs over the cache."""
    seqs, _, shards = reference("qwen3_moe")
    with Engine(shards["F32"], n_ctx=64, kv_type="f32", n_batch=7, n_threads=1) as split, \
            Engine(shards["F32"], n_ctx=64, kv_type="f32", n_threads=1) as whole:
        a, b = split.eval(seqs[1]), whole.eval(seqs[1])
    assert np.abs(a - b).max() <= 1e-4 * float(b.max() - b.min())


BUNDLED = Path(__file__).resolve().parent.parent / "models" / "edgemoe-tiny-shakespy"


@pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="no bundled model")
def test_q8_0_on_the_bundled_trained_model(tmp_path):
    """Teacher-forced over Python standard-library source (fixed text, in the model's domain)."""
    import argparse
    import json.decoder
    import textwrap

    n_seq, n_tok = 32, 128
    tok = transformers.AutoTokenizer.from_pretrained(BUNDLED)
    text = "".join(Path(m.__file__).read_text() for m in (json.decoder, textwrap, argparse))
    seqs = np.array(tok(text)["input_ids"][:n_seq * n_tok]).reshape(n_seq, n_tok)
    model = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor(seqs)).logits.numpy()
    converters.convert(BUNDLED, tmp_path / "q8", expert_type="Q8_0", dense_type="Q8_0",
                       progress=False)
    with Engine(tmp_path / "q8", n_ctx=n_tok, n_threads=1) as engine:
        got = []
        for seq in seqs:
            engine.reset()
            got.append(engine.eval(seq))
    got = np.stack(got)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    p, q = _softmax(ref.astype(np.float64)), _softmax(got.astype(np.float64))
    kl = float((p * (np.log(p) - np.log(q))).sum(-1).mean())
    assert top1 >= 0.985, f"top-1 agreement {top1:.4f}"
    assert kl < 0.01, f"mean KL {kl:.5f}"
