"""Synthetic MoE models of real shapes, written straight into quantized GGUF blocks, whose routers
route text the way trained models do.

A Qwen3-30B-A3B-shaped model is ~17 GB at Q4_K; writing a 61 GB bf16 checkpoint and quantizing it
would take hours on a small machine. Here experts are emitted as Q4_K (or Q8_0) blocks drawn from
a pool of random blocks with sane scales (values ~ N(0, 1/fan_in), mean ~0), dense matrices are
drawn as floats and quantized by ggml, and the result is a shard set (`edgemoe run` reads it) and
optionally the stock GGUF llama.cpp runs (`edgemoe export` of that set), byte-identical weights.

Routing on random weights is uniform and forgetful, the worst case for caches; trained models
reuse experts across neighbouring tokens. The design below gives the synthetic routers a known,
tunable locality while staying an ordinary model that llama.cpp computes the same way:
- two small subspaces of the residual stream: R (dims 0..r-1) holds a per-token random code from
  the embedding, C (dims r..2r-1) a context summary; nothing else writes into R or C (attention
  outputs and experts' down projections have zero rows there);
- layer 0's attention makes the summary: head 0 attends with a score that depends only on the
  distance to the past token (its queries and keys read one direction u shared by every
  embedding row, so after q/k RMS norms they are constant, and RoPE turns their product into
  A * sum_i cos(distance * theta_i) over the rope pairs i0..i1: near tokens weigh most, with a
  long tail), its values copy R, and its output projection writes them into C; every other
  head of layer 0 has zero queries (uniform attention);
- every layer's router reads R and C only: logits = s * (G_R code + kappa * G_C summary) with
  random G per layer, so layers choose different experts with the same temporal structure.
A token's experts thus mix its own preference (changes every token) with the recent context
(changes slowly): kappa and A were tuned (on the bundled model's held-out text with its
tokenizer) to Qwen3-30B-A3B's published reuse and LRU figures; `edgemoe.residency.traces`
measures them on the model itself.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from gguf import GGML_QUANT_VERSION, GGUFWriter  # noqa: E402

from converters import registry  # noqa: E402
from converters.arch.base import DENSE, EXPERT, F32  # noqa: E402
from converters.plan import Plan  # noqa: E402
from converters.tokenizer import add_tokenizer  # noqa: E402
from converters.writer import (OutFile, OutTensor, add_edgemoe_base_keys,  # noqa: E402
                               expert_out_file, write_shard_set)
from edgemoe import quant  # noqa: E402
from edgemoe.quant import GGMLType  # noqa: E402
from edgemoe.shardset import BASE_FILE, expert_file  # noqa: E402

TOKENIZER_DIR = _REPO / "models" / "edgemoe-tiny-shakespy"   # a trained byte-level BPE


@dataclass(frozen=True)
class RoutingDesign:
    code_dims: int = 64          # r: size of the token code R and of the context summary C
    context_weight: float = 8.0  # kappa: the summary's weight against the token's own code
    recency: float = 0.2         # A: attention score per rope pair at distance 0
    pairs: tuple[int, int] = (8, 44)   # rope pairs carrying the recency kernel (inclusive)
    shared: float = 8.0          # length of the direction u every embedding row has
    router_scale: float = 0.3    # s: overall size of the router logits


@dataclass(frozen=True)
class QuantSpec:
    arch: str                    # Hugging Face model_type: qwen3_moe or olmoe
    n_layer: int
    n_expert: int
    n_expert_used: int
    n_embd: int
    n_ff_exp: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    rope_theta: float = 1e6
    expert_type: str = "Q4_K"
    dense_type: str = "Q8_0"
    seed: int = 0
    routing: RoutingDesign = field(default_factory=RoutingDesign)

    def config(self) -> dict:
        """config.json as the hub spells it (the converter's hyper-parameter reader takes it)."""
        common = {"hidden_size": self.n_embd, "num_hidden_layers": self.n_layer,
                  "num_attention_heads": self.n_head, "num_key_value_heads": self.n_head_kv,
                  "head_dim": self.head_dim, "num_experts_per_tok": self.n_expert_used,
                  "num_experts": self.n_expert, "vocab_size": self.n_vocab,
                  "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                  "rope_theta": self.rope_theta, "tie_word_embeddings": False,
                  "hidden_act": "silu"}
        if self.arch == "qwen3_moe":
            return {**common, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                    "moe_intermediate_size": self.n_ff_exp, "intermediate_size": 6144,
                    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}
        if self.arch == "olmoe":
            return {**common, "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
                    "intermediate_size": self.n_ff_exp, "norm_topk_prob": False}
        raise ValueError(f"arch {self.arch!r}: expected qwen3_moe or olmoe")

    def expert_bytes(self) -> int:
        t = quant.parse_type(self.expert_type)
        return self.n_layer * self.n_expert * 3 * quant.nbytes(t, (self.n_ff_exp, self.n_embd))

    def dense_params(self) -> int:
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        return 2 * self.n_vocab * self.n_embd + self.n_layer * (2 * q + 2 * kv) * self.n_embd

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


# Public shapes (config.json of the hub checkpoints).
PRESETS = {
    "qwen3-30b-a3b": QuantSpec(arch="qwen3_moe", n_layer=48, n_expert=128, n_expert_used=8,
                               n_embd=2048, n_ff_exp=768, n_head=32, n_head_kv=4, head_dim=128,
                               n_vocab=151936, rope_theta=1e6),
    # OLMoE-1B-7B: no grouped-query attention; q/k norms over all heads.
    "olmoe-1b-7b": QuantSpec(arch="olmoe", n_layer=16, n_expert=64, n_expert_used=8,
                             n_embd=2048, n_ff_exp=1024, n_head=16, n_head_kv=16, head_dim=128,
                             n_vocab=50304, rope_theta=1e4),
}


# --- random blocks ------------------------------------------------------------------------------

_POOL_BLOCKS = (1 << 15) + 37    # distinct random blocks per pool (odd, so windows rarely align)
_Q_STD = math.sqrt((16 ** 2 - 1) / 12)   # std of a uniform 4-bit quant (0..15)


def _f16(x) -> np.ndarray:
    return np.asarray(x, dtype="<f2")


def q4_k_blocks(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """n random Q4_K super-blocks (256 values each, 144 bytes) whose values are ~N(0, std^2)-sized
    with mean ~0: value = d*sc*q - dmin*m with q uniform in 0..15, sub-block scales sc in 40..63
    and mins m chosen so that each sub-block's mean is ~0 (the layout is ggml's block_q4_K)."""
    sc = rng.integers(40, 64, (n, 8))
    d = std / (sc.mean(axis=1) * _Q_STD)                     # (n,)
    dmin = 7.5 * d                                           # with m = sc: d*sc*(q - 7.5)
    m = sc
    scales = np.zeros((n, 12), dtype=np.uint8)
    for j in range(4):
        scales[:, j] = (sc[:, j] & 63) | ((sc[:, j + 4] >> 4) << 6)
        scales[:, j + 4] = (m[:, j] & 63) | ((m[:, j + 4] >> 4) << 6)
        scales[:, j + 8] = (sc[:, j + 4] & 0xF) | ((m[:, j + 4] & 0xF) << 4)
    out = np.empty((n, 144), dtype=np.uint8)
    out[:, 0:2] = _f16(d).view(np.uint8).reshape(n, 2)
    out[:, 2:4] = _f16(dmin).view(np.uint8).reshape(n, 2)
    out[:, 4:16] = scales
    out[:, 16:] = rng.integers(0, 256, (n, 128), dtype=np.uint8)
    return out


def q8_0_blocks(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """n random Q8_0 blocks (32 values, 34 bytes): value = d*q, q ~ N(0, 42^2) clipped to int8."""
    q = np.clip(np.rint(rng.standard_normal((n, 32)) * 42), -127, 127).astype(np.int8)
    out = np.empty((n, 34), dtype=np.uint8)
    out[:, 0:2] = _f16(np.full(n, std / 42)).view(np.uint8).reshape(n, 2)
    out[:, 2:] = q.view(np.uint8)
    return out


_BLOCKS = {GGMLType.Q4_K: q4_k_blocks, GGMLType.Q8_0: q8_0_blocks}


class _BlockPool:
    """Random blocks of one type and scale; a tensor is a run of windows at random offsets."""

    def __init__(self, t: GGMLType, std: float, rng: np.random.Generator):
        if t not in _BLOCKS:
            raise ValueError(f"expert type {t.name}: synthetic blocks exist for "
                             f"{', '.join(k.name for k in _BLOCKS)}")
        self.t, self.rng = t, rng
        self.blocks = _BLOCKS[t](rng, _POOL_BLOCKS, std)
        self.block_bytes = self.blocks.shape[1]

    def rows(self, n_rows: int, n_cols: int, zero_rows: int = 0) -> Iterator[bytes]:
        """Bytes of an (n_rows, n_cols) tensor; its first `zero_rows` rows are exactly zero."""
        per_row = n_cols // quant.block_size(self.t)
        if zero_rows:
            zero = np.zeros((zero_rows * per_row, self.block_bytes), dtype=np.uint8)
            yield zero.tobytes()
        left = (n_rows - zero_rows) * per_row
        while left:
            k = min(left, _POOL_BLOCKS // 2)
            off = int(self.rng.integers(0, _POOL_BLOCKS - k + 1))
            yield self.blocks[off:off + k].tobytes()
            left -= k


# --- the design: dense tensors as floats --------------------------------------------------------

_FLOAT_POOL = (1 << 22) + 4099


class _Design:
    """Every non-expert tensor of a QuantSpec, row block by row block, as float32."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        d = spec.routing
        H, r = spec.n_embd, d.code_dims
        if 2 * r + 1 > H or d.pairs[1] >= spec.head_dim // 2 or d.pairs[0] > d.pairs[1]:
            raise ValueError("routing design does not fit the model's dimensions")
        self.r = r
        self.normals = np.random.default_rng([spec.seed, 1]).standard_normal(
            _FLOAT_POOL, dtype=np.float32)
        self.rng = np.random.default_rng([spec.seed, 2])
        u = np.random.default_rng([spec.seed, 3]).standard_normal(H).astype(np.float32)
        u[:2 * r] = 0.0
        self.u = u / np.linalg.norm(u)
        self.pair_dims = np.arange(d.pairs[0], d.pairs[1] + 1)

    def random(self, rows: int, cols: int, std: float) -> np.ndarray:
        """(rows, cols) N(0, std^2) values: a window at a random offset into the pool of draws
        (rows * cols <= half the pool)."""
        k = rows * cols
        off = int(self.rng.integers(0, _FLOAT_POOL - k + 1))
        return (self.normals[off:off + k] * np.float32(std)).reshape(rows, cols)

    def token_code(self) -> np.ndarray:
        """(n_vocab, r) every token's routing code (the embedding's R dims)."""
        return np.random.default_rng([self.spec.seed, 4]).standard_normal(
            (self.spec.n_vocab, self.r)).astype(np.float32)

    def router(self, layer: int) -> np.ndarray:
        """(n_expert, n_embd) float32: reads R and C only."""
        s, d = self.spec, self.spec.routing
        rng = np.random.default_rng([s.seed, 100 + layer])
        w = np.zeros((s.n_expert, s.n_embd), dtype=np.float32)
        w[:, :self.r] = rng.standard_normal((s.n_expert, self.r)) * d.router_scale
        w[:, self.r:2 * self.r] = (rng.standard_normal((s.n_expert, self.r))
                                   * d.router_scale * d.context_weight)
        return w

    def qk_norm_gain(self, n_norm_q: int, n_norm_k: int) -> float:
        """Gain g on the recency pairs of the q and k norms so that q.k/sqrt(head_dim) = A per
        pair: the norms scale m equal entries to sqrt(N/m) each."""
        d, m = self.spec.routing, len(self.pair_dims)
        return math.sqrt(d.recency * math.sqrt(self.spec.head_dim) * m
                         / math.sqrt(n_norm_q * n_norm_k))

    def rows(self, name: str, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
        """float32 row blocks of the tensor `name` (GGUF name) of numpy `shape`."""
        s = self.spec
        H, r = s.n_embd, self.r
        parts = name.split(".")
        layer = int(parts[1]) if parts[0] == "blk" else None
        kind = parts[2] if layer is not None else parts[0]
        if len(shape) == 1:
            yield self._vector(kind, layer, shape[0])
            return
        n_rows, n_cols = shape
        if kind == "ffn_gate_inp":
            yield self.router(layer)
            return
        if kind == "token_embd":
            code = self.token_code()
            step = max(1, (_FLOAT_POOL // 2) // n_cols)
            for r0 in range(0, n_rows, step):
                k = min(step, n_rows - r0)
                x = self.random(k, n_cols, 1.0).copy()
                x[:, :r] = code[r0:r0 + k]
                x[:, r:2 * r] = 0.0
                x += s.routing.shared * self.u            # u is zero on R and C
                yield x
            return
        std = n_cols ** -0.5
        step = max(1, (_FLOAT_POOL // 2) // n_cols)
        for r0 in range(0, n_rows, step):
            k = min(step, n_rows - r0)
            x = self.random(k, n_cols, std).copy()
            self._shape_rows(kind, layer, r0, x)
            yield x

    def _shape_rows(self, kind: str, layer: int | None, r0: int, x: np.ndarray) -> None:
        """Impose the design on rows r0.. of a random block x (in place)."""
        s, r = self.spec, self.r
        rows = np.arange(r0, r0 + x.shape[0])
        if kind == "attn_output":
            x[rows < 2 * r] = 0.0                          # nothing else writes R or C
            if layer == 0:
                c = np.nonzero((rows >= r) & (rows < 2 * r))[0]
                x[c, :] = 0.0
                x[c, rows[c] - r] = 1.0                    # C_j <- head 0's output dim j
        if layer != 0:
            return
        hd = s.head_dim
        if kind == "attn_q":                               # head 0: u on the recency pairs
            x[:] = 0.0
            for i, row in enumerate(rows):
                if row < hd and row in self.pair_dims:
                    x[i] = self.u
        elif kind == "attn_k":                             # kv head 0: the same
            head0 = rows < hd
            x[head0] = 0.0
            for i, row in enumerate(rows):
                if row < hd and row in self.pair_dims:
                    x[i] = self.u
        elif kind == "attn_v":                             # kv head 0 dims 0..r-1 copy R
            for i, row in enumerate(rows):
                if row < r:
                    x[i] = 0.0
                    x[i, row] = 1.0

    def _vector(self, kind: str, layer: int | None, n: int) -> np.ndarray:
        s = self.spec
        v = np.ones(n, dtype=np.float32)
        if layer == 0 and kind in ("attn_q_norm", "attn_k_norm"):
            if s.arch == "olmoe":      # one norm over all heads
                g = self.qk_norm_gain(s.n_head * s.head_dim, s.n_head_kv * s.head_dim)
            else:                      # per head
                g = self.qk_norm_gain(s.head_dim, s.head_dim)
            v[self.pair_dims] = g
        return v[None, :]


def _dense_chunks(design: _Design, name: str, shape, t: GGMLType) -> Iterator[np.ndarray]:
    for x in design.rows(name, shape):
        yield quant.quantize(x, t)


def plan_synthetic(spec: QuantSpec, tokenizer_dir: Path) -> Plan:
    """A conversion plan (what `edgemoe convert` writes) whose tensors come from the design."""
    config = spec.config()
    arch = registry.for_hf(config["architectures"])
    hp = arch.hparams(config)
    e_type, d_type = quant.parse_type(spec.expert_type), quant.parse_type(spec.dense_type)
    design = _Design(spec)
    rng = np.random.default_rng([spec.seed, 5])
    pools: dict[int, _BlockPool] = {}

    def expert_pool(fan_in: int) -> _BlockPool:
        if fan_in not in pools:
            pools[fan_in] = _BlockPool(e_type, fan_in ** -0.5, rng)
        return pools[fan_in]

    zero_rows = 2 * design.r
    base_tensors, expert_tensors = [], {}
    for s in arch.tensor_specs(hp):
        shape = s.written_shape
        if s.kind == EXPERT:
            n_rows, n_cols = shape
            # ffn_down's rows are output dims: R and C stay untouched by experts.
            zr = zero_rows if s.proj == "ffn_down" else 0
            out = OutTensor(name=s.gguf_name, shape=shape, type=e_type,
                            nbytes=quant.nbytes(e_type, shape),
                            chunks=lambda n_rows=n_rows, n_cols=n_cols, zr=zr:
                            expert_pool(n_cols).rows(n_rows, n_cols, zr))
            expert_tensors.setdefault((s.layer, s.expert), []).append(out)
            continue
        t = GGMLType.F32 if s.kind == F32 else d_type
        used, _ = quant.choose_type(t, shape[-1])
        base_tensors.append(OutTensor(
            name=s.gguf_name, shape=shape, type=used, nbytes=quant.nbytes(used, shape),
            chunks=lambda name=s.gguf_name, shape=shape, used=used:
            _dense_chunks(design, name, shape, used)))

    def base_metadata(w: GGUFWriter) -> None:
        w.add_name(f"synthetic {spec.arch} {spec.n_layer}x{spec.n_expert} top-{spec.n_expert_used}")
        arch.add_metadata(w, hp)
        w.add_quantization_version(GGML_QUANT_VERSION)
        add_tokenizer(w, tokenizer_dir)
        add_edgemoe_base_keys(w, e_type.name, d_type.name, hp.expert_layers)
        w.add_string("edgemoe.synthetic", json.dumps(asdict(spec)))

    experts = tuple(expert_out_file(expert_file(l, e), l, e, ts)
                    for (l, e), ts in sorted(expert_tensors.items()))
    base = OutFile(rel=BASE_FILE, arch=arch.name, metadata=base_metadata,
                   tensors=tuple(base_tensors))
    return Plan(source={"kind": "synthetic", "path": None, "hf_architecture": None,
                        "experts_key": _experts_key(spec)},
                arch=arch.name, hp=hp, expert_type=e_type.name, dense_type=d_type.name,
                base=base, experts=experts, fallbacks=(), fingerprint=spec.fingerprint())


def _experts_key(spec: QuantSpec) -> str:
    """What the expert shards depend on (not the routing design, which lives in base.gguf)."""
    d = asdict(spec)
    d["routing"] = {"code_dims": spec.routing.code_dims}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _rewrite_base(plan: Plan, out: Path, spec: QuantSpec) -> bool:
    """When `out` holds this spec's experts already, write only base.gguf (a new routing design)
    and update the manifest. False when the experts differ (a full write is needed)."""
    from converters.writer import base_entry, write_gguf, write_json_atomic
    from edgemoe.shardset import MANIFEST_FILE, seal_manifest

    path = out / MANIFEST_FILE
    if not path.is_file():
        return False
    manifest = json.loads(path.read_text())
    if (manifest.get("source") or {}).get("experts_key") != _experts_key(spec):
        return False
    path.unlink()       # the set is incomplete until the new manifest is written
    rec = write_gguf(out / plan.base.rel, plan.base)
    manifest["base"] = base_entry(rec)
    manifest["fingerprint"] = plan.fingerprint
    write_json_atomic(path, seal_manifest(manifest))
    return True


def write_synthetic(spec: QuantSpec, out: Path, gguf: Path | None = None,
                    tokenizer_dir: Path = TOKENIZER_DIR, progress: bool = False,
                    force: bool = False, reuse_experts: bool = False) -> Path:
    """Write the shard set `out` and, if asked, the stock GGUF `gguf` (same bytes).
    reuse_experts: when `out` already holds this shape's experts, rewrite base.gguf only."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / f, tok / f)
        if (tokenizer_dir / "chat_template.jinja").exists():
            shutil.copy(tokenizer_dir / "chat_template.jinja", tok / "chat_template.jinja")
        (tok / "config.json").write_text(json.dumps({"vocab_size": spec.n_vocab}))
        plan = plan_synthetic(spec, tok)
        if not (reuse_experts and _rewrite_base(plan, Path(out), spec)):
            write_shard_set(plan, out, force=force, progress=progress)
    if gguf is not None:
        from converters.exporter import export_gguf

        export_gguf(out, gguf, progress=progress)
    return out


def preset(name: str, **changes) -> QuantSpec:
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: expected one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **changes)
