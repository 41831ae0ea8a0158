"""PhiMoE (Phi-3.5-MoE): LayerNorm with biases, NEOX RoPE, optional attention and output biases,
and sparsemixer routing of exactly two experts.

Sparsemixer (transformers' PhimoeTopKRouter, inference): the first expert is the router's
argmax; its weight is its softmax probability among the experts whose logit s lies within a
relative distance of the max m, (m - s) / max(|s|, m) <= 2 * eps (eps: router_jitter_noise).
The second expert is the best of the others, weighted the same way among the others. So each
weight is 1 / sum over the kept experts of exp(s - m_j), computed here with step functions.

llama.cpp's phimoe graph differs from this: it applies RMSNorm (plus the bias) where the model
has LayerNorm, and renormalised softmax top-2 where it has sparsemixer, so its logits differ from
transformers' on the same GGUF; edgemoe follows transformers.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import MODEL_TENSOR, Keys

from edgemoe.arch.common import Decoder, HParams, tensor_name
from edgemoe.hparams import Param, rope_scaling, table

# Our own key (llama.cpp's graph has no use for it); Phi-3.5-MoE's value when absent.
ROUTER_JITTER_KEY = "edgemoe.router_jitter_eps"
DEFAULT_JITTER = 0.01
_NORMS = (MODEL_TENSOR.ATTN_NORM, MODEL_TENSOR.FFN_NORM)
_FLT_MAX = 3.4028234663852886e38


def _longrope_mscale(config: dict) -> float | None:
    scaling = rope_scaling(config)
    return (scaling.get("short_mscale") or 1.0) if scaling["rope_type"] == "longrope" else None


@dataclass(frozen=True)
class PhimoeHParams(HParams):
    router_jitter_eps: float = DEFAULT_JITTER


class Phimoe(Decoder):
    name = "phimoe"
    hf_names = ("phimoe",)
    hparams_class = PhimoeHParams

    @classmethod
    def params(cls):
        # LongRoPE's magnitude: transformers scales cos and sin by short_mscale (= long_mscale);
        # llama.cpp's converter would write sqrt(1 + ln(scale) / ln(original context)).
        return {**super().params(), **table(
            Param(ROUTER_JITTER_KEY, "router_jitter_eps",
                  lambda c: c.get("router_jitter_noise", DEFAULT_JITTER), float, DEFAULT_JITTER),
            Param(Keys.Rope.SCALING_ATTN_FACTOR, "rope_attn_factor", _longrope_mscale, float,
                  1.0))}

    @classmethod
    def tensors(cls, hp: HParams) -> dict:
        E, M = hp.n_embd, MODEL_TENSOR
        out = super().tensors(hp)
        out[tensor_name(M.OUTPUT_NORM, None, "bias")] = ((E,), True)
        out[tensor_name(M.OUTPUT, None, "bias")] = ((hp.n_vocab,), False)
        for il in range(hp.n_layer):
            for kind in _NORMS:
                out[tensor_name(kind, il, "bias")] = ((E,), True)
        for kind in (M.ROPE_FACTORS_SHORT, M.ROPE_FACTORS_LONG):  # LongRoPE, when it has it
            out[tensor_name(kind)] = ((hp.n_rot // 2,), False)
        return out

    def rope_factors(self):
        """LongRoPE's short factors, or its long ones for a context beyond the original one (as
        llama.cpp chooses; cos and sin are scaled by rope.scaling.attn_factor either way)."""
        M = MODEL_TENSOR
        long = self.kv.n_ctx > self.hp.n_ctx_orig
        return self.w.get(M.ROPE_FACTORS_LONG if long else M.ROPE_FACTORS_SHORT)

    def norm(self, o, x, kind, il=None):
        """LayerNorm: (x - mean) / std, scaled and shifted."""
        y = o.mul(o.norm(x, self.hp.rms_eps), self.w.get(kind, il))
        return o.add(y, self.w.get(kind, il, "bias"))

    def gate(self, o, logits, n_tokens):
        hp = self.hp
        n = hp.n_expert
        # Experts hidden by masked routing carry -inf; a large finite value keeps the arithmetic
        # below free of inf - inf while exp() still gives them 0.
        s = o.clamp(logits, -1e30, 1e30)                         # (n_expert, n_tokens)
        selected = o.argsort_top_k(s, 2)                         # I32 (2, n_tokens)
        m = o.get_rows(o.reshape_3d(s, 1, n, n_tokens), selected)  # (1, 2, n_tokens): m_1, m_2
        s2 = o.repeat_4d(o.reshape_3d(s, n, 1, n_tokens), n, 2, n_tokens)  # (n_expert, 2, n_tokens)
        x = o.sub(s2, m)                                         # s - m_j
        factor = o.add(o.relu(o.sub(o.abs(s2), m)), m)           # max(|s|, m_j)
        far = o.step(o.sub(o.neg(x), o.scale(factor, 2.0 * hp.router_jitter_eps)))
        above = o.step(x)      # ranked above m_j: the first expert, when choosing the second
        e = o.exp(o.clamp(x, -_FLT_MAX, 0.0))
        e = o.sub(e, o.mul(e, far))
        e = o.sub(e, o.mul(e, above))
        weights = o.exp(o.neg(o.log(o.sum_rows(e))))             # (1, 2, n_tokens); sums >= 1
        return selected, weights


MODEL = Phimoe
