"""Qwen2-MoE: q/k/v biases and a shared expert scaled by a sigmoid gate (ffn_gate_inp_shexp)."""
from __future__ import annotations

from gguf import MODEL_ARCH

from converters.arch.base import DENSE, F32, HParams, MoeArchitecture, TensorSpec
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
        return super().attention_specs(hp, layer) + self.biases(hp, layer, "qkv")

    def moe_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        p, E, S = f"model.layers.{layer}.mlp", hp.n_embd, hp.n_ff_shexp
        return super().moe_specs(hp, layer) + [
            # HF keeps the gate as a (1, n_embd) linear layer; llama.cpp wants a vector.
            self.spec(hp, f"{p}.shared_expert_gate.weight", (1, E), F32, out_shape=(E,)),
            self.spec(hp, f"{p}.shared_expert.gate_proj.weight", (S, E), DENSE),
            self.spec(hp, f"{p}.shared_expert.up_proj.weight", (S, E), DENSE),
            self.spec(hp, f"{p}.shared_expert.down_proj.weight", (E, S), DENSE)]


ARCH = Qwen2Moe()
