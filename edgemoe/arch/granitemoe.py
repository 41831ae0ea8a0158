"""GraniteMoE: the Mixtral layout (q/k rows permuted at conversion for interleaved RoPE,
renormalised top-k) with Granite's four multipliers, which HParams reads from the GGUF
(embedding, attention, residual and logit scales) and the common pieces apply."""
from edgemoe import ggml
from edgemoe.arch.common import Decoder


class GraniteMoe(Decoder):
    name = "granitemoe"
    hf_names = ("granitemoe",)
    rope_mode = ggml.ROPE_NORM
    expert_weights_norm = True


MODEL = GraniteMoe
