"""Mixtral, stored by llama.cpp as architecture `llama` with fused expert tensors.

llama.cpp's converter permutes the q/k projection rows of llama-family models so that the
interleaved (NORM) RoPE gives the same result as HF's rotate-half; top-k weights are renormalised.
Everything else is the common decoder.
"""
from edgemoe import ggml
from edgemoe.arch.common import Decoder


class Mixtral(Decoder):
    name = "llama"
    hf_names = ("mixtral",)
    rope_mode = ggml.ROPE_NORM
    expert_weights_norm = True


MODEL = Mixtral
