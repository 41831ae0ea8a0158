"""Qwen2-MoE: qkv biases, NEOX RoPE, top-k weights not renormalised, and a shared expert whose
output is scaled by sigmoid(ffn_gate_inp_shexp x)."""
from edgemoe import ggml
from edgemoe.arch.common import ArchSpec

SPEC = ArchSpec(name="qwen2moe", hf_names=("qwen2_moe",), rope_mode=ggml.ROPE_NEOX, qk_norm=None,
                expert_weights_norm=False, shared_expert=True)
