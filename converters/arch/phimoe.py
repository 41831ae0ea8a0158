"""PhiMoE (Phi-3.5-MoE): the Mixtral checkpoint layout (block_sparse_moe, experts w1/w3/w2) with
LayerNorm biases, optional attention and lm_head biases, NEOX RoPE (q/k rows kept as they are)
and sparsemixer routing of two experts, whose jitter epsilon goes into an edgemoe key."""
from __future__ import annotations

import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR

from converters.arch.base import (F32, HParams, MoeArchitecture, TensorSpec, rope_scaling,
                                  tensor_name)
from edgemoe.errors import ConvertError


class Phimoe(MoeArchitecture):
    gguf_arch = MODEL_ARCH.PHIMOE
    rope_scalings = ("default", "longrope")
    hf_architectures = ("PhimoeForCausalLM", "PhiMoEForCausalLM")  # transformers', the hub's
    moe_prefix = "block_sparse_moe"
    expert_proj = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        if hp.n_expert_used != 2:
            raise ConvertError(f"config.json: num_experts_per_tok={hp.n_expert_used}; PhiMoE's "
                               "sparsemixer routing picks exactly 2 experts")
        rope = rope_scaling(config)
        if rope["rope_type"] == "longrope" and rope.get("short_mscale") != rope.get("long_mscale"):
            raise ConvertError("config.json: LongRoPE with short_mscale != long_mscale; one "
                               "rope.scaling.attn_factor cannot hold both")

    def attention_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        specs = super().attention_specs(hp, layer)
        return specs + self.biases(hp, layer) if hp.config.get("attention_bias") else specs

    def layer_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        return super().layer_specs(hp, layer) + [
            self.spec(hp, f"model.layers.{layer}.{norm}.bias", (hp.n_embd,), F32)
            for norm in ("input_layernorm", "post_attention_layernorm")]

    def tensor_specs(self, hp: HParams) -> list[TensorSpec]:
        specs = super().tensor_specs(hp) + [self.spec(hp, "model.norm.bias", (hp.n_embd,), F32)]
        if hp.config.get("lm_head_bias"):
            specs.append(self.spec(hp, "lm_head.bias", (hp.n_vocab,), F32))
        return specs

    def generated_tensors(self, hp: HParams) -> list[tuple[str, np.ndarray]]:
        """LongRoPE's per-pair frequency factors, short and long."""
        rope = rope_scaling(hp.config)
        if rope["rope_type"] != "longrope":
            return []
        return [(tensor_name(MODEL_TENSOR.ROPE_FACTORS_LONG), np.array(rope["long_factor"])),
                (tensor_name(MODEL_TENSOR.ROPE_FACTORS_SHORT), np.array(rope["short_factor"]))]


ARCH = Phimoe()
