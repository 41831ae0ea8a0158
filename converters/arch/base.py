"""What an architecture converter declares, and the layout most MoE decoders share.

An architecture is one subclass of `MoeArchitecture` in its own file under converters/arch/, with
a module-level `ARCH` instance. It says which HF architecture names and which GGUF
`general.architecture` it handles and lists every tensor the checkpoint must contain (name,
shape, GGUF name, optional transform). Hyper-parameters are not its business: the graph module of
the same arch (edgemoe/arch/<model>.py) holds the table of GGUF keys and config.json fields that
both the converter and the runtime read (edgemoe.hparams). The shared decoder layout (embeddings,
attention, norms, router, routed experts, output) is here, so an architecture file only states
what differs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable

import numpy as np
from gguf import (GGUFWriter, Keys, MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TensorNameMap,
                  get_tensor_name_map)

import edgemoe.arch
from edgemoe import hparams
from edgemoe.arch.common import Decoder, HParams, tensor_name
from edgemoe.errors import ConvertError, ShardSetError
from edgemoe.hparams import rope_scaling
from edgemoe.shardset import EXPERT_TENSORS, expert_tensor_name


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


@lru_cache(maxsize=None)
def _tensor_names(arch: MODEL_ARCH, n_layer: int) -> TensorNameMap:
    return get_tensor_name_map(arch, n_layer)


class MoeArchitecture:
    """A decoder whose layers are attention + a routed mixture of SiLU-gated experts."""

    gguf_arch: MODEL_ARCH
    hf_architectures: tuple[str, ...] = ()
    # llama.cpp's graph for the arch fixes whether top-k weights are renormalised (the graph
    # module's expert_weights_norm); HF exposes it as norm_topk_prob (Mixtral always
    # renormalises). We refuse checkpoints that disagree.
    hf_norm_topk_default: bool | None = None  # None: the HF model has no such switch
    # HF module names inside a layer
    moe_prefix = "mlp"
    expert_proj = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
    router = "gate"
    rope_scalings = ("default", "yarn")  # the RoPE kinds this converter and its graph handle

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def model(self) -> type[Decoder]:
        """The graph module of this arch, whose table (`params`) spells the GGUF keys."""
        return edgemoe.arch.get(self.name)

    # ---- hyper-parameters -------------------------------------------------------------------
    def metadata(self, config: dict) -> dict:
        """llama.cpp's hyper-parameter keys for this arch and their values from config.json."""
        return hparams.from_config(self.model.params(), self.name, config)

    def hparams(self, config: dict) -> HParams:
        """The hyper-parameters config.json gives, read back from the metadata written for it
        (so the converter sees what the runtime and llama.cpp will)."""
        kind = rope_scaling(config)["rope_type"]
        if kind not in self.rope_scalings:
            raise ConvertError(f"config.json: rope scaling {kind!r} is not supported for "
                               f"{self.name} (supported: {', '.join(self.rope_scalings)})")
        get = hparams.dict_getter(self.metadata(config), self.name, "config.json")
        try:
            hp = self.model.hparams_class.from_metadata(get, self.model, "config.json",
                                                         config=config)
        except ShardSetError as exc:
            raise ConvertError(str(exc)) from None
        self.check(config, hp)
        return hp

    def check(self, config: dict, hp: HParams) -> None:
        """Refuse configurations llama.cpp's graph for this arch would compute differently."""
        if self.hf_norm_topk_default is not None:
            norm = bool(config.get("norm_topk_prob", self.hf_norm_topk_default))
            if norm != hp.expert_weights_norm:
                raise ConvertError(f"config.json: norm_topk_prob={norm}, but llama.cpp's "
                                   f"{self.name} graph uses {hp.expert_weights_norm}")
        if not 0 < hp.n_expert_used <= hp.n_expert:
            raise ConvertError(f"config.json: num_experts_per_tok={hp.n_expert_used} with "
                               f"{hp.n_expert} experts")

    # ---- tensors ----------------------------------------------------------------------------
    def spec(self, hp: HParams, hf_name: str, shape: tuple[int, ...], kind: str,
             transform: Callable[[np.ndarray], np.ndarray] | None = None, **kw) -> TensorSpec:
        """A checkpoint tensor under the GGUF name gguf-py's TensorNameMap gives it for this
        arch (an architecture file names only what the map lacks)."""
        name = _tensor_names(self.gguf_arch, hp.n_layer).get_name(
            hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConvertError(f"gguf's TensorNameMap has no {self.name} tensor for {hf_name}")
        return TensorSpec(hf_name, name, shape, kind, transform, **kw)

    def attention_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        p, E = f"model.layers.{layer}.self_attn", hp.n_embd
        q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        return [self.spec(hp, f"{p}.q_proj.weight", (q, E), DENSE, self.permute_q(hp)),
                self.spec(hp, f"{p}.k_proj.weight", (kv, E), DENSE, self.permute_k(hp)),
                self.spec(hp, f"{p}.v_proj.weight", (kv, E), DENSE),
                self.spec(hp, f"{p}.o_proj.weight", (E, q), DENSE)]

    def biases(self, hp: HParams, layer: int, projs: str = "qkvo") -> list[TensorSpec]:
        """Biases of the attention projections `projs`."""
        q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        n = {"q": q, "k": kv, "v": kv, "o": hp.n_embd}
        return [self.spec(hp, f"model.layers.{layer}.self_attn.{x}_proj.bias", (n[x],), F32)
                for x in projs]

    def permute_q(self, hp: HParams) -> Callable[[np.ndarray], np.ndarray] | None:
        return None

    def permute_k(self, hp: HParams) -> Callable[[np.ndarray], np.ndarray] | None:
        return None

    def moe_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        p = f"model.layers.{layer}.{self.moe_prefix}"
        specs = [self.spec(hp, f"{p}.{self.router}.weight", (hp.n_expert, hp.n_embd), F32)]
        shapes = {"ffn_gate": (hp.n_ff_exp, hp.n_embd), "ffn_up": (hp.n_ff_exp, hp.n_embd),
                  "ffn_down": (hp.n_embd, hp.n_ff_exp)}
        for e in range(hp.n_expert):
            for proj in EXPERT_TENSORS:
                specs.append(TensorSpec(
                    f"{p}.experts.{e}.{self.expert_proj[proj]}.weight",
                    expert_tensor_name(layer, e, proj), shapes[proj], EXPERT,
                    layer=layer, expert=e, proj=proj))
        return specs

    def layer_specs(self, hp: HParams, layer: int) -> list[TensorSpec]:
        p = f"model.layers.{layer}"
        return [self.spec(hp, f"{p}.input_layernorm.weight", (hp.n_embd,), F32),
                *self.attention_specs(hp, layer),
                self.spec(hp, f"{p}.post_attention_layernorm.weight", (hp.n_embd,), F32),
                *self.moe_specs(hp, layer)]

    def generated_tensors(self, hp: HParams) -> list[tuple[str, np.ndarray]]:
        """Base tensors made from config.json rather than read from the checkpoint (name,
        float32 values); none here."""
        return []

    def tensor_specs(self, hp: HParams) -> list[TensorSpec]:
        embd = "model.embed_tokens.weight"
        specs = [self.spec(hp, embd, (hp.n_vocab, hp.n_embd), DENSE)]
        for layer in range(hp.n_layer):
            specs += self.layer_specs(hp, layer)
        specs.append(self.spec(hp, "model.norm.weight", (hp.n_embd,), F32))
        # Tied checkpoints have no lm_head; write the embedding again as output so every arch
        # (some of which require output.weight) loads.
        out = self.spec(hp, "lm_head.weight", (hp.n_vocab, hp.n_embd), DENSE)
        return specs + [replace(out, hf_name=embd) if hp.config.get("tie_word_embeddings")
                        else out]

    # ---- metadata ---------------------------------------------------------------------------
    def add_metadata(self, w: GGUFWriter, hp: HParams) -> None:
        for key, value in self.metadata(hp.config).items():
            w.add_key_value(key, value, hparams.value_type(value))

    def hparams_from_gguf(self, kv: dict, tensors: dict[str, tuple[int, ...]],
                          where: str) -> HParams:
        """HParams of a stock GGUF of this arch, from its metadata (through the same table) and
        tensor shapes (numpy order): the layers with fused experts have routed experts."""
        n_layer = int(kv.get(Keys.LLM.BLOCK_COUNT.format(arch=self.name), 0))
        gate = [tensor_name(MODEL_TENSOR.FFN_GATE_EXP, l) for l in range(n_layer)]
        layers = tuple(l for l in range(n_layer) if gate[l] in tensors)
        if not layers:
            raise ConvertError(f"{where}: GGUF has no {tensor_name(MODEL_TENSOR.FFN_GATE_EXP, 0)} "
                               "(fused expert tensors); it is not a MoE model")
        vocab = tensors.get(tensor_name(MODEL_TENSOR.TOKEN_EMBD), (0, 0))[0]
        get = hparams.dict_getter(kv, self.name, where)
        try:
            hp = self.model.hparams_class.from_metadata(get, self.model, where,
                                                         n_vocab=int(vocab), expert_layers=layers)
        except ShardSetError as exc:
            raise ConvertError(str(exc)) from None
        got = tensors[gate[layers[0]]][1]
        if got != hp.n_ff_exp:
            raise ConvertError(f"{where}: tensor {gate[layers[0]]} has {got} rows per expert, "
                               f"the metadata says {hp.n_ff_exp}")
        return hp
