"""Qwen3-MoE: RMS norms on each head's queries and keys (attn_q_norm / attn_k_norm)."""
from __future__ import annotations

from gguf import MODEL_ARCH

from converters.arch.base import F32, HParams, MoeArchitecture, TensorSpec
from edgemoe.errors import ConvertError


class Qwen3Moe(MoeArchitecture):
    gguf_arch = MODEL_ARCH.QWEN3MOE
    hf_architectures = ("Qwen3MoeForCausalLM",)
    hf_norm_topk_default = False

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise ConvertError("config.json: dense layers (mlp_only_layers / decoder_sparse_step) "
                               "are not supported by llama.cpp's qwen3moe graph")

    def attention_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        p = f"model.layers.{layer}.self_attn"
        return super().attention_specs(hp, layer) + [
            self.spec(hp, f"{p}.{x}_norm.weight", (hp.head_dim,), F32) for x in "qk"]


ARCH = Qwen3Moe()
