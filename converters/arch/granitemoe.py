"""GraniteMoE: llama layout with Granite's four scalar multipliers, and experts stored fused.

The checkpoint keeps all experts of a layer in two tensors: block_sparse_moe.input_linear
(n_expert, 2 * n_ff, n_embd), each expert's gate rows followed by its up rows, and
output_linear (n_expert, n_embd, n_ff). Each per-expert projection is a run of their rows.
q/k rows are reordered for llama.cpp's RoPE layout as for Llama.
"""
from __future__ import annotations

from gguf import MODEL_ARCH

from converters.arch.base import (EXPERT, F32, HParams, MoeArchitecture, TensorSpec,
                                  interleave_rope_halves)
from edgemoe.errors import ConvertError
from edgemoe.shardset import expert_tensor_name


class GraniteMoe(MoeArchitecture):
    gguf_arch = MODEL_ARCH.GRANITE_MOE
    hf_architectures = ("GraniteMoeForCausalLM",)

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        if config.get("shared_intermediate_size"):
            raise ConvertError("config.json: a shared expert (GraniteMoeShared) is not supported")

    def permute_q(self, hp: HParams):
        return interleave_rope_halves(hp.n_head)

    def permute_k(self, hp: HParams):
        return interleave_rope_halves(hp.n_head_kv)

    def moe_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        p = f"model.layers.{layer}.block_sparse_moe"
        fused_in = (hp.n_expert, 2 * hp.n_ff_exp, hp.n_embd)
        fused_out = (hp.n_expert, hp.n_embd, hp.n_ff_exp)
        specs = [self.spec(hp, f"{p}.router.layer.weight", (hp.n_expert, hp.n_embd), F32)]
        for e in range(hp.n_expert):
            for proj, name, shape, first in (
                    ("ffn_gate", "input_linear", fused_in, 2 * e * hp.n_ff_exp),
                    ("ffn_up", "input_linear", fused_in, (2 * e + 1) * hp.n_ff_exp),
                    ("ffn_down", "output_linear", fused_out, e * hp.n_embd)):
                specs.append(TensorSpec(
                    f"{p}.{name}.weight", expert_tensor_name(layer, e, proj), shape, EXPERT,
                    out_shape=shape[1:] if proj == "ffn_down" else (hp.n_ff_exp, hp.n_embd),
                    row_offset=first, layer=layer, expert=e, proj=proj))
        return specs


ARCH = GraniteMoe()
