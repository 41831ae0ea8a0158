"""Qwen3-MoE: RMSNorm of each head's q and k before NEOX RoPE; llama.cpp always renormalises the
top-k weights for this architecture."""
from gguf.constants import MODEL_TENSOR, Keys

from edgemoe.arch.common import Decoder, HParams, tensor_name
from edgemoe.hparams import Param, table


class Qwen3Moe(Decoder):
    name = "qwen3moe"
    hf_names = ("qwen3_moe",)
    expert_weights_norm = True

    @classmethod
    def params(cls):
        return {**super().params(), **table(
            Param(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, "n_ff_exp", "moe_intermediate_size"))}

    @classmethod
    def attention_tensors(cls, hp: HParams, il: int) -> dict:
        return {**super().attention_tensors(hp, il),
                tensor_name(MODEL_TENSOR.ATTN_Q_NORM, il): ((hp.head_dim,), True),
                tensor_name(MODEL_TENSOR.ATTN_K_NORM, il): ((hp.head_dim,), True)}

    def qkv(self, o, x, il, n_tokens):
        q, k, v = super().qkv(o, x, il, n_tokens)  # q, k: (head_dim, heads, n_tokens)
        M = MODEL_TENSOR
        return self.norm(o, q, M.ATTN_Q_NORM, il), self.norm(o, k, M.ATTN_K_NORM, il), v


MODEL = Qwen3Moe
