"""OLMoE: RMSNorm of q and k over all heads at once (before splitting into heads), NEOX RoPE,
top-k weights not renormalised."""
from gguf.constants import MODEL_TENSOR

from edgemoe.arch.common import Decoder, HParams, tensor_name


class Olmoe(Decoder):
    name = "olmoe"
    hf_names = ("olmoe",)

    @classmethod
    def attention_tensors(cls, hp: HParams, il: int) -> dict:
        return {**super().attention_tensors(hp, il),
                tensor_name(MODEL_TENSOR.ATTN_Q_NORM, il): ((hp.n_embd_q,), True),
                tensor_name(MODEL_TENSOR.ATTN_K_NORM, il): ((hp.n_embd_kv,), True)}

    def qkv(self, o, x, il, n_tokens):
        hp, M = self.hp, MODEL_TENSOR
        q = self.norm(o, self.project(o, M.ATTN_Q, il, x), M.ATTN_Q_NORM, il)
        k = self.norm(o, self.project(o, M.ATTN_K, il, x), M.ATTN_K_NORM, il)
        return (o.reshape_3d(q, hp.head_dim, hp.n_head, n_tokens),
                o.reshape_3d(k, hp.head_dim, hp.n_head_kv, n_tokens),
                self.project(o, M.ATTN_V, il, x))


MODEL = Olmoe
