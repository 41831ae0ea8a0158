"""The pieces every supported MoE architecture shares, built as one ggml graph per batch shape.

A decoder layer is: RMSNorm -> GQA attention (q/k/v projections with optional biases, optional
q/k RMSNorm, RoPE in the architecture's mode, a KV cache written with ggml_set_rows) -> residual
-> RMSNorm -> MoE FFN (router ffn_gate_inp, softmax, top-k, optional renormalisation, experts run
by ggml_mul_mat_id over the pool's 3-D slot tensors, optional shared expert with a sigmoid gate)
-> residual. What differs between architectures is declared in an `ArchSpec`; the math follows
llama.cpp's graphs (src/models/<arch>.cpp, build_moe_ffn), which is what makes an exported GGUF
run identically there.

Routing shapes (the seam the residency policies use):
- "full": the router's top-k expert ids index the slot tensors directly (expert e in slot e).
- "masked": per layer, an F32 input (n_expert,) of 0 / -inf is added to the router logits, so the
  softmax and top-k see only resident experts (SwapMoE's masked gating), and an I32 input
  (n_expert,) maps each selected expert to its slot. The unmasked router logits are a graph output
  so a policy can score every expert's importance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.constants import MODEL_TENSOR, TENSOR_NAMES, Keys

from edgemoe import ggml
from edgemoe.ggml import GGMLType
from edgemoe.errors import ShardSetError

# KV cells are allocated in steps of this many, so a decode graph keeps its shape for that many
# tokens and is reused (the same granularity llama.cpp pads its KV view to).
KV_STEP = 256


@dataclass(frozen=True)
class ArchSpec:
    """What one architecture declares; everything else is shared."""

    name: str                 # general.architecture, as llama.cpp spells it
    hf_names: tuple[str, ...] # transformers model types it comes from (for messages)
    rope_mode: int            # ggml.ROPE_NORM (llama.cpp permutes q/k at conversion) or ROPE_NEOX
    qk_norm: str | None       # None, "head": RMSNorm per head (Qwen3), "full": over all heads (OLMoE)
    expert_weights_norm: bool # renormalise the top-k weights to sum to 1
    shared_expert: bool = False  # Qwen2-MoE: ffn_*_shexp gated by sigmoid(ffn_gate_inp_shexp x)


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

    @property
    def n_embd_q(self) -> int:
        return self.head_dim * self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv

    @classmethod
    def from_gguf(cls, reader: GGUFReader, spec: ArchSpec, path: Path) -> "HParams":
        arch = spec.name

        def get(key: str, default=None):
            name = key.format(arch=arch)
            field = reader.fields.get(name)
            if field is None:
                if default is None:
                    raise ShardSetError(f"{path}: metadata key '{name}' missing")
                return default
            return field.contents()

        n_embd = int(get(Keys.LLM.EMBEDDING_LENGTH))
        n_head = int(get(Keys.Attention.HEAD_COUNT))
        head_dim = int(get(Keys.Attention.KEY_LENGTH, n_embd // n_head))
        if int(get(Keys.Attention.VALUE_LENGTH, head_dim)) != head_dim:
            raise ShardSetError(f"{path}: key_length != value_length is not supported")
        scaling = get(Keys.Rope.SCALING_TYPE, "none")
        if scaling not in ("none", "linear"):
            raise ShardSetError(f"{path}: rope scaling '{scaling}' is not supported "
                                "(supported: none, linear)")
        factor = float(get(Keys.Rope.SCALING_FACTOR, 1.0)) if scaling == "linear" else 1.0
        n_layer = int(get(Keys.LLM.BLOCK_COUNT))
        layers = reader.fields.get("edgemoe.expert_layers")
        expert_layers = tuple(int(x) for x in layers.contents()) if layers else tuple(range(n_layer))
        embd = next((t for t in reader.tensors
                     if t.name == TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"), None)
        if embd is None:
            raise ShardSetError(f"{path}: tensor token_embd.weight missing")
        return cls(
            arch=arch,
            n_vocab=int(embd.shape[1]),
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=int(get(Keys.Attention.HEAD_COUNT_KV, n_head)),
            head_dim=head_dim,
            n_rot=int(get(Keys.Rope.DIMENSION_COUNT, head_dim)),
            n_ctx_train=int(get(Keys.LLM.CONTEXT_LENGTH, 4096)),
            rms_eps=float(get(Keys.Attention.LAYERNORM_RMS_EPS)),
            rope_freq_base=float(get(Keys.Rope.FREQ_BASE, 10000.0)),
            rope_freq_scale=1.0 / factor,
            n_expert=int(get(Keys.LLM.EXPERT_COUNT)),
            n_expert_used=int(get(Keys.LLM.EXPERT_USED_COUNT)),
            n_ff_exp=int(get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, 0)),
            n_ff_shexp=int(get(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, 0)),
            # llama.cpp fixes renormalisation per architecture (it ignores the metadata key).
            expert_weights_norm=spec.expert_weights_norm,
            expert_weights_scale=float(get(Keys.LLM.EXPERT_WEIGHTS_SCALE, 1.0)),
            expert_layers=expert_layers,
        )


def tensor_name(kind: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    """llama.cpp's name of a tensor, e.g. blk.3.attn_q.weight (from gguf.constants)."""
    base = TENSOR_NAMES[kind].format(bid=layer) if layer is not None else TENSOR_NAMES[kind]
    return f"{base}.{suffix}"


def expected_tensors(spec: ArchSpec, hp: HParams) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every base tensor the graph reads: name -> (ggml ne, required)."""
    E, V, Q, KV, D = hp.n_embd, hp.n_vocab, hp.n_embd_q, hp.n_embd_kv, hp.head_dim
    M = MODEL_TENSOR
    out = {
        tensor_name(M.TOKEN_EMBD): ((E, V), True),
        tensor_name(M.OUTPUT_NORM): ((E,), True),
        tensor_name(M.OUTPUT): ((E, V), False),  # absent when tied to token_embd
    }
    for il in range(hp.n_layer):
        out[tensor_name(M.ATTN_NORM, il)] = ((E,), True)
        out[tensor_name(M.ATTN_Q, il)] = ((E, Q), True)
        out[tensor_name(M.ATTN_K, il)] = ((E, KV), True)
        out[tensor_name(M.ATTN_V, il)] = ((E, KV), True)
        out[tensor_name(M.ATTN_Q, il, "bias")] = ((Q,), False)
        out[tensor_name(M.ATTN_K, il, "bias")] = ((KV,), False)
        out[tensor_name(M.ATTN_V, il, "bias")] = ((KV,), False)
        out[tensor_name(M.ATTN_OUT, il)] = ((Q, E), True)
        if spec.qk_norm == "head":
            out[tensor_name(M.ATTN_Q_NORM, il)] = ((D,), True)
            out[tensor_name(M.ATTN_K_NORM, il)] = ((D,), True)
        elif spec.qk_norm == "full":
            out[tensor_name(M.ATTN_Q_NORM, il)] = ((Q,), True)
            out[tensor_name(M.ATTN_K_NORM, il)] = ((KV,), True)
        out[tensor_name(M.FFN_NORM, il)] = ((E,), True)
        if il in hp.expert_layers:
            out[tensor_name(M.FFN_GATE_INP, il)] = ((E, hp.n_expert), True)
            if spec.shared_expert:
                S = hp.n_ff_shexp
                out[tensor_name(M.FFN_GATE_INP_SHEXP, il)] = ((E,), True)
                out[tensor_name(M.FFN_GATE_SHEXP, il)] = ((E, S), True)
                out[tensor_name(M.FFN_UP_SHEXP, il)] = ((E, S), True)
                out[tensor_name(M.FFN_DOWN_SHEXP, il)] = ((S, E), True)
        else:  # a dense layer between MoE layers
            out[tensor_name(M.FFN_GATE, il)] = ((E, None), True)
            out[tensor_name(M.FFN_UP, il)] = ((E, None), True)
            out[tensor_name(M.FFN_DOWN, il)] = ((None, E), True)
    return out


class BaseWeights:
    """Every non-expert tensor of base.gguf, copied into one backend buffer in its own quant type
    (the file's page cache is dropped afterwards: the memory budget counts it)."""

    def __init__(self, path: Path, reader: GGUFReader, spec: ArchSpec, hp: HParams,
                 backend: ggml.Backend):
        wanted = expected_tensors(spec, hp)
        present = {t.name: t for t in reader.tensors}
        chosen = []
        for name, (ne, required) in wanted.items():
            t = present.get(name)
            if t is None:
                if required:
                    raise ShardSetError(f"{path}: tensor {name} missing (architecture {spec.name})")
                continue
            got = tuple(int(x) for x in t.shape)
            shape = tuple(g if e is None else e for e, g in zip(ne, got)) if len(got) == len(ne) else ne
            if got != shape:
                raise ShardSetError(f"{path}: tensor {name} has shape {list(got)}, "
                                    f"expected {list(shape)}")
            chosen.append(t)
        self.ctx = ggml.Context(len(chosen))
        self.tensors: dict[str, int] = {}
        self.types: dict[str, int] = {}
        for t in chosen:
            self.tensors[t.name] = self.ctx.new_tensor(int(t.tensor_type), tuple(int(x) for x in t.shape), t.name)
            self.types[t.name] = int(t.tensor_type)
        self.buffer = ggml.Buffer(self.ctx, backend.weights_buffer_type, f"{path} weights")
        raw = reader.data  # the whole file, memory-mapped
        for t in chosen:
            ptr = self.tensors[t.name]
            expect = ggml.lib.ggml_nbytes(ptr)
            if t.n_bytes != expect:
                raise ShardSetError(f"{path}: tensor {t.name} holds {t.n_bytes} bytes, "
                                    f"its type and shape need {expect}")
            ggml.tensor_set(ptr, np.asarray(raw[t.data_offset:t.data_offset + t.n_bytes]))
        self.nbytes = self.buffer.nbytes

    def get(self, kind: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> int | None:
        return self.tensors.get(tensor_name(kind, layer, suffix))

    def close(self) -> None:
        self.buffer.close()
        self.ctx.close()


class KVCache:
    """Per layer, K and V as (n_embd_kv, n_ctx) rows, one row per position (cell = position).
    Written inside the graph with ggml_set_rows at the batch's positions."""

    def __init__(self, hp: HParams, n_ctx: int, kv_type: int, backend: ggml.Backend):
        self.n_ctx = n_ctx
        self.type = kv_type
        self.ctx = ggml.Context(2 * hp.n_layer)
        self.k = [self.ctx.new_tensor(kv_type, (hp.n_embd_kv, n_ctx), f"cache_k_l{il}")
                  for il in range(hp.n_layer)]
        self.v = [self.ctx.new_tensor(kv_type, (hp.n_embd_kv, n_ctx), f"cache_v_l{il}")
                  for il in range(hp.n_layer)]
        self.buffer = ggml.Buffer(self.ctx, backend.weights_buffer_type, "the KV cache")
        # Unwritten cells are masked out, but must not hold NaN bit patterns (0 * NaN = NaN).
        self.buffer.clear(0)
        self.nbytes = self.buffer.nbytes

    def close(self) -> None:
        self.buffer.close()
        self.ctx.close()


@dataclass
class GraphInputs:
    """The input tensors of one built graph, to be filled before each compute."""

    tokens: int         # I32 (n_tokens,)
    pos: int            # I32 (n_tokens,)
    kv_idx: int         # I64 (n_tokens,) cells written by this batch
    kq_mask: int        # F16 (n_kv, n_tokens): 0 where a token may attend, -inf elsewhere
    route_mask: dict[int, int]  # layer -> F32 (n_expert,) (masked routing only)
    slot_map: dict[int, int]    # layer -> I32 (n_expert,) expert -> slot (masked routing only)


@dataclass
class Graph:
    """A built forward graph for one (n_tokens, n_kv) shape and its tensors."""

    ctx: ggml.Context
    graph: int
    n_tokens: int
    n_kv: int
    n_out: int                  # tokens whose logits are computed: n_tokens or 1 (the last)
    inputs: GraphInputs
    logits: int                 # F32 (n_vocab, n_out)
    router_logits: dict[int, int]  # layer -> F32 (n_expert, n_tokens), unmasked (masked routing)

    def close(self) -> None:
        self.ctx.close()


def graph_nodes_upper_bound(hp: HParams) -> int:
    # About 60 nodes per layer in the widest case (shared expert, q/k norms, masked routing).
    return 128 + 96 * hp.n_layer


class GraphBuilder:
    """Builds the forward graph of one architecture over base weights, slot tensors and a cache."""

    def __init__(self, spec: ArchSpec, hp: HParams, weights: BaseWeights, slots, kv: KVCache):
        self.spec, self.hp, self.w, self.slots, self.kv = spec, hp, weights, slots, kv

    def build(self, n_tokens: int, n_kv: int, routing: str = "full",
              all_logits: bool = True) -> Graph:
        """The forward graph of a batch of n_tokens attending over n_kv cells; with
        all_logits=False only the last token's logits are computed (the output projection is
        the largest matmul of a prompt)."""
        hp, w, M = self.hp, self.w, MODEL_TENSOR
        size = graph_nodes_upper_bound(hp)
        ctx = ggml.Context(2 * size, graph_size=size)
        o = ggml.Ops(ctx)
        inp = GraphInputs(
            tokens=o.input(GGMLType.I32, (n_tokens,), "inp_tokens"),
            pos=o.input(GGMLType.I32, (n_tokens,), "inp_pos"),
            kv_idx=o.input(GGMLType.I64, (n_tokens,), "inp_kv_idx"),
            kq_mask=o.input(GGMLType.F16, (n_kv, n_tokens), "inp_kq_mask"),
            route_mask={}, slot_map={},
        )
        router_logits: dict[int, int] = {}
        gf = ctx.new_graph()

        x = o.get_rows(w.get(M.TOKEN_EMBD), inp.tokens)  # (n_embd, n_tokens)
        for il in range(hp.n_layer):
            h = self._norm(o, x, w.get(M.ATTN_NORM, il))
            h = self._attention(o, gf, h, il, inp, n_tokens, n_kv)
            x = o.add(h, x)
            h = self._norm(o, x, w.get(M.FFN_NORM, il))
            if il in hp.expert_layers:
                h = self._moe(o, h, il, n_tokens, routing, inp, router_logits)
            else:
                h = self._ffn(o, h, w.get(M.FFN_GATE, il), w.get(M.FFN_UP, il), w.get(M.FFN_DOWN, il))
            x = o.add(h, x)

        n_out = n_tokens
        if not all_logits:
            row = ggml.row_size(GGMLType.F32, hp.n_embd)
            x, n_out = o.view_2d(x, hp.n_embd, 1, row, row * (n_tokens - 1)), 1
        x = self._norm(o, x, w.get(M.OUTPUT_NORM))
        logits = o.mul_mat(w.get(M.OUTPUT) or w.get(M.TOKEN_EMBD), x)  # (n_vocab, n_out)
        o.output(o.name(logits, "result_output"))
        for t in router_logits.values():
            o.output(t)
            ggml.lib.ggml_build_forward_expand(gf, t)
        ggml.lib.ggml_build_forward_expand(gf, logits)
        return Graph(ctx, gf, n_tokens, n_kv, n_out, inp, logits, router_logits)

    def _norm(self, o: ggml.Ops, x: int, weight: int) -> int:
        return o.mul(o.rms_norm(x, self.hp.rms_eps), weight)

    def _linear(self, o: ggml.Ops, weight: int, x: int, bias: int | None = None) -> int:
        y = o.mul_mat(weight, x)
        return o.add(y, bias) if bias else y

    def _attention(self, o: ggml.Ops, gf: int, x: int, il: int, inp: GraphInputs,
                   n_tokens: int, n_kv: int) -> int:
        hp, w, spec, M = self.hp, self.w, self.spec, MODEL_TENSOR
        D, H, HKV = hp.head_dim, hp.n_head, hp.n_head_kv
        q = self._linear(o, w.get(M.ATTN_Q, il), x, w.get(M.ATTN_Q, il, "bias"))  # (n_embd_q, n_tokens)
        k = self._linear(o, w.get(M.ATTN_K, il), x, w.get(M.ATTN_K, il, "bias"))  # (n_embd_kv, n_tokens)
        v = self._linear(o, w.get(M.ATTN_V, il), x, w.get(M.ATTN_V, il, "bias"))
        if spec.qk_norm == "full":
            q = self._norm(o, q, w.get(M.ATTN_Q_NORM, il))
            k = self._norm(o, k, w.get(M.ATTN_K_NORM, il))
        q = o.reshape_3d(q, D, H, n_tokens)
        k = o.reshape_3d(k, D, HKV, n_tokens)
        if spec.qk_norm == "head":
            q = self._norm(o, q, w.get(M.ATTN_Q_NORM, il))
            k = self._norm(o, k, w.get(M.ATTN_K_NORM, il))
        q = o.rope(q, inp.pos, hp.n_rot, spec.rope_mode, hp.n_ctx_train, hp.rope_freq_base,
                   hp.rope_freq_scale)
        k = o.rope(k, inp.pos, hp.n_rot, spec.rope_mode, hp.n_ctx_train, hp.rope_freq_base,
                   hp.rope_freq_scale)

        # Write this batch's K and V into their cells, then attend over the first n_kv cells
        # through views of the written caches (which orders the writes before the reads).
        kv_t = self.kv.type
        row = ggml.row_size(kv_t, hp.n_embd_kv)
        k_all = o.set_rows(self.kv.k[il], o.reshape_2d(k, hp.n_embd_kv, n_tokens), inp.kv_idx)
        v_all = o.set_rows(self.kv.v[il], o.reshape_2d(v, hp.n_embd_kv, n_tokens), inp.kv_idx)
        ggml.lib.ggml_build_forward_expand(gf, k_all)
        ggml.lib.ggml_build_forward_expand(gf, v_all)
        head = ggml.row_size(kv_t, D)
        k_view = o.view_3d(k_all, D, n_kv, HKV, row, head, 0)  # (head_dim, n_kv, n_head_kv)
        v_view = o.view_3d(v_all, D, n_kv, HKV, row, head, 0)
        q = o.permute(q, 0, 2, 1, 3)                           # (head_dim, n_tokens, n_head)
        att = o.flash_attn(q, k_view, v_view, inp.kq_mask, 1.0 / math.sqrt(D))
        att = o.reshape_2d(att, hp.n_embd_q, n_tokens)         # (n_embd_q, n_tokens)
        return self._linear(o, w.get(M.ATTN_OUT, il), att)

    def _ffn(self, o: ggml.Ops, x: int, gate: int, up: int, down: int) -> int:
        return o.mul_mat(down, o.swiglu_split(o.mul_mat(gate, x), o.mul_mat(up, x)))

    def _moe(self, o: ggml.Ops, x: int, il: int, n_tokens: int, routing: str,
             inp: GraphInputs, router_logits: dict[int, int]) -> int:
        hp, w, M = self.hp, self.w, MODEL_TENSOR
        n_expert, k = hp.n_expert, hp.n_expert_used
        logits = o.mul_mat(w.get(M.FFN_GATE_INP, il), x)  # (n_expert, n_tokens)
        if routing == "masked":
            router_logits[il] = o.name(logits, f"ffn_moe_logits-{il}")
            mask = o.input(GGMLType.F32, (n_expert,), f"inp_route_mask-{il}")
            slot_map = o.input(GGMLType.I32, (1, n_expert), f"inp_slot_map-{il}")
            inp.route_mask[il], inp.slot_map[il] = mask, slot_map
            logits = o.add(logits, mask)  # -inf hides non-resident experts from softmax and top-k
        probs = o.soft_max(logits)                       # (n_expert, n_tokens)
        selected = o.argsort_top_k(probs, k)             # I32 (k, n_tokens)
        weights = o.get_rows(o.reshape_3d(probs, 1, n_expert, n_tokens), selected)  # (1, k, n_tokens)
        if hp.expert_weights_norm:
            weights = o.reshape_2d(weights, k, n_tokens)
            total = o.clamp(o.sum_rows(weights), 6.103515625e-5, math.inf)  # (1, n_tokens)
            weights = o.reshape_3d(o.div(weights, total), 1, k, n_tokens)
        if hp.expert_weights_scale not in (0.0, 1.0):
            weights = o.scale(weights, hp.expert_weights_scale)
        if routing == "masked":
            # One map for all tokens: look the k*n_tokens choices up as a flat list of rows.
            flat = o.reshape_2d(o.cont(selected), k * n_tokens, 1)
            ids = o.reshape_2d(o.get_rows(inp.slot_map[il], flat), k, n_tokens)  # slot per choice
        else:
            ids = selected

        slots = self.slots.tensors(il)  # ffn_gate/ffn_up: (n_embd, n_ff_exp, n_slots)
        x3 = o.reshape_3d(x, hp.n_embd, 1, n_tokens)
        gate = o.mul_mat_id(slots["ffn_gate"], x3, ids)  # (n_ff_exp, k, n_tokens)
        up = o.mul_mat_id(slots["ffn_up"], x3, ids)
        act = o.swiglu_split(gate, up)
        out = o.mul_mat_id(slots["ffn_down"], act, ids)  # (n_embd, k, n_tokens)
        out = o.mul(out, weights)
        # Sum the k weighted expert outputs: views of the (n_embd, k, n_tokens) tensor.
        row = ggml.row_size(GGMLType.F32, hp.n_embd)
        moe = None
        for j in range(k):
            part = o.view_2d(out, hp.n_embd, n_tokens, row * k, row * j)
            moe = part if moe is None else o.add(moe, part)

        if self.spec.shared_expert:
            shexp = self._ffn(o, x, w.get(M.FFN_GATE_SHEXP, il), w.get(M.FFN_UP_SHEXP, il),
                              w.get(M.FFN_DOWN_SHEXP, il))
            gate_w = o.sigmoid(o.mul_mat(w.get(M.FFN_GATE_INP_SHEXP, il), x))  # (1, n_tokens)
            moe = o.add(moe, o.mul(shexp, gate_w))
        return moe


def kq_mask(pos: np.ndarray, n_kv: int) -> np.ndarray:
    """Causal mask (n_tokens, n_kv) as float16: token t attends to cells 0..pos[t]."""
    cells = np.arange(n_kv)
    return np.where(cells[None, :] <= pos[:, None], 0.0, -np.inf).astype(np.float16)


def kv_cells_for(n_used: int, n_ctx: int) -> int:
    """How many KV cells a graph attends over: the used cells rounded up to KV_STEP."""
    return min(n_ctx, -(-n_used // KV_STEP) * KV_STEP)

