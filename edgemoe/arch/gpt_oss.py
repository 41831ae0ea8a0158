"""gpt-oss: attention with q/k/v/o biases and a learned sink logit per head, sliding-window
attention on every other layer (even layers, as llama.cpp and transformers' default layer_types
have it), NEOX RoPE, a router with a bias whose top-k logits are softmaxed among themselves, and
experts with biases and a clamped SwiGLU: min(g, 7) * sigmoid(1.702 min(g, 7)) * (clamp(u, +-7) + 1)
(the constants llama.cpp fixes for this architecture). Expert biases travel in the expert shards
and sit in bias slots beside the weights; MXFP4 experts run as stored.

The published models' YaRN RoPE runs as llama.cpp runs it (ggml rounds the correction range to
whole dimensions; transformers' gpt-oss config asks for it unrounded, truncate=false), so on
those weights edgemoe matches llama.cpp and differs slightly from transformers.

The sliding-window layers still cache every position (the mask hides all but the last n_swa),
so they cost as much KV memory as the full layers. llama.cpp gives them a ring of
n_swa + n_ubatch cells instead (cell = position mod size; a batch must fit beside the window).
Here that needs more than this module: the engine's rewinds (`truncate`, used by prompt-prefix
reuse and sensitivity calibration) can only go back about size - n_swa positions before the
ring has overwritten what a rewound position attends to, so they would have to fall back to
re-evaluation; and the memory estimator sizes the KV cache per layer from n_ctx.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf.constants import Keys, MODEL_TENSOR

from edgemoe.arch.common import Decoder, HParams, kq_mask, tensor_name
from edgemoe.hparams import Param, table

SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0


@dataclass(frozen=True)
class GptOssHParams(HParams):
    n_swa: int = 0                 # sliding window of the even layers, in tokens


class GptOss(Decoder):
    name = "gpt-oss"
    hf_names = ("gpt_oss",)
    hparams_class = GptOssHParams

    @classmethod
    def params(cls):
        return {**super().params(), **table(
            Param(Keys.Attention.SLIDING_WINDOW, "n_swa", "sliding_window"),
            Param(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, "n_ff_exp", "intermediate_size"))}

    @classmethod
    def tensors(cls, hp: HParams) -> dict:
        out, M = super().tensors(hp), MODEL_TENSOR
        for il in range(hp.n_layer):
            del out[tensor_name(M.FFN_NORM, il)]
            out[tensor_name(M.ATTN_POST_NORM, il)] = ((hp.n_embd,), True)
            out[tensor_name(M.ATTN_SINKS, il)] = ((hp.n_head,), True)
            out[tensor_name(M.FFN_GATE_INP, il, "bias")] = ((hp.n_expert,), True)
        return out

    def masks(self, pos: np.ndarray, n_kv: int) -> dict[str, np.ndarray]:
        return {"kq_mask": kq_mask(pos, n_kv), "kq_mask_swa": kq_mask(pos, n_kv, self.hp.n_swa)}

    def mask_of(self, il: int) -> str:
        return "kq_mask_swa" if il % 2 == 0 else "kq_mask"

    def norm(self, o, x, kind, il=None):
        # The FFN's input norm is stored as the attention's post-norm.
        return super().norm(o, x, MODEL_TENSOR.ATTN_POST_NORM if kind == MODEL_TENSOR.FFN_NORM
                            else kind, il)

    def attention(self, o, gf, x, il, inputs, n_tokens, n_kv):
        q, k, v = self.qkv(o, x, il, n_tokens)
        q, k = self.rope(o, q, inputs), self.rope(o, k, inputs)
        att = self.attend(o, gf, q, k, v, il, inputs, n_tokens, n_kv,
                          1.0 / math.sqrt(self.hp.head_dim),
                          sinks=self.w.get(MODEL_TENSOR.ATTN_SINKS, il))
        return self.project(o, MODEL_TENSOR.ATTN_OUT, il, att)

    def router_logits(self, o, h, il):
        return self.project(o, MODEL_TENSOR.FFN_GATE_INP, il, h)

    def gate(self, o, logits, n_tokens):
        """Top-k of the logits, softmax over those k."""
        n, k = self.hp.n_expert, self.hp.n_expert_used
        selected = o.argsort_top_k(logits, k)                                 # (k, n_tokens)
        top = o.get_rows(o.reshape_3d(logits, 1, n, n_tokens), selected)      # (1, k, n_tokens)
        weights = o.soft_max(o.reshape_2d(top, k, n_tokens))
        return selected, o.reshape_3d(weights, 1, k, n_tokens)

    def expert_ffn(self, o, x3, il, ids, substitute=False):
        slots = self.slots.tensors(il, substitute)
        gate = o.add_id(o.mul_mat_id(slots["ffn_gate"], x3, ids), slots["ffn_gate.bias"], ids)
        up = o.add_id(o.mul_mat_id(slots["ffn_up"], x3, ids), slots["ffn_up.bias"], ids)
        out = o.mul_mat_id(slots["ffn_down"], o.swiglu_oai(gate, up, SWIGLU_ALPHA, SWIGLU_LIMIT),
                           ids)
        return o.add_id(out, slots["ffn_down.bias"], ids)


MODEL = GptOss
