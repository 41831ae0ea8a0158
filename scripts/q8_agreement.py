#!/usr/bin/env python3
"""How far Q8_0 weights move the predictions of the tiny random test models, and whose doing it is.

For each runtime architecture: a tiny random checkpoint (tests/tiny_models.py, seed 1), converted
with every matrix in Q8_0 (routers and norms stay F32, as llama.cpp keeps them), teacher-forced
over random token sequences. Against transformers in float32 it prints top-1 agreement and mean
KL of
- edgemoe on the Q8_0 shards,
- llama-cpp-python on the same shards exported as one GGUF (flash attention, as edgemoe runs),
- transformers itself in float32 with every Q8_0 matrix replaced by its dequantized value: the
  rounding of the weights alone, with exact arithmetic and unquantized activations,
and whether edgemoe's and llama.cpp's logits are identical.

    python scripts/q8_agreement.py [--seqs 16] [--tokens 32]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _stats(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || got))."""
    from edgemoe.residency.calibration import kl_divergence as _kl   # the KL calibration uses

    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    return top1, float(_kl(ref, got).mean())


def _rounded_reference(ckpt: Path, seqs: np.ndarray) -> np.ndarray:
    """transformers float32 logits with every matrix the converter stores as Q8_0 rounded
    through Q8_0 (blocks of 32 along the input dimension, as GGUF rows run)."""
    import torch
    import transformers

    from edgemoe import quant

    q8 = quant.parse_type("Q8_0")
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                continue   # norms, biases and routers are F32 in the shards
            rows = p.detach().numpy().reshape(-1, p.shape[-1])
            back = quant.dequantize(quant.quantize(rows, q8), q8, rows.shape)
            p.copy_(torch.from_numpy(back.reshape(tuple(p.shape))))
        return model(torch.tensor(seqs)).logits.numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=16, help="teacher-forced sequences per model")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per sequence")
    args = ap.parse_args()

    import torch
    import transformers

    import converters
    from edgemoe.engine import Engine
    from llamacpp_ref import open_llama
    from tiny_models import ARCHS, make_tiny_checkpoint

    print(f"{args.seqs} x {args.tokens} teacher-forced positions per model; top-1 / mean KL "
          "against transformers float32")
    print(f"{'arch':10s} {'edgemoe':>16s} {'llama.cpp':>16s} {'rounded weights':>16s}  "
          "edgemoe logits == llama.cpp's")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            root = Path(tmp) / arch
            ckpt = make_tiny_checkpoint(arch, root / "hf", seed=1)
            model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
            seqs = np.random.default_rng(7).integers(0, model.config.vocab_size,
                                                     (args.seqs, args.tokens))
            with torch.no_grad():
                ref = model.eval()(torch.tensor(seqs)).logits.numpy()
            converters.convert(ckpt, root / "q8", expert_type="Q8_0", dense_type="Q8_0",
                               progress=False)
            gguf = converters.export(root / "q8", root / "q8.gguf")
            with Engine(root / "q8", n_ctx=args.tokens, n_threads=1) as engine:
                ours = []
                for seq in seqs:
                    engine.reset()
                    ours.append(engine.eval(seq))
            ours = np.stack(ours)
            llm = open_llama(gguf, n_ctx=args.tokens, n_batch=args.tokens, n_threads=1,
                             logits_all=True, flash_attn=True)
            theirs = []
            for seq in seqs:
                llm.reset()
                llm.eval([int(t) for t in seq])
                theirs.append(np.array(llm.scores[:args.tokens], dtype=np.float32))
            llm.close()
            theirs = np.stack(theirs)
            rounded = _rounded_reference(ckpt, seqs)
            cells = [f"{t * 100:6.2f}% {kl:.5f}" for t, kl in
                     (_stats(ref, ours), _stats(ref, theirs), _stats(ref, rounded))]
            same = "yes" if np.array_equal(ours, theirs) else \
                f"no (max |diff| {np.abs(ours - theirs).max():.2e})"
            print(f"{arch:10s} {cells[0]:>16s} {cells[1]:>16s} {cells[2]:>16s}  {same}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
