"""OLMoE: RMSNorm of q and k over all heads at once (before splitting into heads), NEOX RoPE,
top-k weights not renormalised."""
from edgemoe import ggml
from edgemoe.arch.common import ArchSpec

SPEC = ArchSpec(name="olmoe", hf_names=("olmoe",), rope_mode=ggml.ROPE_NEOX, qk_norm="full",
                expert_weights_norm=False)
