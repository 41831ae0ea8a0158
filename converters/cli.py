"""`edgemoe convert`, `edgemoe export` and `edgemoe verify`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _convert(args: argparse.Namespace) -> int:
    from converters import convert

    if Path(args.src).is_file() and (args.expert_type or args.dense_type):
        print("edgemoe convert: note: a GGUF source keeps its tensor types; --expert-type and "
              "--dense-type apply to safetensors checkpoints only", file=sys.stderr)
    plan = convert(args.src, args.out, expert_type=args.expert_type or "Q4_K",
                   dense_type=args.dense_type or "Q8_0",
                   dry_run=args.dry_run, resume=args.resume, force=args.force,
                   progress=not args.quiet, substitute_type=args.substitute_type)
    if args.dry_run:
        print(plan.table())
        print("dry run: nothing written")
    else:
        subs = (f" + {len(plan.substitutes)} {plan.substitute_type} substitutes"
                if plan.substitutes else "")
        print(f"{args.out}: {plan.arch}, base + {len(plan.experts)} expert shards{subs}, "
              f"{plan.total_bytes / 1e6:.1f} MB of tensors"
              + (f", {len(plan.fallbacks)} fallback type(s)" if plan.fallbacks else ""))
    return 0


def _export(args: argparse.Namespace) -> int:
    from converters import export

    out = export(args.shards, args.out, progress=not args.quiet)
    print(f"{out}: {Path(out).stat().st_size / 1e6:.1f} MB")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from edgemoe.shardset import ShardSet

    from edgemoe import arch as arch_registry
    from edgemoe.gguf_header import GGUFHeader

    ss = ShardSet.open(args.shards)
    ss.verify()
    # the manifest and base.gguf describe the same model
    header = GGUFHeader(ss.base_path)
    ss.check_base_header(header)
    model = arch_registry.get(ss.arch)
    ss.check_match(model.hparams_class.from_gguf(header, model, ss.base_path))
    n = len(list(ss.experts()))
    print(f"{args.shards}: OK ({ss.arch}, base + {n} expert shards, every sha256 matches)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="MoE checkpoint -> per-expert quantized GGUF shard set",
        description="Convert a Hugging Face MoE checkpoint directory (config.json, *.safetensors, "
        "tokenizer) or a stock llama.cpp GGUF (single or split -00001-of-0000N) into a shard set: "
        "base.gguf, one GGUF per (layer, expert) and manifest.json. A GGUF source keeps its "
        "tensor types (experts are sliced, not requantized).")
    p.add_argument("src", help="HF checkpoint directory or .gguf file")
    p.add_argument("out", help="output directory (must be empty unless --resume or --force)")
    p.add_argument("--expert-type", metavar="TYPE",
                   help="ggml type of routed expert weights (default Q4_K; F32 F16 BF16 Q8_0 "
                   "Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K, any case)")
    p.add_argument("--dense-type", metavar="TYPE",
                   help="ggml type of the other matrices (default Q8_0); norms and routers stay F32")
    p.add_argument("--substitute-type", metavar="TYPE", default=None,
                   help="also write every expert at this low-bit type (e.g. Q2_K, Q3_K, Q4_0): "
                   "the substitutes a budgeted run keeps resident for experts whose full "
                   "weights are not (safetensors sources only)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (tensors, types, output sizes) and write nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted conversion: keep files whose checksum verifies")
    p.add_argument("--force", action="store_true", help="overwrite an existing shard set in OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_convert)

    p = subparsers.add_parser(
        "export", help="shard set -> one stock GGUF (fused experts) for llama.cpp",
        description="Reassemble a shard set into a single GGUF with fused ffn_*_exps tensors that "
        "unmodified llama.cpp loads.")
    p.add_argument("shards", help="shard-set directory")
    p.add_argument("out", type=Path, help="output .gguf file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_export)

    p = subparsers.add_parser("verify", help="check every file of a shard set against its manifest",
                              description="Check that every file of a shard set exists with the "
                              "size and sha256 its manifest records.")
    p.add_argument("shards", help="shard-set directory")
    p.set_defaults(func=_verify)

