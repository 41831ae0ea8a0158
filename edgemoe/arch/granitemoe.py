"""GraniteMoE: the Mixtral layout (q/k rows permuted at conversion for interleaved RoPE,
renormalised top-k) with Granite's four multipliers, which HParams reads from the GGUF
(embedding, attention, residual and logit scales) and the common pieces apply."""
from gguf.constants import Keys

from edgemoe import ggml
from edgemoe.arch.common import Decoder
from edgemoe.hparams import Param, table


def _multiplier(name: str):
    return lambda config: config.get(name, 1.0)


class GraniteMoe(Decoder):
    name = "granitemoe"
    hf_names = ("granitemoe",)
    rope_mode = ggml.ROPE_NORM
    expert_weights_norm = True

    @classmethod
    def params(cls):
        K, A = Keys.LLM, Keys.Attention
        return {**super().params(), **table(
            Param(K.EMBEDDING_SCALE, "embedding_scale", _multiplier("embedding_multiplier"),
                  float, 1.0),
            Param(A.SCALE, "attention_scale", _multiplier("attention_multiplier"), float, 0.0),
            Param(K.RESIDUAL_SCALE, "residual_scale", _multiplier("residual_multiplier"),
                  float, 1.0),
            Param(K.LOGIT_SCALE, "logit_scale", _multiplier("logits_scaling"), float, 1.0))}


MODEL = GraniteMoe
