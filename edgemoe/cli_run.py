"""`edgemoe run`, `edgemoe chat` and `edgemoe info`.

run and chat take llama.cpp's flags (-p, -n, -c, -t, --temp, --top-k, --top-p, --min-p,
--repeat-penalty, --repeat-last-n, --seed) with llama.cpp's defaults; info needs no engine.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import secrets
import sys
from collections import defaultdict
from pathlib import Path

from edgemoe.cli import ranged
from edgemoe.cli_devices import add_rpc_arg, register_rpc
from edgemoe.errors import EdgeMoeError, ShardSetError
from edgemoe.runtime import add_residency_args, residency_config
from edgemoe.sampling import SamplingParams

_DEFAULTS = SamplingParams()


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", metavar="MODEL",
                   help="shard-set directory (from `edgemoe convert`), or a Hugging Face "
                   "checkpoint directory or GGUF file, converted on first use into the cache "
                   "($EDGEMOE_CACHE, default ~/.cache/edgemoe) and reused afterwards")
    p.add_argument("-c", "--ctx-size", type=ranged(int, 1), default=2048, metavar="N",
                   help="context window in tokens (default: %(default)s)")
    p.add_argument("-b", "--batch-size", type=ranged(int, 1), default=512, metavar="N",
                   help="prompt tokens per engine step (default: %(default)s)")
    p.add_argument("-t", "--threads", type=ranged(int, 1, 1024), default=None, metavar="N",
                   help="CPU threads (default: the engine's choice)")
    p.add_argument("--device", default=None,
                   help="ggml backend device, e.g. CPU, Vulkan0, CUDA0 or RPC0 (`edgemoe "
                   "devices` lists them; default: the best available)")
    add_rpc_arg(p)
    p.add_argument("--repack", action="store_true",
                   help="expert slots in host memory in ggml's repacked CPU layouts (CPU_REPACK: "
                   "Q4_0, IQ4_NL, Q4_K, ... for AVX2/NEON; faster decode, each expert repacked "
                   "as it loads); other types stay as stored")
    add_residency_args(p)


def _add_sampling_args(p: argparse.ArgumentParser, n_default: int) -> None:
    p.add_argument("-n", "--n-predict", type=ranged(int, -1), default=n_default, metavar="N",
                   help="tokens to generate, -1 = until end of text or a full context "
                   "(default: %(default)s)")
    p.add_argument("--temp", type=ranged(float, 0.0), default=_DEFAULTS.temperature,
                   help="temperature, 0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=ranged(int, 0), default=_DEFAULTS.top_k,
                   help="top-k sampling, 0 = off (default: %(default)s)")
    p.add_argument("--top-p", type=ranged(float, 0.0, 1.0), default=_DEFAULTS.top_p,
                   help="top-p sampling, 1.0 = off (default: %(default)s)")
    p.add_argument("--min-p", type=ranged(float, 0.0, 1.0), default=_DEFAULTS.min_p,
                   help="min-p sampling, 0.0 = off (default: %(default)s)")
    p.add_argument("--repeat-penalty", type=ranged(float, 0.0, lo_open=True),
                   default=_DEFAULTS.repeat_penalty,
                   help="penalty for repeating recent tokens, 1.0 = off (default: %(default)s)")
    p.add_argument("--repeat-last-n", type=ranged(int, -1), default=_DEFAULTS.repeat_last_n,
                   help="how many recent tokens the penalty covers, -1 = the whole context "
                   "(default: %(default)s)")
    p.add_argument("-s", "--seed", type=ranged(int, 0, 2**64 - 1), default=None,
                   help="random seed (default: a fresh one, printed in the summary)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when TEXT is generated (not printed); repeatable")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    try:
        return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                              min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                              repeat_last_n=args.repeat_last_n, seed=seed)
    except ValueError as exc:
        raise EdgeMoeError(str(exc)) from None


def cache_root() -> Path:
    env = os.environ.get("EDGEMOE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edgemoe"


def _source_key(src: Path) -> str:
    """Changes whenever the checkpoint's files do (names, sizes, modification times)."""
    files = [src] if src.is_file() else sorted(f for f in src.iterdir() if f.is_file())
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def resolve_shards(path: str | Path) -> Path:
    """The shard set to open for MODEL: a shard set as it is; a Hugging Face checkpoint
    directory or a GGUF file is converted once into the cache (a conversion cut short resumes)
    and the cached set is reused while the checkpoint is unchanged."""
    from edgemoe.shardset import MANIFEST_FILE

    src = Path(path)
    is_checkpoint = (src.is_dir() and (src / "config.json").is_file()
                     and not (src / MANIFEST_FILE).exists())
    if not (is_checkpoint or (src.is_file() and src.suffix == ".gguf")):
        return src  # a shard set, or nothing: ShardSet.open says what is wrong
    out = cache_root() / "shards" / f"{src.resolve().name}-{_source_key(src)}"
    if (out / MANIFEST_FILE).is_file():
        return out
    import converters

    print(f"edgemoe: converting {src} into {out} (once; later runs reuse it)", file=sys.stderr)
    converters.convert(src, out, resume=out.exists(), progress=sys.stderr.isatty())
    return out


def open_model(args: argparse.Namespace):
    from edgemoe.api import Model

    cfg = residency_config(args)
    register_rpc(args.rpc, args.rpc_timeout)
    return Model(resolve_shards(args.shards), n_ctx=args.ctx_size, n_threads=args.threads,
                 device=args.device, n_batch=args.batch_size, memory_budget=cfg.memory_budget,
                 policy=cfg.policy, adaptive_gating=cfg.adaptive_gating,
                 n_prefetch=cfg.n_prefetch, swap_interval=cfg.swap_interval,
                 swap_decay=cfg.swap_decay, stats=args.stats_json is not None,
                 substitutes=cfg.substitutes, device_budget=cfg.device_budget,
                 quality=cfg.quality,
                 repack=args.repack)


def report_residency(model, args: argparse.Namespace) -> None:
    """After every run: the policy's one-line summary on stderr when a budget or a policy was
    asked for, and --stats-json."""
    if args.memory_budget is not None or args.policy is not None or args.device_budget:
        print(model.residency_summary(), file=sys.stderr)
    if args.stats_json is not None:
        model.write_stats(args.stats_json)


def register(subparsers) -> None:
    run = subparsers.add_parser(
        "run", help="generate a continuation of a prompt",
        description="Continue a raw-text prompt, streaming tokens to stdout; a one-line summary "
        "(prefill and decode tok/s, peak memory) goes to stderr.")
    _add_model_args(run)
    prompt = run.add_mutually_exclusive_group(required=True)
    prompt.add_argument("-p", "--prompt", help="prompt text (raw, no chat template)")
    prompt.add_argument("-f", "--file", type=Path, help="read the prompt from a file")
    _add_sampling_args(run, n_default=128)
    run.add_argument("--no-display-prompt", action="store_true",
                     help="print only the generated text, not the prompt before it")
    run.set_defaults(func=cmd_run)

    chat = subparsers.add_parser(
        "chat", help="chat with a model in the terminal",
        description="Multi-turn chat with the model's chat template, streamed. Commands: "
        "/reset, /stats, /help, /exit. Ctrl-C ends a reply; Ctrl-D or /exit quits.")
    _add_model_args(chat)
    _add_sampling_args(chat, n_default=256)
    chat.add_argument("--system", default=None, help="system message for the conversation")
    chat.set_defaults(func=cmd_chat)

    info = subparsers.add_parser(
        "info", help="describe a shard set",
        description="Architecture, hyper-parameters, bytes per tensor class, experts and quant "
        "types of a shard set, from its manifest and base.gguf (no model is loaded).")
    info.add_argument("shards", metavar="SHARDS", help="shard-set directory")
    info.set_defaults(func=cmd_info)


# ------------------------------------------------------------------------------------ run --

def _write(text: str) -> None:
    # Bytes, not str: a terminal or pipe with a non-UTF-8 locale must not raise mid-stream.
    sys.stdout.buffer.write(text.encode("utf-8", errors="replace"))
    sys.stdout.buffer.flush()


def cmd_run(args: argparse.Namespace) -> int:
    if args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EdgeMoeError(f"{args.file}: cannot read the prompt ({exc})") from None
    else:
        text = args.prompt
    sampling = sampling_from_args(args)
    with open_model(args) as model:
        pieces = model.generate(
            text, max_tokens=args.n_predict, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty, repeat_last_n=sampling.repeat_last_n,
            seed=sampling.seed, stop=args.stop, stream=True)
        if not args.no_display_prompt:
            _write(text)
        try:
            for piece in pieces:
                _write(piece)
        finally:
            pieces.close()
            _write("\n")
        stats = model.last_stats
        if stats.context_full:
            print(f"edgemoe run: note: generation stopped at a full context ({args.ctx_size} "
                  "tokens); raise -c/--ctx-size for longer output", file=sys.stderr)
        line = stats.summary()
        if not sampling.greedy:
            line += f" | seed {sampling.seed}"
        print(line, file=sys.stderr)
        report_residency(model, args)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from edgemoe.chat import ChatSession

    sampling = sampling_from_args(args)
    with open_model(args) as model:
        if model.vocab.chat_template is None:
            raise EdgeMoeError(f"{args.shards}: the model has no chat template "
                               "(tokenizer.chat_template); use `edgemoe run` for raw prompts")
        try:
            return ChatSession(model, sampling, max_tokens=args.n_predict, system=args.system,
                               stop=args.stop).repl(sys.stdin)
        finally:
            report_residency(model, args)


# ----------------------------------------------------------------------------------- info --

# blk.{L}.attn_q.weight -> attn_q; blk.{L}.ffn_down.{E}.weight -> ffn_down; output.weight -> output
_CLASS = re.compile(r"^(?:blk\.\d+\.)?(?P<cls>[a-z_]+?)(?:\.\d+)?\.(?:weight|bias)$")


def tensor_class(name: str) -> str:
    match = _CLASS.match(name)
    if not match:
        return name
    cls = match["cls"]
    return cls + (".bias" if name.endswith(".bias") else "")


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def describe(shards_path: str | Path) -> str:
    """The text `edgemoe info` prints."""
    from gguf.constants import Keys

    from edgemoe import arch as arch_registry
    from edgemoe.gguf_header import GGUFHeader
    from edgemoe.shardset import ShardSet

    shards = ShardSet.open(shards_path)
    reader = GGUFHeader(shards.base_path)
    shards.check_base_header(reader)
    model = arch_registry.get(shards.arch)
    shards.check_match(model.hparams_class.from_gguf(reader, model, shards.base_path))

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field(Keys.General.ARCHITECTURE)
    lines = [f"shard set     {shards.root}"]
    lines.append(f"architecture  {arch} (manifest: {shards.arch}"
                 + (f", from {shards.source.get('hf_architecture') or shards.source.get('kind')}"
                    if shards.source else "") + ")")
    name = field(Keys.General.NAME)
    if name:
        lines.append(f"name          {name}")
    hp = [("layers", shards.n_layer), ("n_embd", shards.n_embd),
          ("experts", shards.n_expert), ("used per token", shards.n_expert_used),
          ("expert n_ff", shards.n_ff_exp),
          ("context", field(Keys.LLM.CONTEXT_LENGTH.format(arch=arch)))]
    lines.append("hyper-params  " + ", ".join(f"{k} {v}" for k, v in hp if v is not None))
    tokens = reader.fields.get(Keys.Tokenizer.LIST)
    lines.append(f"vocabulary    {tokens.count if tokens is not None else 'none'} tokens, "
                 f"model {field(Keys.Tokenizer.MODEL)}, chat template "
                 f"{'yes' if reader.fields.get(Keys.Tokenizer.CHAT_TEMPLATE) else 'no'}")
    lines.append(f"quant types   experts {shards.expert_type}, dense {shards.dense_type}"
                 + (f", {len(shards.fallbacks)} fallback(s)" if shards.fallbacks else ""))

    # (class) -> [count, bytes, {types}]
    classes: dict[str, list] = defaultdict(lambda: [0, 0, set()])
    for t in reader.tensors:
        entry = classes[tensor_class(t.name)]
        entry[0] += 1
        entry[1] += int(t.n_bytes)
        entry[2].add(t.tensor_type.name)
    base_bytes = sum(v[1] for v in classes.values())
    expert_classes: dict[str, list] = defaultdict(lambda: [0, 0, set()])
    for shard in shards.experts():
        for proj, info in shard.tensors.items():
            entry = expert_classes[proj]
            entry[0] += 1
            entry[1] += info.nbytes
            entry[2].add(info.type)

    lines.append("")
    lines.append(f"{'tensor class':<24}{'count':>7}{'bytes':>14}  type")
    for title, table in (("base.gguf", classes), ("experts/ (routed)", expert_classes)):
        lines.append(f"-- {title}")
        for cls, (count, nbytes, types) in sorted(table.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"{cls:<24}{count:>7}{_fmt_bytes(nbytes):>14}  {','.join(sorted(types))}")

    n_experts = len(list(shards.experts()))
    expert_bytes = shards.expert_bytes_total
    per_expert = expert_bytes // n_experts if n_experts else 0
    total = base_bytes + expert_bytes
    lines.append("")
    lines.append(f"experts       {n_experts} ({len(shards.expert_layers)} layers x "
                 f"{shards.n_expert}), {_fmt_bytes(per_expert)} each, "
                 f"{_fmt_bytes(expert_bytes)} in all")
    lines.append(f"weights       {_fmt_bytes(total)}: base {_fmt_bytes(base_bytes)} "
                 f"({100 * base_bytes / total:.1f}%), experts {_fmt_bytes(expert_bytes)} "
                 f"({100 * expert_bytes / total:.1f}%)" if total else "weights       none")
    if n_experts and shards.n_expert:
        active = base_bytes + per_expert * shards.n_expert_used * len(shards.expert_layers)
        lines.append(f"per token     {_fmt_bytes(active)} of weights touched "
                     f"(base + {shards.n_expert_used} experts per layer)")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    print(describe(args.shards))
    return 0
