"""Qwen2-MoE: qkv biases (the common attention's optional ones), NEOX RoPE, top-k weights not
renormalised, and a shared expert whose output is scaled by sigmoid(ffn_gate_inp_shexp x)."""
from gguf.constants import MODEL_TENSOR, Keys

from edgemoe.arch.common import Decoder, HParams, tensor_name
from edgemoe.hparams import Param, table


class Qwen2Moe(Decoder):
    name = "qwen2moe"
    hf_names = ("qwen2_moe",)

    @classmethod
    def params(cls):
        K = Keys.LLM
        return {**super().params(), **table(
            Param(K.EXPERT_FEED_FORWARD_LENGTH, "n_ff_exp", "moe_intermediate_size"),
            Param(K.EXPERT_SHARED_FEED_FORWARD_LENGTH, "n_ff_shexp",
                  "shared_expert_intermediate_size"))}

    @classmethod
    def moe_tensors(cls, hp: HParams, il: int) -> dict:
        E, S, M = hp.n_embd, hp.n_ff_shexp, MODEL_TENSOR
        return {**super().moe_tensors(hp, il),
                tensor_name(M.FFN_GATE_INP_SHEXP, il): ((E,), True),
                tensor_name(M.FFN_GATE_SHEXP, il): ((E, S), True),
                tensor_name(M.FFN_UP_SHEXP, il): ((E, S), True),
                tensor_name(M.FFN_DOWN_SHEXP, il): ((S, E), True)}

    def shared_expert(self, o, h, il):
        w, M = self.w, MODEL_TENSOR
        shexp = self.ffn(o, h, w.get(M.FFN_GATE_SHEXP, il), w.get(M.FFN_UP_SHEXP, il),
                         w.get(M.FFN_DOWN_SHEXP, il))
        gate = o.sigmoid(o.mul_mat(w.get(M.FFN_GATE_INP_SHEXP, il), h))  # (1, n_tokens)
        return o.mul(shexp, gate)


MODEL = Qwen2Moe
