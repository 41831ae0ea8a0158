"""What an architecture converter declares, and the layout most MoE decoders share.

An architecture is one subclass of `MoeArchitecture` in its own file under converters/arch/, with
a module-level `ARCH` instance. It says which HF architecture names and which GGUF
`general.architecture` it handles, reads hyper-parameters from config.json, lists every tensor the
checkpoint must contain (name, shape, GGUF name, optional transform) and writes llama.cpp's
metadata. The shared decoder layout (embeddings, attention, norms, router, routed experts, output)
is here, so an architecture file only states what differs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from gguf import (ExpertGatingFuncType, GGUFWriter, Keys, MODEL_ARCH, MODEL_ARCH_NAMES,
                  MODEL_TENSOR, RopeScalingType)

from edgemoe.arch.common import tensor_name
from edgemoe.errors import ConvertError
from edgemoe.shardset import EXPERT_TENSORS, expert_tensor_name


@dataclass(frozen=True)
class Hparams:
    """The shape of a MoE decoder, from config.json (HF) or GGUF metadata."""
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int                 # feed_forward_length as llama.cpp reads it for this arch
    n_ff_exp: int             # rows of one routed expert's ffn_gate / ffn_up
    n_ff_shexp: int           # shared expert width, 0 when there is none
    n_expert: int
    n_expert_used: int
    n_vocab: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    tied_embeddings: bool
    expert_layers: tuple[int, ...]
    # The config.json these came from (empty for a GGUF source), for an architecture's optional
    # tensors (biases, low-rank projections) and fields of its own.
    config: dict = field(default_factory=dict, compare=False, repr=False)


# Where a tensor goes: the base GGUF as the dense type, the base GGUF kept in float32 (norms,
# biases, routers, as llama.cpp keeps them), an expert shard as the expert type, or an expert
# shard kept in float32 (expert biases).
DENSE, F32, EXPERT, EXPERT_F32 = "dense", "f32", "expert", "expert_f32"


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: a run of rows of one checkpoint tensor (rows = its last axis).

    Usually the whole tensor; checkpoints that fuse experts (or gate and up) into one tensor give
    each expert projection its own spec with `row_offset` and a smaller `out_shape`, so the
    converter still streams and never materialises the fused tensor."""
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]            # numpy shape required in the checkpoint
    kind: str                         # DENSE, F32 or EXPERT
    transform: Callable[[np.ndarray], np.ndarray] | None = None  # on the written rows, in place
    out_shape: tuple[int, ...] | None = None  # written shape, when not the whole source shape
    row_offset: int = 0               # first source row written
    layer: int | None = None
    expert: int | None = None
    proj: str | None = None          # ffn_gate / ffn_up / ffn_down for experts
    # Rows of the source the transform reads, when it reshapes them (default: n_rows).
    source_rows: int | None = None

    @property
    def written_shape(self) -> tuple[int, ...]:
        return self.out_shape or self.shape

    @property
    def n_rows(self) -> int:
        """Rows written (each of written_shape[-1] elements, the source's row length)."""
        return int(np.prod(self.written_shape[:-1], dtype=np.int64))


def interleave_rope_halves(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """Row order of q_proj / k_proj for llama.cpp's "normal" RoPE.

    llama.cpp's NORM rope type rotates adjacent pairs of a head's values, while HF llama-family
    checkpoints rotate the first half of a head against the second half; interleaving the two
    halves of each head's rows makes the two agree."""
    def permute(w: np.ndarray) -> np.ndarray:  # (n_head * head_dim, n_embd)
        rows, cols = w.shape
        half = rows // n_head // 2
        # (head, half-index, position-in-half, col) -> (head, position, half-index, col)
        return w.reshape(n_head, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)
    return permute


def rope_scaling(config: dict) -> dict:
    """config.json's RoPE scaling (rope_parameters, or the older rope_scaling), with its kind
    under rope_type ("default" when there is none)."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    return {**scaling, "rope_type": scaling.get("rope_type", scaling.get("type")) or "default"}


def add_rope_scaling(w: GGUFWriter, config: dict) -> None:
    """YaRN's keys as llama.cpp's converter writes them (its loader takes the betas as 32 and 1,
    the published models' values, without reading them; edgemoe reads them)."""
    scaling = rope_scaling(config)
    if scaling["rope_type"] == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        if scaling.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(scaling["beta_fast"]))
        if scaling.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(scaling["beta_slow"]))


def cfg_get(config: dict, *keys: str, default=None, required: bool = True):
    """The first of `keys` present in config.json (HF renamed several fields over time)."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None and required:
        raise ConvertError(f"config.json: none of {', '.join(keys)} is set")
    return default


class MoeArchitecture:
    """A decoder whose layers are attention + a routed mixture of SiLU-gated experts."""

    gguf_arch: MODEL_ARCH
    hf_architectures: tuple[str, ...] = ()
    # llama.cpp's graph for the arch fixes whether top-k weights are renormalised; HF exposes it
    # as norm_topk_prob (Mixtral always renormalises). We refuse checkpoints that disagree.
    expert_weights_norm: bool = True
    hf_norm_topk_default: bool | None = None  # None: the HF model has no such switch
    # HF module names inside a layer
    moe_prefix = "mlp"
    expert_proj = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
    router = "gate"
    rope_scalings = ("default", "yarn")  # the RoPE kinds this converter and its graph handle

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.gguf_arch]

    # ---- hyper-parameters -------------------------------------------------------------------
    def n_ff_exp(self, config: dict) -> int:
        return cfg_get(config, "moe_intermediate_size", "intermediate_size")

    def n_ff(self, config: dict) -> int:
        return cfg_get(config, "intermediate_size")

    def n_ff_shexp(self, config: dict) -> int:
        return 0

    def hparams(self, config: dict) -> Hparams:
        n_embd = cfg_get(config, "hidden_size")
        n_head = cfg_get(config, "num_attention_heads")
        rope = config.get("rope_parameters") or {}
        kind = rope_scaling(config).get("rope_type")
        if kind not in self.rope_scalings:
            raise ConvertError(f"config.json: rope scaling {kind!r} is not supported for "
                               f"{self.name} (supported: {', '.join(self.rope_scalings)})")
        n_layer = cfg_get(config, "num_hidden_layers")
        hp = Hparams(
            n_layer=n_layer, n_embd=n_embd, n_head=n_head,
            n_head_kv=cfg_get(config, "num_key_value_heads", default=n_head),
            head_dim=cfg_get(config, "head_dim", default=n_embd // n_head),
            n_ff=self.n_ff(config), n_ff_exp=self.n_ff_exp(config),
            n_ff_shexp=self.n_ff_shexp(config),
            n_expert=cfg_get(config, "num_local_experts", "num_experts"),
            n_expert_used=cfg_get(config, "num_experts_per_tok"),
            n_vocab=cfg_get(config, "vocab_size"),
            n_ctx=cfg_get(config, "max_position_embeddings"),
            rms_eps=float(cfg_get(config, "rms_norm_eps")),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            expert_layers=tuple(range(n_layer)),
            config=config,
        )
        self.check(config, hp)
        return hp

    def check(self, config: dict, hp: Hparams) -> None:
        """Refuse configurations llama.cpp's graph for this arch would compute differently."""
        if self.hf_norm_topk_default is not None:
            norm = bool(config.get("norm_topk_prob", self.hf_norm_topk_default))
            if norm != self.expert_weights_norm:
                raise ConvertError(f"config.json: norm_topk_prob={norm}, but llama.cpp's "
                                   f"{self.name} graph uses {self.expert_weights_norm}")
        if not 0 < hp.n_expert_used <= hp.n_expert:
            raise ConvertError(f"config.json: num_experts_per_tok={hp.n_expert_used} with "
                               f"{hp.n_expert} experts")

    # ---- tensors ----------------------------------------------------------------------------
    def attention_specs(self, hp: Hparams, layer: int) -> list[TensorSpec]:
        p = f"model.layers.{layer}.self_attn"
        q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        return [
            TensorSpec(f"{p}.q_proj.weight", tensor_name(MODEL_TENSOR.ATTN_Q, layer),
                       (q, hp.n_embd), DENSE, self.permute_q(hp)),
            TensorSpec(f"{p}.k_proj.weight", tensor_name(MODEL_TENSOR.ATTN_K, layer),
                       (kv, hp.n_embd), DENSE, self.permute_k(hp)),
            TensorSpec(f"{p}.v_proj.weight", tensor_name(MODEL_TENSOR.ATTN_V, layer),
                       (kv, hp.n_embd), DENSE),
            TensorSpec(f"{p}.o_proj.weight", tensor_name(MODEL_TENSOR.ATTN_OUT, layer),
                       (hp.n_embd, q), DENSE),
        ]

    def permute_q(self, hp: Hparams) -> Callable[[np.ndarray], np.ndarray] | None:
        return None

    def permute_k(self, hp: Hparams) -> Callable[[np.ndarray], np.ndarray] | None:
        return None

    def moe_specs(self, hp: Hparams, layer: int) -> list[TensorSpec]:
        p = f"model.layers.{layer}.{self.moe_prefix}"
        specs = [TensorSpec(f"{p}.{self.router}.weight",
                            tensor_name(MODEL_TENSOR.FFN_GATE_INP, layer),
                            (hp.n_expert, hp.n_embd), F32)]
        shapes = {"ffn_gate": (hp.n_ff_exp, hp.n_embd), "ffn_up": (hp.n_ff_exp, hp.n_embd),
                  "ffn_down": (hp.n_embd, hp.n_ff_exp)}
        for e in range(hp.n_expert):
            for proj in EXPERT_TENSORS:
                specs.append(TensorSpec(
                    f"{p}.experts.{e}.{self.expert_proj[proj]}.weight",
                    expert_tensor_name(layer, e, proj), shapes[proj], EXPERT,
                    layer=layer, expert=e, proj=proj))
        return specs

    def layer_specs(self, hp: Hparams, layer: int) -> list[TensorSpec]:
        p = f"model.layers.{layer}"
        return [
            TensorSpec(f"{p}.input_layernorm.weight", tensor_name(MODEL_TENSOR.ATTN_NORM, layer),
                       (hp.n_embd,), F32),
            *self.attention_specs(hp, layer),
            TensorSpec(f"{p}.post_attention_layernorm.weight",
                       tensor_name(MODEL_TENSOR.FFN_NORM, layer), (hp.n_embd,), F32),
            *self.moe_specs(hp, layer),
        ]

    def generated_tensors(self, hp: Hparams) -> list[tuple[str, np.ndarray]]:
        """Base tensors made from config.json rather than read from the checkpoint (name,
        float32 values); none here."""
        return []

    def tensor_specs(self, hp: Hparams) -> list[TensorSpec]:
        embd = "model.embed_tokens.weight"
        specs = [TensorSpec(embd, tensor_name(MODEL_TENSOR.TOKEN_EMBD), (hp.n_vocab, hp.n_embd),
                            DENSE)]
        for layer in range(hp.n_layer):
            specs += self.layer_specs(hp, layer)
        specs.append(TensorSpec("model.norm.weight", tensor_name(MODEL_TENSOR.OUTPUT_NORM),
                                (hp.n_embd,), F32))
        # Tied checkpoints have no lm_head; write the embedding again as output so every arch
        # (some of which require output.weight) loads.
        specs.append(TensorSpec(embd if hp.tied_embeddings else "lm_head.weight",
                                tensor_name(MODEL_TENSOR.OUTPUT), (hp.n_vocab, hp.n_embd), DENSE))
        return specs

    # ---- metadata ---------------------------------------------------------------------------
    def add_metadata(self, w: GGUFWriter, hp: Hparams, config: dict) -> None:
        """llama.cpp's hyper-parameter keys for this arch (gguf-py's writer spells the keys)."""
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_block_count(hp.n_layer)
        w.add_feed_forward_length(hp.n_ff)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        w.add_rope_freq_base(hp.rope_theta)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_expert_count(hp.n_expert)
        w.add_expert_used_count(hp.n_expert_used)
        w.add_expert_weights_norm(self.expert_weights_norm)
        w.add_expert_gating_func(ExpertGatingFuncType.SOFTMAX)
        w.add_vocab_size(hp.n_vocab)
        if config.get("head_dim") is not None or hp.head_dim != hp.n_embd // hp.n_head:
            w.add_key_length(hp.head_dim)
            w.add_value_length(hp.head_dim)
        w.add_rope_dimension_count(hp.head_dim)
        add_rope_scaling(w, config)

    def hparams_from_gguf(self, kv: dict, tensors: dict[str, tuple[int, ...]]) -> Hparams:
        """Hparams of a stock GGUF of this arch, from its metadata (gguf.Keys) and tensor shapes
        (numpy order)."""
        arch = self.name

        def key(name: str, default=None):
            full = name.format(arch=arch)
            if full in kv:
                return kv[full]
            if default is None:
                raise ConvertError(f"GGUF metadata key {full} missing")
            return default

        n_layer = int(key(Keys.LLM.BLOCK_COUNT))
        n_embd = int(key(Keys.LLM.EMBEDDING_LENGTH))
        n_head = int(key(Keys.Attention.HEAD_COUNT))
        n_expert = int(key(Keys.LLM.EXPERT_COUNT))
        layers = tuple(l for l in range(n_layer)
                       if tensor_name(MODEL_TENSOR.FFN_GATE_EXP, l) in tensors)
        if not layers:
            raise ConvertError(f"GGUF has no {tensor_name(MODEL_TENSOR.FFN_GATE_EXP, 0)} "
                               "(fused expert tensors); it is not a MoE model")
        n_ff_exp = tensors[tensor_name(MODEL_TENSOR.FFN_GATE_EXP, layers[0])][1]
        vocab = tensors.get(tensor_name(MODEL_TENSOR.TOKEN_EMBD), (0, 0))[0]
        return Hparams(
            n_layer=n_layer, n_embd=n_embd, n_head=n_head,
            n_head_kv=int(key(Keys.Attention.HEAD_COUNT_KV, n_head)),
            head_dim=int(key(Keys.Attention.KEY_LENGTH, n_embd // n_head)),
            n_ff=int(key(Keys.LLM.FEED_FORWARD_LENGTH, n_ff_exp)), n_ff_exp=n_ff_exp,
            n_ff_shexp=int(key(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, 0)),
            n_expert=n_expert, n_expert_used=int(key(Keys.LLM.EXPERT_USED_COUNT)),
            n_vocab=int(vocab), n_ctx=int(key(Keys.LLM.CONTEXT_LENGTH)),
            rms_eps=float(key(Keys.Attention.LAYERNORM_RMS_EPS)),
            rope_theta=float(key(Keys.Rope.FREQ_BASE, 10000.0)),
            tied_embeddings=tensor_name(MODEL_TENSOR.OUTPUT) not in tensors,
            expert_layers=layers,
        )
