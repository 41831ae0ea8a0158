"""Mixtral: llama.cpp runs it as GGUF arch "llama" with routed experts.

llama.cpp's llama graph applies RoPE to adjacent pairs of a head, while the HF checkpoint's
rotary embedding pairs the two halves of a head; reordering the rows of q_proj and k_proj inside
each head (first half and second half interleaved) makes the two agree.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from gguf import MODEL_ARCH

from converters.arch.base import Hparams, MoeArchitecture


def _interleave_halves(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    def permute(w: np.ndarray) -> np.ndarray:  # (n_head * head_dim, n_embd)
        rows, cols = w.shape
        half = rows // n_head // 2
        # (head, half-index, position-in-half, col) -> (head, position, half-index, col)
        return w.reshape(n_head, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)
    return permute


class Mixtral(MoeArchitecture):
    gguf_arch = MODEL_ARCH.LLAMA
    hf_architectures = ("MixtralForCausalLM",)
    expert_weights_norm = True
    moe_prefix = "block_sparse_moe"
    expert_proj = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}

    def n_ff_exp(self, config: dict) -> int:
        return config["intermediate_size"]

    def permute_q(self, hp: Hparams):
        return _interleave_halves(hp.n_head)

    def permute_k(self, hp: Hparams):
        return _interleave_halves(hp.n_head_kv)


ARCH = Mixtral()
