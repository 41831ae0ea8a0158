"""Qwen3-MoE: RMS norms on each head's queries and keys (attn_q_norm / attn_k_norm)."""
from __future__ import annotations

from gguf import GGUFWriter, MODEL_ARCH, MODEL_TENSOR

from converters.arch.base import F32, Hparams, MoeArchitecture, TensorSpec, cfg_get, tensor_name
from edgemoe.errors import ConvertError


class Qwen3Moe(MoeArchitecture):
    gguf_arch = MODEL_ARCH.QWEN3MOE
    hf_architectures = ("Qwen3MoeForCausalLM",)
    expert_weights_norm = True
    hf_norm_topk_default = False

    def n_ff_exp(self, config: dict) -> int:
        return cfg_get(config, "moe_intermediate_size")

    def check(self, config: dict, hp: Hparams) -> None:
        super().check(config, hp)
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise ConvertError("config.json: dense layers (mlp_only_layers / decoder_sparse_step) "
                               "are not supported by llama.cpp's qwen3moe graph")

    def attention_specs(self, hp: Hparams, layer: int) -> list[TensorSpec]:
        p = f"model.layers.{layer}.self_attn"
        return super().attention_specs(hp, layer) + [
            TensorSpec(f"{p}.q_norm.weight", tensor_name(MODEL_TENSOR.ATTN_Q_NORM, layer),
                       (hp.head_dim,), F32),
            TensorSpec(f"{p}.k_norm.weight", tensor_name(MODEL_TENSOR.ATTN_K_NORM, layer),
                       (hp.head_dim,), F32),
        ]

    def add_metadata(self, w: GGUFWriter, hp: Hparams, config: dict) -> None:
        super().add_metadata(w, hp, config)
        w.add_expert_feed_forward_length(hp.n_ff_exp)


ARCH = Qwen3Moe()
