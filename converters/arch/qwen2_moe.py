"""Qwen2-MoE: q/k/v biases and a shared expert scaled by a sigmoid gate (ffn_gate_inp_shexp)."""
from __future__ import annotations

from gguf import MODEL_ARCH, MODEL_TENSOR

from converters.arch.base import (DENSE, F32, HParams, MoeArchitecture, TensorSpec,
                                  tensor_name)
from edgemoe.errors import ConvertError


class Qwen2Moe(MoeArchitecture):
    gguf_arch = MODEL_ARCH.QWEN2MOE
    hf_architectures = ("Qwen2MoeForCausalLM",)
    hf_norm_topk_default = False

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        # llama.cpp's qwen2moe graph has no dense layers.
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise ConvertError("config.json: dense layers (mlp_only_layers / decoder_sparse_step) "
                               "are not supported by llama.cpp's qwen2moe graph")

    def attention_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        p = f"model.layers.{layer}.self_attn"
        q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        return super().attention_specs(hp, layer) + [
            TensorSpec(f"{p}.{proj}_proj.bias", tensor_name(t, layer, "bias"), (n,), F32)
            for proj, t, n in (("q", MODEL_TENSOR.ATTN_Q, q), ("k", MODEL_TENSOR.ATTN_K, kv),
                               ("v", MODEL_TENSOR.ATTN_V, kv))]

    def moe_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        p = f"model.layers.{layer}.mlp"
        return super().moe_specs(hp, layer) + [
            # HF keeps the gate as a (1, n_embd) linear layer; llama.cpp wants a vector.
            TensorSpec(f"{p}.shared_expert_gate.weight",
                       tensor_name(MODEL_TENSOR.FFN_GATE_INP_SHEXP, layer), (1, hp.n_embd), F32,
                       out_shape=(hp.n_embd,)),
            TensorSpec(f"{p}.shared_expert.gate_proj.weight",
                       tensor_name(MODEL_TENSOR.FFN_GATE_SHEXP, layer),
                       (hp.n_ff_shexp, hp.n_embd), DENSE),
            TensorSpec(f"{p}.shared_expert.up_proj.weight",
                       tensor_name(MODEL_TENSOR.FFN_UP_SHEXP, layer),
                       (hp.n_ff_shexp, hp.n_embd), DENSE),
            TensorSpec(f"{p}.shared_expert.down_proj.weight",
                       tensor_name(MODEL_TENSOR.FFN_DOWN_SHEXP, layer),
                       (hp.n_embd, hp.n_ff_shexp), DENSE),
        ]


ARCH = Qwen2Moe()
