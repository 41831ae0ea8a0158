"""Qwen3-MoE: RMSNorm of q and k per head before NEOX RoPE; llama.cpp always renormalises the
top-k weights for this architecture."""
from edgemoe import ggml
from edgemoe.arch.common import ArchSpec

SPEC = ArchSpec(name="qwen3moe", hf_names=("qwen3_moe",), rope_mode=ggml.ROPE_NEOX, qk_norm="head",
                expert_weights_norm=True)
