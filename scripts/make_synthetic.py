#!/usr/bin/env python3
"""Write a large synthetic Hugging Face MoE checkpoint with random weights, using numpy only.

    python scripts/make_synthetic.py OUT --size 2GB                 # qwen3_moe, bf16, dims picked
    python scripts/make_synthetic.py OUT --layers 16 --experts 32 --top-k 4 --hidden 1024 --ffn 512
    python scripts/make_synthetic.py OUT --arch mixtral --size 1GB --dtype f32
    python scripts/make_synthetic.py OUT --experts-size 1GB --expert-type Q4_K  # runtime benchmarks
    python scripts/make_synthetic.py OUT --preset qwen3-30b-a3b --gguf OUT.gguf   # a real shape

With --preset (qwen3-30b-a3b, olmoe-1b-7b) the output is not a checkpoint but a shard set written
straight into --expert-type blocks (Q4_K or Q8_0; dense matrices Q8_0), plus with --gguf the same
weights as one stock GGUF for llama.cpp, and the routers route text with the locality of trained
models (scripts/synthetic_gguf.py says how). --layers/--experts/... override the preset's shape.

The output is what `save_pretrained` plus a tokenizer would leave for that architecture, under the
hub's names and shapes: config.json (hub spelling), model-0000i-of-0000n.safetensors with
model.safetensors.index.json, generation_config.json, and a small tokenizer (byte-level BPE for
qwen3_moe, SentencePiece-style for mixtral; tests/tiny_tokenizers.py). The tokenizer has a few
hundred entries; the model's vocabulary is larger (as real checkpoints pad theirs) and the
converter fills the unused ids.

Tensors are streamed to disk as windows into small pools of random draws (one per scale), so a
multi-GB checkpoint needs well under 200 MB of RAM and is written at disk speed (2.15 GiB in
4.7 s here, peak RSS 162 MB). Scales are sane for a forward pass: projections ~ N(0, 1/fan_in),
norms 1, router logits ~ N(0, router_scale^2). Random weights route tokens almost uniformly with little
temporal locality, the worst case for expert caches; `--routing-skew` gives experts lasting,
unequal popularity instead.

`--size` picks hidden and expert-FFN widths (multiples of 256, so Q4_K/Q6_K rows fit their
blocks) for the smallest checkpoint of at least that size, keeping any dimension given explicitly.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_emulate import fmt_bytes, parse_size  # noqa: E402
import synthetic_gguf  # noqa: E402
from edgemoe.errors import ConvertError  # noqa: E402

_REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ArchLayout:
    """Where an architecture keeps its MoE block under the hub's tensor names."""

    hf_class: str
    moe: str                          # module holding router and experts
    expert_names: tuple[str, str, str]  # (gate, up, down) projections of one expert
    qk_norm: bool                     # per-head RMSNorm on q and k (Qwen3)
    tokenizer: str                    # "bpe" or "spm", as checkpoints of this family ship


ARCHS = {
    "qwen3_moe": ArchLayout("Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                            qk_norm=True, tokenizer="bpe"),
    "mixtral": ArchLayout("MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"),
                          qk_norm=False, tokenizer="spm"),
}

DTYPES = {"bf16": ("BF16", 2, "bfloat16"), "f16": ("F16", 2, "float16"),
          "f32": ("F32", 4, "float32")}
HEAD_DIM = 64
_EMBD_MEAN = 0.5  # with routing skew: size of the shared embedding direction, per unit of std
ROW_ALIGN = 256  # widths are multiples of the K-quant super-block


@dataclass(frozen=True)
class SynthSpec:
    arch: str = "qwen3_moe"
    n_layer: int = 16
    n_expert: int = 32
    n_expert_used: int = 4
    n_embd: int = 1024
    n_ff_exp: int = 512
    n_vocab: int = 32000
    dtype: str = "bf16"
    seed: int = 0
    router_scale: float = 1.0
    routing_skew: float = 0.0  # std of each expert's lasting router-logit offset (popularity)

    @property
    def n_head(self) -> int:
        return self.n_embd // HEAD_DIM

    @property
    def n_head_kv(self) -> int:
        return max(1, self.n_head // 4)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r}: expected one of {', '.join(ARCHS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.n_embd % HEAD_DIM or self.n_head % self.n_head_kv:
            raise ValueError(f"hidden {self.n_embd}: must be a multiple of the head size {HEAD_DIM}")
        if not 1 <= self.n_expert_used <= self.n_expert:
            raise ValueError(f"top-k {self.n_expert_used} must be in 1..experts ({self.n_expert})")
        if min(self.n_layer, self.n_ff_exp, self.n_vocab) < 1:
            raise ValueError("layers, ffn and vocab must be positive")

    def tensors(self) -> list[tuple[str, tuple[int, ...], float]]:
        """(hub name, shape as torch writes it (out, in), std; 0 std means ones), in file order."""
        lay = ARCHS[self.arch]
        H, F, hd = self.n_embd, self.n_ff_exp, HEAD_DIM
        q, kv = self.n_head * hd, self.n_head_kv * hd
        out = [("model.embed_tokens.weight", (self.n_vocab, H), 1.0)]
        for il in range(self.n_layer):
            p = f"model.layers.{il}"
            out += [(f"{p}.input_layernorm.weight", (H,), 0.0),
                    (f"{p}.self_attn.q_proj.weight", (q, H), H ** -0.5),
                    (f"{p}.self_attn.k_proj.weight", (kv, H), H ** -0.5),
                    (f"{p}.self_attn.v_proj.weight", (kv, H), H ** -0.5),
                    (f"{p}.self_attn.o_proj.weight", (H, q), q ** -0.5)]
            if lay.qk_norm:
                out += [(f"{p}.self_attn.q_norm.weight", (hd,), 0.0),
                        (f"{p}.self_attn.k_norm.weight", (hd,), 0.0)]
            out += [(f"{p}.post_attention_layernorm.weight", (H,), 0.0),
                    (f"{p}.{lay.moe}.gate.weight", (self.n_expert, H), self.router_scale * H ** -0.5)]
            gate, up, down = lay.expert_names
            for e in range(self.n_expert):
                x = f"{p}.{lay.moe}.experts.{e}"
                out += [(f"{x}.{gate}.weight", (F, H), H ** -0.5),
                        (f"{x}.{up}.weight", (F, H), H ** -0.5),
                        (f"{x}.{down}.weight", (H, F), F ** -0.5)]
        out += [("model.norm.weight", (H,), 0.0),
                ("lm_head.weight", (self.n_vocab, H), H ** -0.5)]
        return out

    def shift(self, name: str) -> np.ndarray | None:
        """What to add to tensor `name`'s random values, if anything.

        With routing_skew > 0 experts get lasting popularity, as trained MoE models have (random
        routers alone pick experts almost uniformly): every token embedding shares a direction
        u, and each router row leans on u, offsetting expert e's logit at the embedding by
        routing_skew * N(0, 1) for every token. The shared direction also passes through
        attention, which adds further lasting per-expert offsets. Measured (4 layers, 32
        experts top-4, 256 random tokens): the 8 most chosen experts take 31-53% of selections
        without skew, 66-78% at 0.5, 73-83% at 1.0."""
        if self.routing_skew == 0.0:
            return None
        H = self.n_embd
        u = np.random.default_rng([self.seed, 1]).standard_normal(H).astype(np.float32)
        u /= np.linalg.norm(u)
        if name == "model.embed_tokens.weight":
            return np.float32(_EMBD_MEAN * math.sqrt(H)) * u  # (H,), added to every row
        m = re.fullmatch(rf"model\.layers\.(\d+)\.{ARCHS[self.arch].moe}\.gate\.weight", name)
        if m is None:
            return None
        offsets = self.routing_skew * np.random.default_rng(
            [self.seed, 2, int(m[1])]).standard_normal(self.n_expert)  # (n_expert,)
        along_u = _EMBD_MEAN / math.sqrt(1 + _EMBD_MEAN ** 2) * math.sqrt(H)  # x.u after RMSNorm
        return np.outer(offsets / along_u, u).astype(np.float32)  # (n_expert, H)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    def nbytes(self) -> int:
        return sum(math.prod(s) for _, s, _ in self.tensors()) * self.itemsize

    def expert_nbytes(self, ggml_type: str | None = None) -> int:
        """Bytes of all routed experts: as stored here, or once quantized to `ggml_type`."""
        n = self.n_layer * self.n_expert * 3 * self.n_embd * self.n_ff_exp
        if ggml_type is None:
            return n * self.itemsize
        import gguf  # sizes of ggml's block types, from gguf-py

        try:
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type.upper()]]
        except KeyError:
            raise ValueError(f"unknown ggml type {ggml_type!r}") from None
        return n // block * block_bytes

    def largest_tensor_nbytes(self) -> int:
        return max(math.prod(s) for _, s, _ in self.tensors()) * self.itemsize

    def config(self, bos_id: int | None, eos_id: int | None) -> dict:
        """config.json as the hub ships it for this architecture."""
        common = {
            "architectures": [ARCHS[self.arch].hf_class], "model_type": self.arch,
            "hidden_size": self.n_embd, "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head, "num_key_value_heads": self.n_head_kv,
            "head_dim": HEAD_DIM, "num_experts_per_tok": self.n_expert_used,
            "vocab_size": self.n_vocab, "hidden_act": "silu", "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "initializer_range": 0.02,
            "tie_word_embeddings": False, "attention_dropout": 0.0, "use_cache": True,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "sliding_window": None,
            "output_router_logits": False, "router_aux_loss_coef": 0.001,
            "torch_dtype": DTYPES[self.dtype][2],
        }
        if self.arch == "qwen3_moe":
            return {**common, "num_experts": self.n_expert, "moe_intermediate_size": self.n_ff_exp,
                    "intermediate_size": 3 * self.n_ff_exp, "decoder_sparse_step": 1,
                    "mlp_only_layers": [], "norm_topk_prob": True, "attention_bias": False,
                    "use_sliding_window": False, "max_window_layers": self.n_layer,
                    "rope_scaling": None}
        return {**common, "num_local_experts": self.n_expert, "intermediate_size": self.n_ff_exp,
                "router_jitter_noise": 0.0}


def plan(target_bytes: int, base: SynthSpec, fixed: set[str],
         measure=SynthSpec.nbytes) -> SynthSpec:
    """The smallest checkpoint whose `measure` (default: its bytes) is at least `target_bytes`,
    varying n_embd and n_ff_exp over multiples of 256 (those not in `fixed`) with
    1/4 <= n_ff_exp/n_embd <= 2, as MoE models have."""
    hiddens = [base.n_embd] if "n_embd" in fixed else range(512, 8192 + 1, ROW_ALIGN)
    best = None
    for h in hiddens:
        ffns = [base.n_ff_exp] if "n_ff_exp" in fixed else range(
            max(ROW_ALIGN, h // 4 // ROW_ALIGN * ROW_ALIGN), 2 * h + 1, ROW_ALIGN)
        for f in ffns:
            spec = replace(base, n_embd=h, n_ff_exp=f)
            size = measure(spec)
            if size >= target_bytes and (best is None or size < best[0]):
                best = (size, spec)
                break  # larger f only grows the size
    if best is None:
        raise ValueError(f"no dimensions reach {fmt_bytes(target_bytes)} with the fixed ones "
                         f"({', '.join(sorted(fixed)) or 'none'}); add layers or experts")
    return best[1]


# --- writing ---------------------------------------------------------------------------------

# Drawing 1e9 fresh normals takes about a minute on these machines, so each tensor is written as
# windows at random offsets into a pool of draws per scale (encoded once). Two tensors share rows
# only when their offsets differ by a multiple of the row length (about one pair in n_embd, then
# shifted by some rows): no matter for what these checkpoints measure (bytes, speed, memory,
# routing), and the values are still N(0, std^2).
_POOL_LEN = (1 << 22) + 4099


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the little-endian array the safetensors file stores."""
    if dtype == "f32":
        return x.astype("<f4")
    if dtype == "f16":
        return x.astype("<f2")
    # bfloat16: the top half of the float32 bits, rounded to nearest even.
    u = x.astype("<f4").view("<u4")
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


class _Pools:
    def __init__(self, rng: np.random.Generator, dtype: str):
        self.rng, self.dtype = rng, dtype
        self.encoded: dict[float, np.ndarray] = {}
        self.raw: dict[float, np.ndarray] = {}  # float32 draws, kept only where a shift is added

    def _draw(self, std: float) -> np.ndarray:
        return (np.ones(_POOL_LEN, np.float32) if std == 0.0
                else self.rng.standard_normal(_POOL_LEN, np.float32) * np.float32(std))

    def write(self, f, shape: tuple[int, ...], std: float, shift: np.ndarray | None = None) -> None:
        """Write one tensor of N(0, std^2) values (all ones when std is 0, as for norms), plus
        `shift` (broadcast over rows) when given."""
        if shift is None:
            if std not in self.encoded:
                self.encoded[std] = _encode(self._draw(std), self.dtype)
            pool, left = self.encoded[std], math.prod(shape)
            while left:
                k = min(left, _POOL_LEN // 2)
                off = int(self.rng.integers(0, _POOL_LEN - k + 1))
                f.write(memoryview(pool[off:off + k]))
                left -= k
            return
        if std not in self.raw:
            self.raw[std] = self._draw(std)
        rows, cols = shape[0], math.prod(shape[1:])
        step = max(1, _POOL_LEN // 2 // cols)
        for r0 in range(0, rows, step):
            r = min(step, rows - r0)
            off = int(self.rng.integers(0, _POOL_LEN - r * cols + 1))
            x = self.raw[std][off:off + r * cols].reshape(r, cols)
            x = x + (shift[r0:r0 + r] if shift.ndim == 2 else shift)  # (r, cols)
            f.write(memoryview(_encode(x, self.dtype)))


def _shard_plan(spec: SynthSpec, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], float]]]:
    shards: list[list] = [[]]
    size = 0
    for t in spec.tensors():
        nbytes = math.prod(t[1]) * spec.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _header(tensors, spec: SynthSpec) -> bytes:
    st_dtype = DTYPES[spec.dtype][0]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        n = math.prod(shape) * spec.itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-aligned, as the safetensors writer pads it
    return struct.pack("<Q", len(raw)) + raw


def _tokenizer(out: Path, kind: str) -> tuple[int | None, int | None, int]:
    """Write the tokenizer files; (bos id, eos id, its vocabulary size)."""
    sys.path.insert(0, str(_REPO / "tests"))
    sys.path.insert(0, str(_REPO))
    try:
        from tiny_tokenizers import make_bpe_tokenizer, make_spm_tokenizer
    except ImportError as exc:
        raise SystemExit(f"make_synthetic: cannot build the tokenizer: tests/tiny_tokenizers.py "
                         f"needs the 'tokenizers' package and the repository's converters ({exc})")
    tok = (make_bpe_tokenizer if kind == "bpe" else make_spm_tokenizer)(out)
    return tok.bos_id, tok.eos_id, tok.vocab_size


def make_synthetic(out: str | Path, spec: SynthSpec, shard_bytes: int = 1 << 30,
                   progress: bool = False) -> Path:
    """Write the checkpoint into `out` (created; must be empty or absent). Returns `out`."""
    spec.validate()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    bos, eos, tok_vocab = _tokenizer(out, ARCHS[spec.arch].tokenizer)
    if spec.n_vocab < tok_vocab:
        raise ValueError(f"vocab {spec.n_vocab} is smaller than the tokenizer's {tok_vocab}")
    pools = _Pools(np.random.default_rng(spec.seed), spec.dtype)
    shards = _shard_plan(spec, shard_bytes)
    weight_map = {}
    total = spec.nbytes()
    done = 0
    t0 = time.monotonic()
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tmp = out / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_header(tensors, spec))
            for tname, shape, std in tensors:
                pools.write(f, shape, std, spec.shift(tname))
                weight_map[tname] = name
                done += math.prod(shape) * spec.itemsize
                if progress:
                    rate = done / max(time.monotonic() - t0, 1e-9) / 1e6
                    print(f"\r{name}: {fmt_bytes(done)} / {fmt_bytes(total)} ({rate:.0f} MB/s)",
                          end="", file=sys.stderr, flush=True)
        os.replace(tmp, out / name)
    if progress:
        print(file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, indent=2) + "\n")
    # config.json last: a directory without it is visibly unfinished.
    (out / "config.json").write_text(json.dumps(spec.config(bos, eos), indent=2) + "\n")
    return out


def _main_preset(args, given: dict) -> int:
    try:
        spec = synthetic_gguf.preset(args.preset, seed=args.seed, expert_type=args.expert_type.upper(),
                                     **given)
    except (TypeError, ValueError) as exc:
        print(f"make_synthetic: {exc}", file=sys.stderr)
        return 2
    n_dense = spec.dense_params()
    print(f"{args.preset}: {spec.arch}, {spec.n_layer} layers, {spec.n_expert} experts top-"
          f"{spec.n_expert_used}, hidden {spec.n_embd}, expert ffn {spec.n_ff_exp}, heads "
          f"{spec.n_head}/{spec.n_head_kv} x {spec.head_dim}, vocab {spec.n_vocab}; experts "
          f"{fmt_bytes(spec.expert_bytes())} as {spec.expert_type}, {n_dense / 1e9:.2f}e9 dense "
          f"weights as {spec.dense_type}")
    if args.dry_run:
        return 0
    out = Path(args.out)
    try:
        synthetic_gguf.write_synthetic(spec, out, args.gguf, progress=sys.stderr.isatty(),
                                       force=args.force, reuse_experts=args.reuse_experts)
    except (ConvertError, ValueError, OSError) as exc:  # disk full, a non-empty OUT, bad shapes
        print(f"make_synthetic: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}" + (f" and {args.gguf}" if args.gguf else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    d = SynthSpec()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output directory (created; must be empty)")
    ap.add_argument("--arch", default=d.arch, choices=sorted(ARCHS))
    ap.add_argument("--size", help="target checkpoint size (e.g. 2GB); picks hidden/ffn widths")
    ap.add_argument("--experts-size", metavar="SIZE",
                    help="instead of --size: bytes the routed experts should take once quantized "
                    "to --expert-type (e.g. 1GB)")
    ap.add_argument("--expert-type", default="Q4_K", help="ggml type --experts-size refers to")
    ap.add_argument("--layers", type=int, dest="n_layer")
    ap.add_argument("--experts", type=int, dest="n_expert")
    ap.add_argument("--top-k", type=int, dest="n_expert_used")
    ap.add_argument("--hidden", type=int, dest="n_embd")
    ap.add_argument("--ffn", type=int, dest="n_ff_exp", help="expert FFN width")
    ap.add_argument("--vocab", type=int, dest="n_vocab")
    ap.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--router-scale", type=float, default=d.router_scale,
                    help="std of the router logits (higher: more peaked routing)")
    ap.add_argument("--routing-skew", type=float, default=d.routing_skew,
                    help="std of a lasting per-expert router-logit offset, giving experts "
                    "unequal popularity as trained models have (e.g. 0.5; default 0: none)")
    ap.add_argument("--shard-size", default="1GiB", help="safetensors file size limit")
    ap.add_argument("--preset", choices=sorted(synthetic_gguf.PRESETS),
                    help="a public model's shape, written as a quantized shard set (see above)")
    ap.add_argument("--gguf", type=Path, metavar="FILE",
                    help="with --preset: also write the stock GGUF llama.cpp runs")
    ap.add_argument("--reuse-experts", action="store_true",
                    help="with --preset: when OUT holds this shape's experts, rewrite only "
                    "base.gguf (the routers and attention: a new routing design) and the GGUF")
    ap.add_argument("--force", action="store_true", help="replace an existing OUT")
    ap.add_argument("--dry-run", action="store_true", help="print the dimensions, write nothing")
    args = ap.parse_args(argv)
    dims = ("n_layer", "n_expert", "n_expert_used", "n_embd", "n_ff_exp", "n_vocab")
    given = {k: getattr(args, k) for k in dims if getattr(args, k) is not None}
    if args.preset:
        return _main_preset(args, given)
    spec = replace(d, arch=args.arch, dtype=args.dtype, seed=args.seed,
                   router_scale=args.router_scale, routing_skew=args.routing_skew, **given)
    try:
        spec.validate()
        if args.size and args.experts_size:
            raise ValueError("give --size or --experts-size, not both")
        if args.size:
            spec = plan(parse_size(args.size), spec, set(given))
        elif args.experts_size:
            spec = plan(parse_size(args.experts_size), spec, set(given),
                        measure=lambda s: s.expert_nbytes(args.expert_type))
    except ValueError as exc:
        print(f"make_synthetic: {exc}", file=sys.stderr)
        return 2
    print(f"{spec.arch} {spec.dtype}: {spec.n_layer} layers, {spec.n_expert} experts top-"
          f"{spec.n_expert_used}, hidden {spec.n_embd}, expert ffn {spec.n_ff_exp}, vocab "
          f"{spec.n_vocab}, heads {spec.n_head}/{spec.n_head_kv}; {fmt_bytes(spec.nbytes())} "
          f"({fmt_bytes(spec.expert_nbytes())} in experts, {fmt_bytes(spec.expert_nbytes(args.expert_type))} "
          f"as {args.expert_type.upper()}; largest tensor {fmt_bytes(spec.largest_tensor_nbytes())})")
    if args.dry_run:
        return 0
    out = Path(args.out)
    if args.force and out.exists():
        shutil.rmtree(out)
    try:
        make_synthetic(out, spec, parse_size(args.shard_size), progress=sys.stderr.isatty())
    except (FileExistsError, ValueError) as exc:
        print(f"make_synthetic: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
