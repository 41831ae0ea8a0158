"""The pieces every supported MoE architecture shares, and `Decoder`, the graph they make.

A decoder layer is: norm -> attention (q/k/v projections with optional biases, RoPE in the
architecture's mode, a KV cache written with ggml_set_rows, flash attention) -> residual -> norm
-> MoE FFN (router ffn_gate_inp, gating, experts run by ggml_mul_mat_id over the pool's 3-D slot
tensors, plus whatever a model adds beside them, such as a shared expert) -> residual. Each
architecture is one module here, a `Decoder` subclass overriding the pieces it changes; the math
follows llama.cpp's graphs (src/models/<arch>.cpp, build_moe_ffn), which is what makes an exported
GGUF run identically there.

Routing (the seam the residency policies use): in the one-graph forward pass, per layer, an F32
input (n_expert,) of 0 / -inf is added to the router logits, so the softmax and top-k see only
the policy's resident experts (SwapMoE's masked gating; all zeros when every expert is resident),
and an I32 input (n_expert,) maps each selected expert to its slot. When the policy or an
observer wants them (`observed`), the unmasked router logits, the experts' input norms and the
selection are graph outputs, so a policy can score every expert's importance.
"""
from __future__ import annotations

import ctypes
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import MODEL_TENSOR, TENSOR_NAMES, ExpertGatingFuncType, Keys

from edgemoe import ggml, hparams
from edgemoe.ggml import GGMLType
from edgemoe.errors import ShardSetError
from edgemoe.gguf_header import ARRAY, FLOAT_TYPES, INT_TYPES, STRING, GGUFHeader
from edgemoe.hparams import EXPERT_LAYERS_KEY, Param, rope_scaled, rope_theta, table
from edgemoe.shardset import CHECKSUMS, MAX_DIM, MAX_EXPERTS, MAX_LAYERS

_NOT_WEIGHTS = frozenset(int(GGMLType[n]) for n in ("I8", "I16", "I32", "I64", "F64"))

# KV cells are allocated in steps of this many, so a decode graph keeps its shape for that many
# tokens and is reused (the same granularity llama.cpp pads its KV view to).
KV_STEP = 256


@dataclass(frozen=True)
class HParams:
    """Hyper-parameters of a model, read from base.gguf metadata (keys from gguf.constants)."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    n_ctx_train: int
    rms_eps: float
    rope_freq_base: float
    rope_freq_scale: float
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int
    expert_weights_norm: bool
    expert_weights_scale: float
    expert_layers: tuple[int, ...]
    # Granite's multipliers (1 / 0 where a model has none): token embeddings are scaled by
    # embedding_scale, attention scores by attention_scale instead of 1/sqrt(head_dim), each
    # block's output by residual_scale before its residual add, logits divided by logit_scale.
    embedding_scale: float = 1.0
    attention_scale: float = 0.0
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    head_dim_v: int = 0       # a value head's width when it differs from a key head's
    # YaRN (ggml_rope_ext's extrapolation mix, magnitude factor and correction betas) and the
    # context the RoPE was trained on; without YaRN the mix is 0 and the factor 1.
    rope_ext_factor: float = 0.0
    rope_attn_factor: float = 1.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    n_ctx_orig: int = 0
    n_ff: int = 0             # feed_forward_length: a dense layer's width
    # The config.json these were translated from (empty when read from a GGUF): the converter's
    # optional tensors (biases) depend on fields no GGUF key holds.
    config: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_embd_q(self) -> int:
        return self.head_dim * self.n_head

    @property
    def n_embd_kv(self) -> int:
        """Width of one token's cached keys."""
        return self.head_dim * self.n_head_kv

    @property
    def n_embd_v(self) -> int:
        """Width of one token's cached values (and of the attention output)."""
        return (self.head_dim_v or self.head_dim) * self.n_head_kv

    @classmethod
    def derive(cls, values: dict) -> dict:
        """A model's fields computed from those its table read (none here)."""
        return {}

    @classmethod
    def from_gguf(cls, reader: GGUFHeader, model: type["Decoder"], path: Path) -> "HParams":
        """Read base.gguf's metadata through the model's table (`Decoder.params`)."""
        arch = model.name

        def get(key: str, default=None, kind: type | None = None):
            """The value of `key` ({arch} filled in), of `kind` (default: the default's type);
            a value of another GGUF type is refused, not converted."""
            name = key.format(arch=arch)
            field = reader.fields.get(name)
            if field is None:
                if default is None:
                    raise ShardSetError(f"{path}: metadata key '{name}' missing")
                return default
            kind = kind or (type(default) if default is not None else None)
            vtype = int(field.type)
            allowed = {int: INT_TYPES, float: INT_TYPES | FLOAT_TYPES, str: {STRING},
                       bool: {7}}.get(kind)
            if allowed is not None and vtype not in allowed:
                raise ShardSetError(f"{path}: metadata key '{name}' has GGUF type {vtype}, "
                                    f"expected {kind.__name__}")
            try:
                value = field.contents()
                return kind(value) if kind is not None else value
            except (ValueError, TypeError, UnicodeDecodeError, IndexError) as exc:
                raise ShardSetError(f"{path}: metadata key '{name}' unreadable ({exc})") from None

        layers = reader.fields.get(EXPERT_LAYERS_KEY)
        if layers is None:
            expert_layers = None
        elif int(layers.type) != ARRAY or layers.count > MAX_LAYERS:
            raise ShardSetError(f"{path}: {EXPERT_LAYERS_KEY} should be an array of at most "
                                f"{MAX_LAYERS} layers")
        else:
            try:
                expert_layers = tuple(int(x) for x in layers.contents())
            except (ValueError, TypeError, UnicodeDecodeError, IndexError) as exc:
                raise ShardSetError(f"{path}: {EXPERT_LAYERS_KEY} unreadable ({exc})") from None
        embd = next((t for t in reader.tensors
                     if t.name == TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"), None)
        if embd is None:
            raise ShardSetError(f"{path}: tensor token_embd.weight missing")
        if len(embd.shape) != 2:
            raise ShardSetError(f"{path}: tensor token_embd.weight has shape "
                                f"{[int(x) for x in embd.shape]}, expected [n_embd, n_vocab]")
        return cls.from_metadata(get, model, path, n_vocab=int(embd.shape[1]),
                                 expert_layers=expert_layers)

    @classmethod
    def from_metadata(cls, get, model: type["Decoder"], where, n_vocab: int | None = None,
                      expert_layers: tuple[int, ...] | None = None,
                      config: dict | None = None) -> "HParams":
        """HParams from `get(gguf.Keys template, default, kind)` through the model's table;
        n_vocab and expert_layers, when given, come from the tensors instead."""
        values = hparams.read(model.params(), get)
        if values["n_head"] < 1 or values["n_embd"] < 1:
            raise ShardSetError(f"{where}: embedding_length {values['n_embd']} and head_count "
                                f"{values['n_head']} must be positive")
        scaling, factor = values.pop("rope_scaling"), values.pop("rope_factor")
        if scaling not in ("none", "linear", "yarn", "longrope"):
            raise ShardSetError(f"{where}: rope scaling '{scaling}' is not supported "
                                "(supported: none, linear, yarn, longrope)")
        factor = factor if scaling != "none" else 1.0
        if not (math.isfinite(factor) and factor > 0):
            raise ShardSetError(f"{where}: rope scaling factor {factor} must be finite and "
                                "positive")
        n_layer = values["n_layer"]
        if expert_layers is None:
            lead = values.get("n_layer_dense_lead", 0)
            expert_layers = tuple(range(min(lead, n_layer), min(n_layer, MAX_LAYERS + 1)))
        values.update(
            arch=model.name, n_vocab=n_vocab or values["n_vocab"], expert_layers=expert_layers,
            # llama.cpp fixes renormalisation per architecture (it ignores the metadata key).
            expert_weights_norm=model.expert_weights_norm,
            rope_freq_scale=1.0 / factor,
            # YaRN as llama.cpp sets it up: ggml scales the rotation by 1 + 0.1 ln(factor) itself.
            rope_ext_factor=1.0 if scaling == "yarn" and factor > 1.0 else 0.0,
            embedding_scale=values["embedding_scale"] or 1.0,
            residual_scale=values["residual_scale"] or 1.0,
            logit_scale=values["logit_scale"] or 1.0,
            config=config or {})
        values.update(cls.derive(values))
        hp = cls(**values)
        hp.check(where)
        return hp

    def check(self, path: Path) -> None:
        """Refuse hyper-parameters no graph can be built from (ggml would abort on them)."""
        def bad(what: str):
            raise ShardSetError(f"{path}: {what}")

        if not 1 <= self.n_layer <= MAX_LAYERS:
            bad(f"block_count {self.n_layer}, expected 1..{MAX_LAYERS}")
        if not 1 <= self.n_vocab or not 1 <= self.n_embd <= MAX_DIM:
            bad(f"n_vocab {self.n_vocab} / embedding_length {self.n_embd} out of range")
        if not (1 <= self.n_head_kv <= self.n_head and self.n_head % self.n_head_kv == 0):
            bad(f"head_count_kv {self.n_head_kv} must divide head_count {self.n_head}")
        if (not 1 <= self.head_dim <= MAX_DIM or not 0 <= self.head_dim_v <= MAX_DIM
                or self.n_embd_q > MAX_DIM):
            bad(f"head dimensions {self.head_dim}/{self.head_dim_v} x {self.n_head} heads out of "
                "range")
        if not (0 < self.n_rot <= self.head_dim and self.n_rot % 2 == 0):
            bad(f"rope dimension_count {self.n_rot} must be even and in 2..{self.head_dim} "
                "(the head dimension)")
        if not 1 <= self.n_ctx_train:
            bad(f"context_length {self.n_ctx_train} must be positive")
        if not 1 <= self.n_expert <= MAX_EXPERTS or not 1 <= self.n_expert_used <= self.n_expert:
            bad(f"expert_count {self.n_expert} / expert_used_count {self.n_expert_used}: expected "
                f"1 <= used <= count <= {MAX_EXPERTS}")
        if not 0 <= self.n_ff_exp <= MAX_DIM or not 0 <= self.n_ff_shexp <= MAX_DIM:
            bad(f"expert feed_forward_length {self.n_ff_exp} / shared {self.n_ff_shexp} out of "
                "range")
        if (list(self.expert_layers) != sorted(set(self.expert_layers))
                or any(not 0 <= l < self.n_layer for l in self.expert_layers)):
            bad(f"edgemoe.expert_layers {list(self.expert_layers)[:8]} should be distinct "
                f"increasing layers in 0..{self.n_layer - 1}")
        for name, value, positive in (
                ("layer_norm_rms_epsilon", self.rms_eps, True),
                ("rope.freq_base", self.rope_freq_base, True),
                ("expert_weights_scale", self.expert_weights_scale, False),
                ("embedding_scale", self.embedding_scale, False),
                ("attention.scale", self.attention_scale, False),
                ("residual_scale", self.residual_scale, False),
                ("logit_scale", self.logit_scale, False)):
            if not math.isfinite(value) or (positive and value <= 0):
                bad(f"{name} {value} must be finite" + (" and positive" if positive else ""))


def tensor_name(kind: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    """llama.cpp's name of a tensor, e.g. blk.3.attn_q.weight (from gguf.constants)."""
    base = TENSOR_NAMES[kind].format(bid=layer) if layer is not None else TENSOR_NAMES[kind]
    return f"{base}.{suffix}"


_READ_PIECE = 16 << 20   # bytes of a base tensor read at a time on a device that cannot map


def _check_crc(path: Path, name: str, crc32: dict[str, int], got: int) -> None:
    want = crc32.get(name)
    if want != got:
        raise ShardSetError(f"{path}: tensor {name} fails its checksum (crc32 {got:08x}, "
                            "manifest says " + ("none" if want is None else f"{want:08x}")
                            + "); the file is corrupt: reconvert it")


class BaseWeights:
    """Every non-expert tensor of base.gguf, in its own quant type. On the CPU they are used in
    place from the mapped file (pages read on first touch, counted once as page cache, never
    copied; llama.cpp's mmap); on another device each is read with O_DIRECT into the device's
    buffer (edgemoe.pool.read_span: no page cache left behind)."""

    def __init__(self, path: Path, header: GGUFHeader, model: type["Decoder"], hp: HParams,
                 backend: ggml.Backend, crc32: dict[str, int] | None = None):
        wanted = model.tensors(hp)
        present = {t.name: t for t in header.tensors}
        chosen = []
        for name, (ne, required) in wanted.items():
            t = present.get(name)
            if t is None:
                if required:
                    raise ShardSetError(f"{path}: tensor {name} missing (architecture {model.name})")
                continue
            got = tuple(int(x) for x in t.shape)
            # None: a width the metadata does not fix (a dense layer's n_ff) - take the file's.
            shape = tuple(g if e is None else e for e, g in zip(ne, got)) if len(got) == len(ne) else ne
            if got != shape:
                raise ShardSetError(f"{path}: tensor {name} has shape {list(got)}, "
                                    f"expected {list(shape)}")
            kind = int(t.tensor_type)
            # Norms and biases are added and multiplied as F32; a matrix in an integer type
            # holds no weights. ggml aborts on either.
            if (len(ne) == 1 and kind != GGMLType.F32) or kind in _NOT_WEIGHTS:
                raise ShardSetError(f"{path}: tensor {name} is {GGMLType(kind).name}, expected "
                                    + ("F32" if len(ne) == 1 else "a float or quantized type"))
            chosen.append(t)
        self.ctx = ggml.Context(len(chosen))
        self.tensors: dict[str, int] = {
            t.name: self.ctx.new_tensor(int(t.tensor_type), tuple(int(x) for x in t.shape), t.name)
            for t in chosen}
        for t in chosen:
            expect = ggml.lib.ggml_nbytes(self.tensors[t.name])
            if t.n_bytes != expect:
                raise ShardSetError(f"{path}: tensor {t.name} holds {t.n_bytes} bytes, "
                                    f"its type and shape need {expect}")
        self.nbytes = sum(t.n_bytes for t in chosen)
        check = crc32 is not None and CHECKSUMS
        if backend.maps_host_memory:
            self.buffer = ggml.MappedBuffer(path, backend.device, f"{path} weights")
            for t in chosen:
                self.buffer.place(self.tensors[t.name], t.data_offset)
                if check:  # through the mapping: the pages it reads are the ones used in place
                    _check_crc(path, t.name, crc32, zlib.crc32((ctypes.c_char * t.n_bytes)
                                                               .from_address(self.buffer.addr
                                                                             + t.data_offset)))
        else:
            from edgemoe.pool import read_span

            # One matmul per matrix type (and the embedding lookup) decides where they live.
            matrices = {int(t.tensor_type): (t.name, int(t.shape[0]))
                        for t in chosen if len(t.shape) == 2}
            embd = tensor_name(MODEL_TENSOR.TOKEN_EMBD)

            def probe(o: ggml.Ops) -> list[int]:
                new = o.context.new_tensor
                ops = [o.get_rows(self.tensors[embd], new(GGMLType.I32, (1,)))]
                for name, ne0 in matrices.values():
                    ops.append(o.mul_mat(self.tensors[name], new(GGMLType.F32, (ne0, 1))))
                return ops

            self.buffer = ggml.Buffer(self.ctx, backend.buffer_type_for("base weights", probe),
                                      f"{path} weights")
            for t in chosen:   # in pieces: the reading buffer stays small (it is kept)
                crc = 0
                for start in range(0, t.n_bytes, _READ_PIECE):
                    n = min(_READ_PIECE, t.n_bytes - start)
                    try:
                        data = read_span(path, t.data_offset + start, n)
                    except (OSError, EOFError) as exc:
                        raise ShardSetError(f"{path}: cannot read tensor {t.name} ({exc})") from None
                    if check:
                        crc = zlib.crc32(data, crc)
                    ggml.tensor_set(self.tensors[t.name], data, start)
                if check:
                    _check_crc(path, t.name, crc32, crc)

    def get(self, kind: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> int | None:
        return self.tensors.get(tensor_name(kind, layer, suffix))

    def close(self) -> None:
        self.buffer.close()
        self.ctx.close()


class KVCache:
    """Per layer, K as (n_embd_kv, n_ctx) and V as (n_embd_v, n_ctx) rows, one row per position
    (cell = position).
    Written inside the graph with ggml_set_rows at the batch's positions."""

    def __init__(self, hp: HParams, n_ctx: int, kv_type: int, backend: ggml.Backend,
                 clear: bool = True):
        self.n_ctx = n_ctx
        self.type = kv_type
        self.ctx = ggml.Context(2 * hp.n_layer)
        self.k = [self.ctx.new_tensor(kv_type, (hp.n_embd_kv, n_ctx), f"cache_k_l{il}")
                  for il in range(hp.n_layer)]
        # n_embd_v 0: the model reads its values out of the key cache (DeepSeek's latent rows).
        self.v = [self.ctx.new_tensor(kv_type, (hp.n_embd_v, n_ctx), f"cache_v_l{il}")
                  for il in range(hp.n_layer)] if hp.n_embd_v else []
        dk, dv, n_kv = hp.head_dim, hp.head_dim_v or hp.head_dim, min(n_ctx, KV_STEP)

        def probe(o: ggml.Ops) -> list[int]:  # the ops that write and read the cache
            new = o.context.new_tensor
            idx = new(GGMLType.I64, (1,))
            q = new(GGMLType.F32, (dk, 1, hp.n_head))
            k = new(kv_type, (dk, n_kv, hp.n_head_kv))
            v = new(kv_type, (dv, n_kv, hp.n_head_kv))
            mask = new(GGMLType.F16, (n_kv, 1))
            writes = [o.set_rows(c[0], new(GGMLType.F32, (n, 1)), idx)
                      for c, n in ((self.k, hp.n_embd_kv), (self.v, hp.n_embd_v)) if c]
            return writes + [o.flash_attn(q, k, v, mask, 1.0)]

        self.buffer = ggml.Buffer(self.ctx, backend.buffer_type_for("KV cache", probe),
                                  "the KV cache")
        # Unwritten cells are masked out, but must not hold NaN bit patterns (0 * NaN = NaN).
        if clear:   # (not for an engine opened to be measured: its pages stay untouched)
            self.buffer.clear(0)
        self.nbytes = self.buffer.nbytes

    def close(self) -> None:
        self.buffer.close()
        self.ctx.close()


class SplitState:
    """Persistent (n_embd, n_batch) F32 tensors carrying the residual stream `x` and the
    normalised FFN input `h` between the per-layer graphs of exact routing."""

    def __init__(self, hp: HParams, n_batch: int, backend: ggml.Backend):
        self.ctx = ggml.Context(2)
        self.x = self.ctx.new_tensor(GGMLType.F32, (hp.n_embd, n_batch), "state_x")
        self.h = self.ctx.new_tensor(GGMLType.F32, (hp.n_embd, n_batch), "state_h")
        self.buffer = ggml.Buffer(
            self.ctx, backend.buffer_type_for("layer state", lambda o: [o.cpy(self.x, self.h)]),
            "the layer state")
        self.nbytes = self.buffer.nbytes

    def close(self) -> None:
        self.buffer.close()
        self.ctx.close()


@dataclass
class Graph:
    """A built graph for one shape, with its input tensors (filled before each compute) and
    output tensors (read after), both by name:
    inputs:  tokens I32 (n_tokens,); pos I32 (n_tokens,); kv_idx I64 (n_tokens,) cells written;
             kq_mask F16 (n_kv, n_tokens) 0 where a token may attend, -inf elsewhere (and
             kq_mask_swa, the same within a sliding window, for models that have one);
             forward graphs, per MoE layer L: route_mask-L F32 (n_expert,) 0 / -inf and
             slot_map-L I32 (1, n_expert) expert -> slot;
             exact routing, expert graphs: ids I32 (k, n_tokens) slots, weights F32 (1, k, n_tokens).
    outputs: logits F32 (n_vocab, n_out); observed forward graphs: router_logits-L F32 (n_expert,
             n_tokens) unmasked, x_norm-L F32 (n_tokens,) L2 norm of the experts' input,
             selected-L I32 (k, n_tokens) the experts masked gating chose; exact routing,
             attention graphs: selected I32 (k, n_tokens), weights F32 (k, n_tokens),
             and next_logits F32 (n_expert, n_tokens) the next MoE layer's router
             applied to this layer's expert input (a prefetch prediction)."""

    ctx: ggml.Context
    graph: int
    n_tokens: int
    n_kv: int
    n_out: int
    inputs: dict[str, int]
    outputs: dict[str, int]

    def close(self) -> None:
        self.ctx.close()


def graph_nodes_upper_bound(hp: HParams) -> int:
    # About 60 nodes per layer in the widest case so far (shared expert, q/k norms, masked
    # routing, a gating function of its own); room to spare costs a few bytes per node.
    return 128 + 160 * hp.n_layer


class Decoder:
    """The graphs of one MoE decoder over base weights, expert slots and a KV cache.

    Each architecture is a subclass in its own module (edgemoe/arch/<model>.py, named like its
    converter) that overrides the pieces it changes: `tensors` (what it reads from base.gguf),
    `norm`, `qkv`, `gate` (router weights), `shared_expert`, ... The pieces here are the common
    case: RMSNorm, GQA attention with optional biases, softmax top-k routing, SwiGLU experts.

    `build` makes the whole forward pass (masked routing). Exact routing splits it:
    `build_attention(L)` (attention, residual, FFN norm, router; experts of a dense layer),
    `build_experts(L)` (the experts chosen by the host), `build_output()`, linked by SplitState.
    """

    name: str = ""                    # general.architecture, as llama.cpp spells it
    hf_names: tuple[str, ...] = ()    # transformers model types it comes from (for messages)
    rope_mode: int = ggml.ROPE_NEOX   # ROPE_NORM where llama.cpp permutes q/k at conversion
    expert_weights_norm: bool = False  # renormalise the top-k weights to sum to 1
    hparams_class: type[HParams] = HParams

    @classmethod
    def params(cls) -> dict[str, Param]:
        """The hyper-parameters' GGUF keys, their config.json fields and HParams fields; a
        model extends or replaces entries (keyed by GGUF key)."""
        K, A, R = Keys.LLM, Keys.Attention, Keys.Rope
        return table(
            Param(K.CONTEXT_LENGTH, "n_ctx_train", "max_position_embeddings"),
            Param(K.EMBEDDING_LENGTH, "n_embd", "hidden_size"),
            Param(K.BLOCK_COUNT, "n_layer", "num_hidden_layers"),
            Param(K.FEED_FORWARD_LENGTH, "n_ff", "intermediate_size", default=0),
            Param(A.HEAD_COUNT, "n_head", "num_attention_heads"),
            Param(A.HEAD_COUNT_KV, "n_head_kv", ("num_key_value_heads", "num_attention_heads"),
                  default=lambda v: v["n_head"]),
            Param(R.FREQ_BASE, "rope_freq_base", rope_theta, float, 10000.0),
            Param(A.LAYERNORM_RMS_EPS, "rms_eps", "rms_norm_eps", float),
            Param(K.EXPERT_COUNT, "n_expert", ("num_local_experts", "num_experts")),
            Param(K.EXPERT_USED_COUNT, "n_expert_used", "num_experts_per_tok"),
            Param(K.EXPERT_WEIGHTS_NORM, None, lambda c: cls.expert_weights_norm, bool),
            Param(K.EXPERT_GATING_FUNC, None, lambda c: ExpertGatingFuncType.SOFTMAX),
            Param(K.VOCAB_SIZE, "n_vocab", "vocab_size", default=0),
            Param(A.KEY_LENGTH, "head_dim", "head_dim",
                  default=lambda v: v["n_embd"] // max(v["n_head"], 1)),
            Param(A.VALUE_LENGTH, "head_dim_v", "head_dim", default=lambda v: v["head_dim"]),
            Param(R.DIMENSION_COUNT, "n_rot",
                  lambda c: c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                  default=lambda v: v["head_dim"]),
            Param(K.EXPERT_FEED_FORWARD_LENGTH, "n_ff_exp", default=lambda v: v["n_ff"]),
            Param(K.EXPERT_SHARED_FEED_FORWARD_LENGTH, "n_ff_shexp", default=0),
            Param(K.EXPERT_WEIGHTS_SCALE, "expert_weights_scale", kind=float, default=1.0),
            # Granite's multipliers (a model without them reads the defaults)
            Param(K.EMBEDDING_SCALE, "embedding_scale", kind=float, default=1.0),
            Param(A.SCALE, "attention_scale", kind=float, default=0.0),
            Param(K.RESIDUAL_SCALE, "residual_scale", kind=float, default=1.0),
            Param(K.LOGIT_SCALE, "logit_scale", kind=float, default=1.0),
            # RoPE scaling: its kind and factor become rope_freq_scale / rope_ext_factor
            Param(R.SCALING_TYPE, "rope_scaling", rope_scaled("", "rope_type"), str, "none"),
            Param(R.SCALING_FACTOR, "rope_factor", rope_scaled("yarn", "factor"), float, 1.0),
            Param(R.SCALING_ORIG_CTX_LEN, "n_ctx_orig",
                  rope_scaled("", "original_max_position_embeddings"),
                  default=lambda v: v["n_ctx_train"]),
            Param(R.SCALING_YARN_BETA_FAST, "rope_beta_fast", rope_scaled("yarn", "beta_fast"),
                  float, 32.0),
            Param(R.SCALING_YARN_BETA_SLOW, "rope_beta_slow", rope_scaled("yarn", "beta_slow"),
                  float, 1.0),
            Param(R.SCALING_ATTN_FACTOR, "rope_attn_factor", kind=float, default=1.0),
        )

    def __init__(self, hp: HParams, weights: BaseWeights, slots, kv: KVCache,
                 state: SplitState | None = None):
        self.hp, self.w, self.slots, self.kv, self.state = hp, weights, slots, kv, state
        self.moe_layers = [l for l in range(hp.n_layer) if l in hp.expert_layers]

    # -- the base tensors it reads: name -> (ggml ne, required); None: a width the metadata does
    #    not fix (a dense layer's n_ff) --------------------------------------------------------

    @classmethod
    def tensors(cls, hp: HParams) -> dict[str, tuple[tuple, bool]]:
        E, V, M = hp.n_embd, hp.n_vocab, MODEL_TENSOR
        out = {
            tensor_name(M.TOKEN_EMBD): ((E, V), True),
            tensor_name(M.OUTPUT_NORM): ((E,), True),
            tensor_name(M.OUTPUT): ((E, V), False),  # absent when tied to token_embd
        }
        for il in range(hp.n_layer):
            out.update(cls.attention_tensors(hp, il))
            out[tensor_name(M.ATTN_NORM, il)] = ((E,), True)
            out[tensor_name(M.FFN_NORM, il)] = ((E,), True)
            out.update(cls.moe_tensors(hp, il) if il in hp.expert_layers
                       else cls.dense_tensors(hp, il))
        return out

    @classmethod
    def attention_tensors(cls, hp: HParams, il: int) -> dict:
        E, Q, K, VV, M = hp.n_embd, hp.n_embd_q, hp.n_embd_kv, hp.n_embd_v, MODEL_TENSOR
        O = hp.n_head * (hp.head_dim_v or hp.head_dim)
        return {
            tensor_name(M.ATTN_Q, il): ((E, Q), True),
            tensor_name(M.ATTN_K, il): ((E, K), True),
            tensor_name(M.ATTN_V, il): ((E, VV), True),
            tensor_name(M.ATTN_OUT, il): ((O, E), True),
            tensor_name(M.ATTN_Q, il, "bias"): ((Q,), False),
            tensor_name(M.ATTN_K, il, "bias"): ((K,), False),
            tensor_name(M.ATTN_V, il, "bias"): ((VV,), False),
            tensor_name(M.ATTN_OUT, il, "bias"): ((E,), False),
        }

    @classmethod
    def moe_tensors(cls, hp: HParams, il: int) -> dict:
        return {tensor_name(MODEL_TENSOR.FFN_GATE_INP, il): ((hp.n_embd, hp.n_expert), True)}

    @classmethod
    def dense_tensors(cls, hp: HParams, il: int) -> dict:
        E, M = hp.n_embd, MODEL_TENSOR
        return {tensor_name(M.FFN_GATE, il): ((E, None), True),
                tensor_name(M.FFN_UP, il): ((E, None), True),
                tensor_name(M.FFN_DOWN, il): ((None, E), True)}

    # -- whole graphs ------------------------------------------------------------------------------

    def _begin(self, n_nodes: int):
        ctx = ggml.Context(2 * n_nodes, graph_size=n_nodes)
        return ctx, ggml.Ops(ctx), ctx.new_graph()

    def _finish(self, ctx, o, gf, n_tokens, n_kv, n_out, inputs, outputs) -> Graph:
        for t in outputs.values():
            o.output(t)
            ggml.lib.ggml_build_forward_expand(gf, t)
        return Graph(ctx, gf, n_tokens, n_kv, n_out, inputs, outputs)

    def _attn_inputs(self, o: ggml.Ops, n_tokens: int, n_kv: int,
                     layers: range) -> dict[str, int]:
        """Positions, cells to write and the attention masks of `layers` (an input the graph
        does not use would not be allocated)."""
        masks = sorted({self.mask_of(il) for il in layers})
        return {"pos": o.input(GGMLType.I32, (n_tokens,), "inp_pos"),
                "kv_idx": o.input(GGMLType.I64, (n_tokens,), "inp_kv_idx"),
                **{name: o.input(GGMLType.F16, (n_kv, n_tokens), f"inp_{name}")
                   for name in masks}}

    def mask_of(self, il: int) -> str:
        """The mask input layer il attends with (models with a sliding window vary it)."""
        return "kq_mask"

    def masks(self, pos: np.ndarray, n_kv: int) -> dict[str, np.ndarray]:
        """Every mask input's value for a batch at positions `pos` over n_kv cells."""
        return {"kq_mask": kq_mask(pos, n_kv)}

    def build(self, n_tokens: int, n_kv: int, observed: bool = False,
              n_out: int | None = None, substituted: bool = False) -> Graph:
        """The forward graph of a batch of n_tokens attending over n_kv cells, with logits for
        its last n_out tokens (None: all; 0: none). The output projection (n_vocab rows) is
        the largest matmul of a prompt and its result the largest buffer: llama.cpp's
        n_outputs idea, computing only the rows that are sampled or scored. substituted: a
        chosen expert runs from its full slot or from its substitute's (the pool's low-bit
        tier), as per-layer inputs say."""
        hp = self.hp
        n_out = n_tokens if n_out is None else n_out
        ctx, o, gf = self._begin(graph_nodes_upper_bound(hp))
        inputs = {"tokens": o.input(GGMLType.I32, (n_tokens,), "inp_tokens"),
                  **self._attn_inputs(o, n_tokens, n_kv, range(hp.n_layer))}
        outputs: dict[str, int] = {}
        x = self.embed(o, inputs["tokens"])  # (n_embd, n_tokens)
        for il in range(hp.n_layer):
            # Unobserved, the last layer's FFN runs for the tokens whose logits are wanted only
            # (an observer sees every token's routing). Without logits nothing after the last
            # layer's K/V write is in the graph at all.
            trim = not observed and il == hp.n_layer - 1 and 0 < n_out < n_tokens
            x, h = self._attention_block(o, gf, x, il, inputs, n_tokens, n_kv,
                                         n_out if trim else None)
            m = n_out if trim else n_tokens
            if n_out == 0 and il == hp.n_layer - 1:
                if il in hp.expert_layers and observed:  # observers see its routing
                    self._route(o, h, il, m, inputs, outputs, True, True, map_slots=False)
                break
            if il in hp.expert_layers:
                ids, weights = self._route(o, h, il, m, inputs, outputs, True, observed)
                if substituted:
                    (ids, weights), (sub_ids, sub_weights) = self._split(o, il, m, ids, weights,
                                                                         inputs)
                ffn = self.experts(o, h, il, ids, weights, m)
                if substituted:
                    ffn = o.add(ffn, self.experts(o, h, il, sub_ids, sub_weights, m,
                                                  shared=False, substitute=True))
            else:
                ffn = self.dense_ffn(o, h, il)
            x = self.residual(o, ffn, x)
        if n_out:
            if observed and n_out < n_tokens:
                x = self._last_columns(o, x, n_tokens, n_out)
            outputs["logits"] = self.output(o, x)
        return self._finish(ctx, o, gf, n_tokens, n_kv, n_out, inputs, outputs)

    # -- exact routing: one graph per stage ------------------------------------------------------

    def _state_view(self, o: ggml.Ops, t: int, n_tokens: int) -> int:
        return o.view_2d(t, self.hp.n_embd, n_tokens, ggml.row_size(GGMLType.F32, self.hp.n_embd), 0)

    def _store(self, o: ggml.Ops, value: int, state: int, n_tokens: int) -> int:
        return o.cpy(value, self._state_view(o, state, n_tokens))

    def build_attention(self, il: int, n_tokens: int, n_kv: int) -> Graph:
        """Layer il up to its router (a dense layer: through its FFN); x and h go to SplitState."""
        hp, w, M, st = self.hp, self.w, MODEL_TENSOR, self.state
        ctx, o, gf = self._begin(192)
        inputs = self._attn_inputs(o, n_tokens, n_kv, range(il, il + 1))
        outputs: dict[str, int] = {}
        if il == 0:
            inputs["tokens"] = o.input(GGMLType.I32, (n_tokens,), "inp_tokens")
            x = self.embed(o, inputs["tokens"])
        else:
            x = self._state_view(o, st.x, n_tokens)
        x, h = self._attention_block(o, gf, x, il, inputs, n_tokens, n_kv)
        if il in hp.expert_layers:
            outputs["store_x"] = self._store(o, x, st.x, n_tokens)
            outputs["store_h"] = self._store(o, h, st.h, n_tokens)
            # The host maps these experts to slots (loading misses) before the expert graph.
            selected, weights = self._route(o, h, il, n_tokens, inputs, outputs, False, False)
            outputs["selected"] = o.cont(selected)
            outputs["weights"] = o.reshape_2d(weights, hp.n_expert_used, n_tokens)
            later = [l for l in self.moe_layers if l > il]
            if later:
                outputs["next_logits"] = self.router_logits(o, h, later[0])
        else:
            outputs["store_x"] = self._store(o, self.residual(o, self.dense_ffn(o, h, il), x),
                                             st.x, n_tokens)
        return self._finish(ctx, o, gf, n_tokens, n_kv, 0, inputs, outputs)

    def build_experts(self, il: int, n_tokens: int, shared: bool = True,
                      k: int | None = None, k_sub: int = 0) -> Graph:
        """The experts of MoE layer il on the slots the host chose, added to the residual in
        state. A selection run in several groups adds the shared expert with the first only.
        k: experts per token from full slots (default the model's; fewer when adaptive gating
        dropped some or substitutes run, 0: none); k_sub: experts per token from the
        substitute tier (inputs sub_ids, sub_weights)."""
        st = self.state
        k = self.hp.n_expert_used if k is None else k
        ctx, o, gf = self._begin(96 if not k_sub else 160)
        inputs: dict[str, int] = {}
        ffn = None
        for prefix, m, substitute in (("", k, False), ("sub_", k_sub, True)):
            if not m:
                continue
            ids = inputs[prefix + "ids"] = o.input(GGMLType.I32, (m, n_tokens), f"inp_{prefix}ids")
            w = inputs[prefix + "weights"] = o.input(GGMLType.F32, (1, m, n_tokens),
                                                     f"inp_{prefix}weights")
            h = self._state_view(o, st.h, n_tokens)
            part = self.experts(o, h, il, ids, w, n_tokens, shared and ffn is None, m, substitute)
            ffn = part if ffn is None else o.add(ffn, part)
        if ffn is None:
            raise ValueError(f"layer {il}: an experts graph needs at least one expert")
        x = self._state_view(o, st.x, n_tokens)
        outputs = {"store_x": self._store(o, self.residual(o, ffn, x), st.x, n_tokens)}
        return self._finish(ctx, o, gf, n_tokens, 0, 0, inputs, outputs)

    def build_output(self, n_tokens: int, n_out: int) -> Graph:
        """Logits of the last n_out (>= 1) of n_tokens in state."""
        ctx, o, gf = self._begin(16)
        x = self._state_view(o, self.state.x, n_tokens)
        if n_out < n_tokens:
            x = self._last_columns(o, x, n_tokens, n_out)
        return self._finish(ctx, o, gf, n_tokens, 0, n_out, {}, {"logits": self.output(o, x)})

    # -- pieces ------------------------------------------------------------------------------------

    def embed(self, o: ggml.Ops, tokens: int) -> int:
        x = o.get_rows(self.w.get(MODEL_TENSOR.TOKEN_EMBD), tokens)
        return o.scale(x, self.hp.embedding_scale) if self.hp.embedding_scale != 1.0 else x

    def residual(self, o: ggml.Ops, y: int, x: int) -> int:
        """x + a block's output y (scaled first where the model says: Granite)."""
        if self.hp.residual_scale != 1.0:
            y = o.scale(y, self.hp.residual_scale)
        return o.add(y, x)

    def _last_columns(self, o: ggml.Ops, x: int, n_tokens: int, n: int) -> int:
        """The last n tokens' columns of an (n_embd, n_tokens) tensor (contiguous)."""
        row = ggml.row_size(GGMLType.F32, self.hp.n_embd)
        return o.view_2d(x, self.hp.n_embd, n, row, row * (n_tokens - n))

    def output(self, o: ggml.Ops, x: int) -> int:
        w, M = self.w, MODEL_TENSOR
        x = self.norm(o, x, M.OUTPUT_NORM)
        logits = self.linear(o, w.get(M.OUTPUT) or w.get(M.TOKEN_EMBD), x,
                             w.get(M.OUTPUT, None, "bias"))  # (n_vocab, n_out)
        if self.hp.logit_scale != 1.0:
            logits = o.scale(logits, 1.0 / self.hp.logit_scale)
        return o.name(logits, "result_output")

    def _attention_block(self, o, gf, x, il, inputs, n_tokens, n_kv,
                         n_keep: int | None = None) -> tuple[int, int]:
        """Pre-norm attention with its residual; returns (x, ffn-normalised x), of the last
        n_keep tokens only when given."""
        h = self.norm(o, x, MODEL_TENSOR.ATTN_NORM, il)
        x = self.residual(o, self.attention(o, gf, h, il, inputs, n_tokens, n_kv), x)
        if n_keep is not None:
            x = self._last_columns(o, x, n_tokens, n_keep)
        return x, self.norm(o, x, MODEL_TENSOR.FFN_NORM, il)

    def norm(self, o: ggml.Ops, x: int, kind: MODEL_TENSOR, il: int | None = None) -> int:
        """RMSNorm of x's columns scaled by the norm tensor `kind` of layer il."""
        return o.mul(o.rms_norm(x, self.hp.rms_eps), self.w.get(kind, il))

    def linear(self, o: ggml.Ops, weight: int, x: int, bias: int | None = None) -> int:
        y = o.mul_mat(weight, x)
        return o.add(y, bias) if bias else y

    def project(self, o: ggml.Ops, kind: MODEL_TENSOR, il: int, x: int) -> int:
        """Layer il's projection `kind` of x, with its bias when the model has one."""
        return self.linear(o, self.w.get(kind, il), x, self.w.get(kind, il, "bias"))

    def qkv(self, o: ggml.Ops, x: int, il: int, n_tokens: int) -> tuple[int, int, int]:
        """q (head_dim, n_head, n_tokens), k (head_dim, n_head_kv, n_tokens), v (n_embd_v,
        n_tokens), before RoPE."""
        hp, M = self.hp, MODEL_TENSOR
        q = o.reshape_3d(self.project(o, M.ATTN_Q, il, x), hp.head_dim, hp.n_head, n_tokens)
        k = o.reshape_3d(self.project(o, M.ATTN_K, il, x), hp.head_dim, hp.n_head_kv, n_tokens)
        return q, k, self.project(o, M.ATTN_V, il, x)

    def rope(self, o: ggml.Ops, t: int, inputs: dict[str, int]) -> int:
        hp = self.hp
        return o.rope(t, inputs["pos"], hp.n_rot, self.rope_mode, hp.n_ctx_orig,
                      hp.rope_freq_base, hp.rope_freq_scale, hp.rope_ext_factor,
                      hp.rope_attn_factor, hp.rope_beta_fast, hp.rope_beta_slow,
                      self.rope_factors())

    def rope_factors(self) -> int | None:
        """Per-pair frequency divisors for RoPE (LongRoPE's), or None."""
        return None

    def attention(self, o: ggml.Ops, gf: int, x: int, il: int, inputs: dict[str, int],
                  n_tokens: int, n_kv: int) -> int:
        q, k, v = self.qkv(o, x, il, n_tokens)
        q, k = self.rope(o, q, inputs), self.rope(o, k, inputs)
        scale = self.hp.attention_scale or 1.0 / math.sqrt(self.hp.head_dim)
        att = self.attend(o, gf, q, k, v, il, inputs, n_tokens, n_kv, scale)
        return self.project(o, MODEL_TENSOR.ATTN_OUT, il, att)

    def attend(self, o: ggml.Ops, gf: int, q: int, k: int, v: int, il: int,
               inputs: dict[str, int], n_tokens: int, n_kv: int, scale: float,
               sinks: int | None = None) -> int:
        """Scaled dot-product attention of q over the cached keys and values, this batch's k
        and v written into their cells first: (n_head * head_dim_v, n_tokens); `sinks`: a
        per-head sink logit tensor."""
        hp = self.hp
        D, Dv, HKV = hp.head_dim, hp.head_dim_v or hp.head_dim, hp.n_head_kv
        # Write this batch's K and V into their cells, then attend over the first n_kv cells
        # through views of the written caches (which orders the writes before the reads).
        kv_t = self.kv.type
        k_all = o.set_rows(self.kv.k[il], o.reshape_2d(k, hp.n_embd_kv, n_tokens), inputs["kv_idx"])
        v_all = o.set_rows(self.kv.v[il], o.reshape_2d(v, hp.n_embd_v, n_tokens), inputs["kv_idx"])
        ggml.lib.ggml_build_forward_expand(gf, k_all)
        ggml.lib.ggml_build_forward_expand(gf, v_all)
        k_view = o.view_3d(k_all, D, n_kv, HKV, ggml.row_size(kv_t, hp.n_embd_kv),
                           ggml.row_size(kv_t, D), 0)   # (head_dim, n_kv, n_head_kv)
        v_view = o.view_3d(v_all, Dv, n_kv, HKV, ggml.row_size(kv_t, hp.n_embd_v),
                           ggml.row_size(kv_t, Dv), 0)
        q = o.permute(q, 0, 2, 1, 3)                           # (head_dim, n_tokens, n_head)
        att = o.flash_attn(q, k_view, v_view, inputs[self.mask_of(il)], scale, sinks)
        return o.reshape_2d(att, Dv * hp.n_head, n_tokens)     # (n_head * head_dim_v, n_tokens)

    def ffn(self, o: ggml.Ops, x: int, gate: int, up: int, down: int) -> int:
        return o.mul_mat(down, o.swiglu_split(o.mul_mat(gate, x), o.mul_mat(up, x)))

    def dense_ffn(self, o: ggml.Ops, h: int, il: int) -> int:
        w, M = self.w, MODEL_TENSOR
        return self.ffn(o, h, w.get(M.FFN_GATE, il), w.get(M.FFN_UP, il), w.get(M.FFN_DOWN, il))

    def router_logits(self, o: ggml.Ops, h: int, il: int) -> int:
        return o.mul_mat(self.w.get(MODEL_TENSOR.FFN_GATE_INP, il), h)  # (n_expert, n_tokens)

    def gate(self, o: ggml.Ops, logits: int, n_tokens: int) -> tuple[int, int]:
        """The router: (expert ids I32 (k, n_tokens), weights F32 (1, k, n_tokens)) from its
        logits (n_expert, n_tokens). Softmax, top-k, optional renormalisation and scale."""
        hp = self.hp
        n_expert, k = hp.n_expert, hp.n_expert_used
        probs = o.soft_max(logits)                       # (n_expert, n_tokens)
        selected = o.argsort_top_k(probs, k)             # I32 (k, n_tokens)
        weights = o.get_rows(o.reshape_3d(probs, 1, n_expert, n_tokens), selected)  # (1, k, n_tokens)
        if hp.expert_weights_norm:
            weights = o.reshape_2d(weights, k, n_tokens)
            total = o.clamp(o.sum_rows(weights), 6.103515625e-5, math.inf)  # (1, n_tokens)
            weights = o.reshape_3d(o.div(weights, total), 1, k, n_tokens)
        if hp.expert_weights_scale not in (0.0, 1.0):
            weights = o.scale(weights, hp.expert_weights_scale)
        return selected, weights

    def _route(self, o: ggml.Ops, h: int, il: int, n_tokens: int, inputs: dict[str, int],
               outputs: dict[str, int], masked: bool, observed: bool,
               map_slots: bool = True) -> tuple[int, int]:
        """Router of MoE layer il: (ids I32 (k, n_tokens), weights F32 (1, k, n_tokens)); masked:
        restricted to the resident experts, ids are slots; observed: the unmasked logits, the
        experts' input norms and the selection are outputs (policies score them).
        map_slots=False: the experts will not run (no slot_map input)."""
        n_expert, k = self.hp.n_expert, self.hp.n_expert_used
        logits = self.router_logits(o, h, il)  # (n_expert, n_tokens)
        if observed:
            outputs[f"router_logits-{il}"] = logits
            # The experts' input norm feeds importance scores (SwapMoE Eq. 1).
            outputs[f"x_norm-{il}"] = o.sqrt(o.sum_rows(o.sqr(h)))  # (1, n_tokens)
        if masked:
            mask = o.input(GGMLType.F32, (n_expert,), f"inp_route_mask-{il}")
            inputs[f"route_mask-{il}"] = mask
            if map_slots:
                inputs[f"slot_map-{il}"] = o.input(GGMLType.I32, (1, n_expert),
                                                   f"inp_slot_map-{il}")
            logits = o.add(logits, mask)  # -inf hides non-resident experts from softmax and top-k
        selected, weights = self.gate(o, logits, n_tokens)
        if masked:
            chosen = o.cont(selected)  # expert ids, an output so policies can audit the mask
            if observed:
                outputs[f"selected-{il}"] = chosen
            if not map_slots:
                return chosen, weights
            # One map for all tokens: look the k*n_tokens choices up as a flat list of rows.
            flat = o.reshape_2d(chosen, k * n_tokens, 1)
            selected = o.reshape_2d(o.get_rows(inputs[f"slot_map-{il}"], flat), k, n_tokens)
            self._flat_choice = flat   # _split maps the same choices to substitute slots
        return selected, weights

    def _split(self, o: ggml.Ops, il: int, n_tokens: int, ids: int, weights: int,
               inputs: dict[str, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """The masked choice of layer il (just made by _route) split between the two tiers:
        ((full slots, weights where the full expert is resident, else 0), (substitute slots,
        weights where only the substitute is)). Inputs per layer: sub_map-L I32 (1, n_expert)
        expert -> substitute slot, is_full-L and is_sub-L F32 (1, n_expert) 1 / 0."""
        n_expert, k = self.hp.n_expert, self.hp.n_expert_used
        flat = self._flat_choice
        for name, t in (("sub_map", GGMLType.I32), ("is_full", GGMLType.F32),
                        ("is_sub", GGMLType.F32)):
            inputs[f"{name}-{il}"] = o.input(t, (1, n_expert), f"inp_{name}-{il}")
        tier = lambda name: o.reshape_3d(o.get_rows(inputs[f"{name}-{il}"], flat), 1, k, n_tokens)
        sub_ids = o.reshape_2d(o.get_rows(inputs[f"sub_map-{il}"], flat), k, n_tokens)
        return ((ids, o.mul(weights, tier("is_full"))),
                (sub_ids, o.mul(weights, tier("is_sub"))))

    def expert_ffn(self, o: ggml.Ops, x3: int, il: int, ids: int,
                   substitute: bool = False) -> int:
        """Each token's k experts on x3 (n_embd, 1, n_tokens): (n_embd, k, n_tokens)."""
        slots = self.slots.tensors(il, substitute)  # ffn_gate/up: (n_embd, n_ff_exp, n_slots)
        gate = o.mul_mat_id(slots["ffn_gate"], x3, ids)  # (n_ff_exp, k, n_tokens)
        up = o.mul_mat_id(slots["ffn_up"], x3, ids)
        return o.mul_mat_id(slots["ffn_down"], o.swiglu_split(gate, up), ids)

    def shared_expert(self, o: ggml.Ops, h: int, il: int) -> int | None:
        """What a layer adds to its routed experts' output besides them (none here)."""
        return None

    def experts(self, o: ggml.Ops, h: int, il: int, ids: int, weights: int, n_tokens: int,
                shared: bool = True, k: int | None = None, substitute: bool = False) -> int:
        """Weighted sum of the k experts per token in slots `ids` (+ the shared expert), of the
        substitute tier with substitute=True: (n_embd, n_tokens)."""
        hp = self.hp
        k = k or hp.n_expert_used
        out = self.expert_ffn(o, o.reshape_3d(h, hp.n_embd, 1, n_tokens), il, ids, substitute)
        out = o.mul(out, weights)
        # Sum the k weighted expert outputs: views of the (n_embd, k, n_tokens) tensor.
        row = ggml.row_size(GGMLType.F32, hp.n_embd)
        moe = None
        for j in range(k):
            part = o.view_2d(out, hp.n_embd, n_tokens, row * k, row * j)
            moe = part if moe is None else o.add(moe, part)
        extra = self.shared_expert(o, h, il) if shared else None
        return moe if extra is None else o.add(moe, extra)



def kq_mask(pos: np.ndarray, n_kv: int, window: int | None = None) -> np.ndarray:
    """Causal mask (n_tokens, n_kv) as float16: token t attends to cells 0..pos[t], only the
    last `window` of them (itself included) with a sliding window."""
    cells = np.arange(n_kv)[None, :]
    keep = cells <= pos[:, None]
    if window is not None:
        keep &= cells > pos[:, None] - window
    return np.where(keep, 0.0, -np.inf).astype(np.float16)


def kv_cells_for(n_used: int, n_ctx: int) -> int:
    """How many KV cells a graph attends over: the used cells rounded up to KV_STEP."""
    return min(n_ctx, -(-n_used // KV_STEP) * KV_STEP)

