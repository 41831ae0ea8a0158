"""DeepSeek-V2 / V2-Lite: multi-head latent attention, shared experts beside the routed ones,
dense first layers and a routed scaling factor.

Attention is stored and run the way llama.cpp's converter writes it (MLA with the absorption
trick): per token the cache holds one latent row, the compressed KV (kv_lora_rank, RMS-normalised)
followed by the RoPE'd shared key part (n_rot); that row is the single key head (MQA), and its
first kv_lora_rank values are the value head, so no separate V cache exists. Each query head's
no-RoPE part is taken into the latent space by attn_k_b, and each head's attention output out of
it by attn_v_b. q comes from attn_q (V2-Lite, q_lora_rank absent) or from the low-rank pair
attn_q_a -> RMSNorm -> attn_q_b. Scores are scaled by 1/sqrt(qk_nope + qk_rope), RoPE is the
interleaved (NORM) kind, and routing is softmax top-k without renormalisation, times
expert_weights_scale; the shared experts are one plain SwiGLU FFN added to the routed output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from gguf.constants import Keys, MODEL_TENSOR

from edgemoe import ggml
from edgemoe.arch.common import Decoder, HParams, tensor_name
from edgemoe.errors import ShardSetError
from edgemoe.hparams import Param, rope_scaled, table
from edgemoe.ggml import GGMLType

GATING_SOFTMAX = 1  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX


@dataclass(frozen=True)
class DeepseekV2HParams(HParams):
    n_lora_q: int = 0            # 0: q is one projection (V2-Lite)
    n_lora_kv: int = 0
    head_dim_mla: int = 0        # qk_nope + qk_rope: a query head before absorption
    head_dim_v_mla: int = 0      # v_head_dim: a value head after attn_v_b
    n_layer_dense_lead: int = 0
    n_expert_shared: int = 0
    kq_mscale: float = 1.0       # YaRN's magnitude correction, squared into the score scale

    @property
    def n_embd_v(self) -> int:
        return 0  # values are read from the latent key cache

    @property
    def n_ff_shared(self) -> int:
        return self.n_ff_exp * self.n_expert_shared

    @classmethod
    def derive(cls, values: dict) -> dict:
        gating = values.pop("expert_gating_func")
        if gating != GATING_SOFTMAX:
            raise ShardSetError(f"{Keys.LLM.EXPERT_GATING_FUNC}={gating}: only softmax gating "
                                "(DeepSeek-V2) is supported")
        # YaRN as llama.cpp's deepseek2 sets it up: the converter stores 0.1 * mscale_all_dim;
        # the rotation keeps magnitude 1 and the scores take mscale^2 instead.
        log_ln = math.log(1.0 / values["rope_freq_scale"])
        mscale_all_dim = values.pop("rope_yarn_log_mul") / 0.1
        attn = values["rope_attn_factor"]
        if values["rope_ext_factor"] and mscale_all_dim:
            attn /= 1.0 + 0.1 * log_ln
        mscale = attn * (1.0 + 0.1 * log_ln) * (1.0 + 0.1 * mscale_all_dim * log_ln)
        return {"rope_attn_factor": attn, "kq_mscale": mscale}


class DeepseekV2(Decoder):
    name = "deepseek2"
    hf_names = ("deepseek_v2",)
    rope_mode = ggml.ROPE_NORM
    hparams_class = DeepseekV2HParams

    @classmethod
    def params(cls):
        """MLA as llama.cpp's converter writes it: one latent key head of kv_lora_rank +
        qk_rope values, whose first kv_lora_rank are the value head."""
        K, A, R = Keys.LLM, Keys.Attention, Keys.Rope
        return {**super().params(), **table(
            Param(K.EXPERT_COUNT, "n_expert", "n_routed_experts"),
            Param(A.HEAD_COUNT_KV, "n_head_kv", lambda c: 1),
            Param(A.KEY_LENGTH, "head_dim", lambda c: c["kv_lora_rank"] + c["qk_rope_head_dim"]),
            Param(A.VALUE_LENGTH, "head_dim_v", "kv_lora_rank"),
            Param(R.DIMENSION_COUNT, "n_rot", "qk_rope_head_dim"),
            # llama.cpp reads q_lora_rank unless it recognises a Lite model by its layer count.
            Param(A.Q_LORA_RANK, "n_lora_q", lambda c: c.get("q_lora_rank") or 0, default=0),
            Param(A.KV_LORA_RANK, "n_lora_kv", "kv_lora_rank"),
            Param(A.KEY_LENGTH_MLA, "head_dim_mla",
                  lambda c: c["qk_nope_head_dim"] + c["qk_rope_head_dim"]),
            Param(A.VALUE_LENGTH_MLA, "head_dim_v_mla", "v_head_dim"),
            Param(K.LEADING_DENSE_BLOCK_COUNT, "n_layer_dense_lead",
                  lambda c: min(c.get("first_k_dense_replace") or 0, c["num_hidden_layers"]),
                  default=0),
            Param(K.EXPERT_FEED_FORWARD_LENGTH, "n_ff_exp", "moe_intermediate_size"),
            Param(K.EXPERT_SHARED_COUNT, "n_expert_shared", "n_shared_experts", default=0),
            Param(K.EXPERT_WEIGHTS_SCALE, "expert_weights_scale",
                  lambda c: c.get("routed_scaling_factor", 1.0), float, 1.0),
            Param(K.EXPERT_GATING_FUNC, "expert_gating_func", lambda c: GATING_SOFTMAX,
                  default=GATING_SOFTMAX),
            # llama.cpp's convention: 0.1 * mscale_all_dim (its loader divides by 0.1 again)
            Param(R.SCALING_YARN_LOG_MUL, "rope_yarn_log_mul",
                  lambda c: 0.1 * float(rope_scaled("yarn", "mscale_all_dim")(c) or 0) or None,
                  float, 0.0))}

    @classmethod
    def attention_tensors(cls, hp: DeepseekV2HParams, il: int) -> dict:
        E, H, L, M = hp.n_embd, hp.n_head, hp.n_lora_kv, MODEL_TENSOR
        nope = hp.head_dim_mla - hp.n_rot
        if hp.n_lora_q:
            q = {tensor_name(M.ATTN_Q_A, il): ((E, hp.n_lora_q), True),
                 tensor_name(M.ATTN_Q_A_NORM, il): ((hp.n_lora_q,), True),
                 tensor_name(M.ATTN_Q_B, il): ((hp.n_lora_q, H * hp.head_dim_mla), True)}
        else:
            q = {tensor_name(M.ATTN_Q, il): ((E, H * hp.head_dim_mla), True)}
        return {**q,
                tensor_name(M.ATTN_KV_A_MQA, il): ((E, L + hp.n_rot), True),
                tensor_name(M.ATTN_KV_A_NORM, il): ((L,), True),
                tensor_name(M.ATTN_K_B, il): ((nope, L, H), True),
                tensor_name(M.ATTN_V_B, il): ((L, hp.head_dim_v_mla, H), True),
                tensor_name(M.ATTN_OUT, il): ((H * hp.head_dim_v_mla, E), True)}

    @classmethod
    def moe_tensors(cls, hp: DeepseekV2HParams, il: int) -> dict:
        E, S, M = hp.n_embd, hp.n_ff_shared, MODEL_TENSOR
        return {**super().moe_tensors(hp, il),
                tensor_name(M.FFN_GATE_SHEXP, il): ((E, S), True),
                tensor_name(M.FFN_UP_SHEXP, il): ((E, S), True),
                tensor_name(M.FFN_DOWN_SHEXP, il): ((S, E), True)}

    def attention(self, o, gf, x, il, inputs, n_tokens, n_kv):
        hp, w, M = self.hp, self.w, MODEL_TENSOR
        H, L, R, T = hp.n_head, hp.n_lora_kv, hp.n_rot, n_tokens
        Dq, nope = hp.head_dim_mla, hp.head_dim_mla - hp.n_rot
        if hp.n_lora_q:
            q = self.norm(o, o.mul_mat(w.get(M.ATTN_Q_A, il), x), M.ATTN_Q_A_NORM, il)
            q = o.mul_mat(w.get(M.ATTN_Q_B, il), q)
        else:
            q = o.mul_mat(w.get(M.ATTN_Q, il), x)
        q = o.reshape_3d(q, Dq, H, T)                                   # (Dq, H, T)
        f32 = ggml.row_size(GGMLType.F32, 1)
        q_nope = o.view_3d(q, nope, H, T, Dq * f32, Dq * H * f32, 0)
        q_pe = self.rope(o, o.view_3d(q, R, H, T, Dq * f32, Dq * H * f32, nope * f32), inputs)

        kv = o.mul_mat(w.get(M.ATTN_KV_A_MQA, il), x)                   # (L + R, T)
        latent = self.norm(o, o.view_2d(kv, L, T, (L + R) * f32, 0), M.ATTN_KV_A_NORM, il)
        k_pe = self.rope(o, o.view_3d(kv, R, 1, T, (L + R) * f32, (L + R) * f32, L * f32), inputs)

        # Each head's no-RoPE query in latent space: (nope, T, H) x attn_k_b -> (L, T, H).
        q_lat = o.mul_mat(w.get(M.ATTN_K_B, il), o.permute(q_nope, 0, 2, 1, 3))
        q = o.concat(o.permute(q_lat, 0, 2, 1, 3), q_pe, 0)             # (L + R, H, T)
        k = o.concat(o.reshape_3d(latent, L, 1, T), k_pe, 0)            # (L + R, 1, T)

        kv_t, D = self.kv.type, L + R
        k_all = o.set_rows(self.kv.k[il], o.reshape_2d(k, D, T), inputs["kv_idx"])
        ggml.lib.ggml_build_forward_expand(gf, k_all)
        row = ggml.row_size(kv_t, D)
        k_view = o.view_3d(k_all, D, n_kv, 1, row, row * n_kv, 0)      # (L + R, n_kv, 1)
        v_view = o.view_3d(k_all, L, n_kv, 1, row, row * n_kv, 0)      # the latent part
        att = o.flash_attn(o.permute(q, 0, 2, 1, 3), k_view, v_view, inputs[self.mask_of(il)],
                           hp.kq_mscale ** 2 / math.sqrt(Dq))           # (L, H, T)
        # Out of latent space per head: (L, T, H) x attn_v_b -> (Dv, T, H) -> (Dv * H, T).
        out = o.mul_mat(w.get(M.ATTN_V_B, il), o.permute(att, 0, 2, 1, 3))
        out = o.cont(o.permute(out, 0, 2, 1, 3))
        return o.mul_mat(w.get(M.ATTN_OUT, il), o.reshape_2d(out, hp.head_dim_v_mla * H, T))

    def shared_expert(self, o, h, il):
        w, M = self.w, MODEL_TENSOR
        return self.ffn(o, h, w.get(M.FFN_GATE_SHEXP, il), w.get(M.FFN_UP_SHEXP, il),
                        w.get(M.FFN_DOWN_SHEXP, il))


MODEL = DeepseekV2
