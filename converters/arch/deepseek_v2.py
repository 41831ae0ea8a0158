"""DeepSeek-V2 / V2-Lite: multi-head latent attention, dense first layers, shared experts and a
routed scaling factor, written as llama.cpp's converter writes them (MLA with absorption).

kv_b_proj (n_head * (qk_nope + v_head), kv_lora_rank) is split per head into attn_k_b (each
head's key part, transposed: (n_head, kv_lora_rank, qk_nope)) and attn_v_b (each head's value
part: (n_head, v_head, kv_lora_rank)); the attention keys are then one latent head, so
head_count_kv is 1, key_length kv_lora_rank + qk_rope and value_length kv_lora_rank, with the
per-head sizes in key_length_mla / value_length_mla.
"""
from __future__ import annotations

import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR

from converters.arch.base import (DENSE, F32, HParams, MoeArchitecture, TensorSpec, rope_scaling,
                                  tensor_name)
from edgemoe.errors import ConvertError


class DeepseekV2(MoeArchitecture):
    gguf_arch = MODEL_ARCH.DEEPSEEK2
    hf_architectures = ("DeepseekV2ForCausalLM",)

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        if config.get("topk_method", "greedy") != "greedy" and (config.get("n_group") or 1) > 1:
            raise ConvertError(f"config.json: topk_method={config['topk_method']!r} with "
                               f"n_group={config['n_group']} is not supported (greedy only)")
        if config.get("attention_bias"):
            raise ConvertError("config.json: attention_bias=true; llama.cpp's deepseek2 graph "
                               "has no attention biases")
        scaling = rope_scaling(config)
        if scaling["rope_type"] == "yarn" and scaling.get("mscale") != scaling.get("mscale_all_dim"):
            raise ConvertError("config.json: YaRN with mscale != mscale_all_dim; llama.cpp's "
                               "deepseek2 graph assumes them equal")
        if (config.get("moe_layer_freq") or 1) != 1:
            raise ConvertError("config.json: moe_layer_freq != 1 is not supported")

    def attention_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        p, E, M = f"model.layers.{layer}.self_attn", hp.n_embd, MODEL_TENSOR
        H, L, R, q_rank = hp.n_head, hp.n_lora_kv, hp.n_rot, hp.n_lora_q
        nope, dv, D = hp.head_dim_mla - R, hp.head_dim_v_mla, hp.head_dim_mla
        if q_rank:
            q = [self.spec(hp, f"{p}.q_a_proj.weight", (q_rank, E), DENSE),
                 self.spec(hp, f"{p}.q_a_layernorm.weight", (q_rank,), F32),
                 self.spec(hp, f"{p}.q_b_proj.weight", (H * D, q_rank), DENSE)]
        else:
            q = [self.spec(hp, f"{p}.q_proj.weight", (H * D, E), DENSE)]
        kv_b = (H * (nope + dv), L)

        def k_b(x: np.ndarray) -> np.ndarray:   # (H * (nope + dv), L) -> (H, L, nope)
            return x.reshape(H, nope + dv, L)[:, :nope, :].transpose(0, 2, 1)

        def v_b(x: np.ndarray) -> np.ndarray:   # -> (H, dv, L)
            return x.reshape(H, nope + dv, L)[:, nope:, :]

        return q + [
            self.spec(hp, f"{p}.kv_a_proj_with_mqa.weight", (L + R, E), DENSE),
            self.spec(hp, f"{p}.kv_a_layernorm.weight", (L,), F32),
            # kv_b_proj split in two, which gguf's TensorNameMap does not know of
            TensorSpec(f"{p}.kv_b_proj.weight", tensor_name(M.ATTN_K_B, layer), kv_b, DENSE,
                       k_b, out_shape=(H, L, nope), source_rows=kv_b[0]),
            TensorSpec(f"{p}.kv_b_proj.weight", tensor_name(M.ATTN_V_B, layer), kv_b, DENSE,
                       v_b, out_shape=(H, dv, L), source_rows=kv_b[0]),
            self.spec(hp, f"{p}.o_proj.weight", (E, H * dv), DENSE),
        ]

    def moe_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        p, E = f"model.layers.{layer}.mlp", hp.n_embd
        if layer in hp.expert_layers:
            p, F = f"{p}.shared_experts", hp.n_ff_shared
            specs = super().moe_specs(hp, layer)
        else:
            F, specs = hp.n_ff, []
        return specs + [self.spec(hp, f"{p}.gate_proj.weight", (F, E), DENSE),
                        self.spec(hp, f"{p}.up_proj.weight", (F, E), DENSE),
                        self.spec(hp, f"{p}.down_proj.weight", (E, F), DENSE)]


ARCH = DeepseekV2()
