"""OLMoE: RMS norms over all queries and all keys of a token (not per head), no renormalisation
of the top-k routing weights."""
from __future__ import annotations

from gguf import MODEL_ARCH

from converters.arch.base import F32, HParams, MoeArchitecture, TensorSpec
from edgemoe.errors import ConvertError


class Olmoe(MoeArchitecture):
    gguf_arch = MODEL_ARCH.OLMOE
    hf_architectures = ("OlmoeForCausalLM",)
    hf_norm_topk_default = False

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        # llama.cpp's olmoe graph sizes attn_k_norm as n_embd, i.e. without grouped-query heads.
        if hp.n_head_kv != hp.n_head:
            raise ConvertError(f"config.json: num_key_value_heads={hp.n_head_kv} differs from "
                               f"num_attention_heads={hp.n_head}; llama.cpp's olmoe graph has "
                               "no grouped-query attention")
        if config.get("clip_qkv") is not None:
            raise ConvertError("config.json: clip_qkv is not supported by llama.cpp's olmoe graph")

    def attention_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        p = f"model.layers.{layer}.self_attn"
        return super().attention_specs(hp, layer) + [
            self.spec(hp, f"{p}.q_norm.weight", (hp.n_head * hp.head_dim,), F32),
            self.spec(hp, f"{p}.k_norm.weight", (hp.n_head_kv * hp.head_dim,), F32)]


ARCH = Olmoe()
