"""Mixtral: llama.cpp runs it as GGUF arch "llama" with routed experts; q/k rows are reordered
for llama.cpp's RoPE layout."""
from __future__ import annotations

from gguf import MODEL_ARCH

from converters.arch.base import HParams, MoeArchitecture, interleave_rope_halves


class Mixtral(MoeArchitecture):
    gguf_arch = MODEL_ARCH.LLAMA
    hf_architectures = ("MixtralForCausalLM",)
    moe_prefix = "block_sparse_moe"
    expert_proj = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}

    def permute_q(self, hp: HParams):
        return interleave_rope_halves(hp.n_head)

    def permute_k(self, hp: HParams):
        return interleave_rope_halves(hp.n_head_kv)


ARCH = Mixtral()
