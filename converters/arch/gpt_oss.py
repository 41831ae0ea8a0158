"""gpt-oss: biased attention with per-head sinks, alternating sliding-window layers, a biased
router, and experts with biases stored fused and transposed in the checkpoint.

transformers keeps all experts of a layer in mlp.experts.gate_up_proj (n_expert, n_embd,
2 * n_ff), gate and up columns interleaved (gate = [..., ::2], up = [..., 1::2]), with
gate_up_proj_bias (n_expert, 2 * n_ff), and down_proj (n_expert, n_ff, n_embd) with
down_proj_bias (n_expert, n_embd); each expert's matrices are transposed into llama.cpp's
layout here, one expert at a time. Checkpoints that ship MXFP4 blocks (the published ones) are
read from their llama.cpp GGUF instead (edgemoe convert model.gguf keeps MXFP4 as it is).
"""
from __future__ import annotations

import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR

from converters.arch.base import (EXPERT, EXPERT_F32, F32, HParams, MoeArchitecture, TensorSpec,
                                  tensor_name)
from edgemoe.errors import ConvertError
from edgemoe.shardset import expert_tensor_name


def _gate(x: np.ndarray) -> np.ndarray:   # (n_embd, 2 n_ff) -> (n_ff, n_embd)
    return x[:, ::2].T


def _up(x: np.ndarray) -> np.ndarray:
    return x[:, 1::2].T


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def _bias_gate(x: np.ndarray) -> np.ndarray:   # (1, 2 n_ff) -> (n_ff,)
    return x[0, ::2]


def _bias_up(x: np.ndarray) -> np.ndarray:
    return x[0, 1::2]


def _row(x: np.ndarray) -> np.ndarray:
    return x[0]


class GptOss(MoeArchitecture):
    gguf_arch = MODEL_ARCH.GPT_OSS
    hf_architectures = ("GptOssForCausalLM",)

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        types = config.get("layer_types") or []
        want = ["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(hp.n_layer)]
        if types and types != want:
            raise ConvertError(f"config.json: layer_types {types} differ from the alternating "
                               "pattern (sliding first) llama.cpp's gpt-oss graph has")
        if (config.get("swiglu_limit", 7.0), config.get("swiglu_alpha", 1.702)) != (7.0, 1.702):
            raise ConvertError("config.json: swiglu_limit / swiglu_alpha differ from 7.0 / 1.702, "
                               "the constants of llama.cpp's gpt-oss graph")
        if config.get("quantization_config"):
            raise ConvertError("config.json: an MXFP4-quantized checkpoint; convert llama.cpp's "
                               "GGUF of it instead (its MXFP4 experts are kept as they are)")

    def attention_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        # TensorNameMap names the sinks without llama.cpp's .weight suffix.
        sinks = TensorSpec(f"model.layers.{layer}.self_attn.sinks",
                           tensor_name(MODEL_TENSOR.ATTN_SINKS, layer), (hp.n_head,), F32)
        return super().attention_specs(hp, layer) + self.biases(hp, layer) + [sinks]

    def moe_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        p, E, F, N = f"model.layers.{layer}.mlp", hp.n_embd, hp.n_ff_exp, hp.n_expert
        specs = [self.spec(hp, f"{p}.router.weight", (N, E), F32),
                 self.spec(hp, f"{p}.router.bias", (N,), F32)]
        gate_up, down = (N, E, 2 * F), (N, F, E)
        for e in range(N):
            for key, src, shape, fn, out, first, n in (
                    ("ffn_gate", "gate_up_proj", gate_up, _gate, (F, E), e * E, E),
                    ("ffn_up", "gate_up_proj", gate_up, _up, (F, E), e * E, E),
                    ("ffn_down", "down_proj", down, _transpose, (E, F), e * F, F),
                    ("ffn_gate.bias", "gate_up_proj_bias", (N, 2 * F), _bias_gate, (F,), e, 1),
                    ("ffn_up.bias", "gate_up_proj_bias", (N, 2 * F), _bias_up, (F,), e, 1),
                    ("ffn_down.bias", "down_proj_bias", (N, E), _row, (E,), e, 1)):
                specs.append(TensorSpec(
                    f"{p}.experts.{src}", expert_tensor_name(layer, e, key), shape,
                    EXPERT_F32 if "." in key else EXPERT, fn, out_shape=out, row_offset=first,
                    layer=layer, expert=e, proj=key, source_rows=n))
        return specs


ARCH = GptOss()
