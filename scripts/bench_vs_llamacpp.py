#!/usr/bin/env python3
"""edgemoe vs llama-cpp-python on the same weights, side by side in one process.

    python scripts/bench_vs_llamacpp.py                       # 16 layers, 32 experts top-4, Q8_0
    python scripts/bench_vs_llamacpp.py --expert-type Q4_K --threads 2 --repeats 3

Builds (once, cached in --workdir) a synthetic HF checkpoint with scripts/make_synthetic.py,
converts it to a shard set (`edgemoe convert`) and exports the same weights as one GGUF
(`edgemoe export`). Then, with the same thread count, each runner prefills a prompt of --prompt
tokens (timed as one eval; the runners in turn, five times, median) and both greedy-decode --gen
tokens in lockstep (one token each in turn, so load from other processes falls on both alike);
repeated --repeats times, alternating which runner goes first; prints median prefill and decode
tok/s and the edgemoe / llama.cpp ratios. Both runners produce the next token's logits only after prefill
(llama.cpp computes the last row; edgemoe is asked for the last row too).

llama.cpp runs with flash attention (the kernel edgemoe uses) and, by default, without its extra
weight buffer types (--llama-extra-bufts turns them on): on CPUs with AMX its AMX Q8_0 kernel
crashed in testing here. --repack compares repacked weights on both sides: edgemoe's expert slots
in ggml's CPU_REPACK layout (each expert repacked as it is loaded into its slot) against llama.cpp
with its default extra buffer types (which repack every matrix it can, attention included):

    python scripts/bench_vs_llamacpp.py --expert-type Q4_0 --dense-type Q4_0 --threads 1 \
        --repeats 1 --repack
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prepare(args) -> tuple[Path, Path]:
    if args.shards and args.gguf:
        return Path(args.shards), Path(args.gguf)
    work = Path(args.workdir)
    name = (f"{args.arch}_L{args.layers}_E{args.experts}_k{args.top_k}_h{args.hidden}_f{args.ffn}")
    ckpt = work / name
    shards = work / f"{name}.{args.expert_type}_{args.dense_type}"
    gguf = work / f"{shards.name}.gguf"
    if not (ckpt / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic.py"), str(ckpt),
                        "--arch", args.arch, "--layers", str(args.layers), "--experts",
                        str(args.experts), "--top-k", str(args.top_k), "--hidden", str(args.hidden),
                        "--ffn", str(args.ffn), "--force"], check=True)
    import converters

    if not (shards / "manifest.json").exists():
        converters.convert(ckpt, shards, expert_type=args.expert_type, dense_type=args.dense_type,
                           force=True)
    if not gguf.exists():
        converters.export(shards, gguf, progress=True)
    return shards, gguf


class EdgemoeRunner:
    name = "edgemoe"

    def __init__(self, shards: Path, n_ctx: int, threads: int, repack: bool = False):
        from edgemoe.engine import Engine

        self.engine = Engine(shards, n_ctx=n_ctx, n_threads=threads, repack=repack)
        if repack and not self.engine.pool.repacked:
            raise SystemExit("edgemoe: ggml has no repacked layout for these expert types on "
                             "this CPU (CPU_REPACK covers Q4_0, IQ4_NL, Q4_K, ... per ISA)")
        self.n_vocab = self.engine.n_vocab

    def reset(self):
        self.engine.reset()

    def prefill(self, tokens) -> np.ndarray:
        return self.engine.eval(tokens, all_logits=False)[-1]

    def step(self, token: int) -> np.ndarray:
        return self.engine.eval([token])[-1]

    def close(self):
        self.engine.close()


class LlamaRunner:
    name = "llama.cpp"

    def __init__(self, gguf: Path, n_ctx: int, threads: int, n_batch: int, extra_bufts: bool):
        import llama_cpp
        import llama_cpp.llama_cpp as capi

        default = capi.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = extra_bufts
            return p

        capi.llama_model_default_params = params
        try:
            self.llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                       n_threads=threads, n_threads_batch=threads,
                                       flash_attn=True, verbose=False)
        finally:
            capi.llama_model_default_params = default
        self.n_vocab = self.llm.n_vocab()

    def reset(self):
        self.llm.reset()

    def _last(self) -> np.ndarray:
        # Without logits_all, Llama.eval keeps no scores; the context holds the last row.
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,)).copy()

    def prefill(self, tokens) -> np.ndarray:
        self.llm.eval(list(map(int, tokens)))
        return self._last()

    def step(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._last()

    def close(self):
        self.llm.close()


def run_pair(runners, prompt, n_gen, n_prefill: int = 5) -> dict[str, tuple[float, float, list[int]]]:
    """Prefill both runners in turn n_prefill times (median), then decode them in lockstep, one
    token each in turn, so that load from other processes falls on both alike."""
    timing = {r.name: [[], 0.0, []] for r in runners}
    logits = {}
    for _ in range(n_prefill):
        for r in runners:
            r.reset()
            t = time.perf_counter()
            logits[r.name] = r.prefill(prompt)
            timing[r.name][0].append(len(prompt) / (time.perf_counter() - t))
    for r in runners:
        timing[r.name][0] = statistics.median(timing[r.name][0])
    for _ in range(n_gen):
        for r in runners:
            token = int(np.argmax(logits[r.name]))
            timing[r.name][2].append(token)
            t = time.perf_counter()
            logits[r.name] = r.step(token)
            timing[r.name][1] += time.perf_counter() - t
    return {n: (pf, n_gen / dt, toks) for n, (pf, dt, toks) in timing.items()}


def profile_decode(runner: EdgemoeRunner, prompt, n_steps: int) -> None:
    """Time edgemoe's decode per ggml op (each node computed on its own, so the absolute
    figures include a per-node dispatch cost; the shares show where the time goes)."""
    per_op: dict[str, float] = {}
    last = [0.0, True]  # time of the previous node, whether the step's first node is next

    def on_node(op: str) -> None:
        now = time.perf_counter()
        # The first node also carries the step's setup (inputs, Python, graph lookup).
        key = "(setup+1st node)" if last[1] else op
        per_op[key] = per_op.get(key, 0.0) + now - last[0]
        last[0], last[1] = now, False

    runner.reset()
    row = runner.prefill(prompt)
    runner.engine.sched.profile(on_node)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        last[0], last[1] = time.perf_counter(), True
        row = runner.step(int(np.argmax(row)))
    total = time.perf_counter() - t0
    runner.engine.sched.profile(None)
    print(f"\nedgemoe decode profile over {n_steps} tokens ({total / n_steps * 1e3:.1f} ms/token "
          "with per-node sync):")
    for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {op:16s} {t / n_steps * 1e3:8.2f} ms/token  {100 * t / total:5.1f}%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/edgemoe-bench")
    ap.add_argument("--arch", default="qwen3_moe")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--expert-type", default="Q8_0")
    ap.add_argument("--dense-type", default="Q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards", help="an existing shard set (with --gguf: skip building)")
    ap.add_argument("--gguf", help="the same weights exported as one GGUF")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then time edgemoe's decode per ggml op over N tokens")
    ap.add_argument("--llama-extra-bufts", action="store_true",
                    help="let llama.cpp repack weights into its extra CPU buffer types")
    ap.add_argument("--repack", action="store_true",
                    help="edgemoe's expert slots repacked (CPU_REPACK) against llama.cpp with its "
                    "default extra buffer types (implies --llama-extra-bufts)")
    args = ap.parse_args()
    if args.repack:
        args.llama_extra_bufts = True

    shards, gguf = prepare(args)
    n_ctx = args.prompt + args.gen + 8
    size = sum(p.stat().st_size for p in shards.rglob("*.gguf"))
    print(f"model: {shards.name} ({size / 1e9:.2f} GB of GGUF), threads {args.threads}, "
          f"prompt {args.prompt}, generate {args.gen}, repeats {args.repeats}, weights "
          + ("repacked (edgemoe: expert slots; llama.cpp: default extra buffer types)"
             if args.repack else "as stored" + (" (llama.cpp: extra buffer types)"
                                                 if args.llama_extra_bufts else "")))

    t = time.perf_counter()
    ours = EdgemoeRunner(shards, n_ctx, args.threads, args.repack)
    print(f"edgemoe loaded in {time.perf_counter() - t:.1f} s; memory "
          + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in ours.engine.memory().items()))
    t = time.perf_counter()
    theirs = LlamaRunner(gguf, n_ctx, args.threads, args.prompt, args.llama_extra_bufts)
    print(f"llama.cpp loaded in {time.perf_counter() - t:.1f} s")

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, min(ours.n_vocab, theirs.n_vocab), args.prompt).tolist()
    run_pair((ours, theirs), prompt, 8, 1)  # warm-up: page weights in, build graphs

    results = {r.name: {"prefill": [], "decode": []} for r in (ours, theirs)}
    tokens = {}
    for i in range(args.repeats):
        order = (ours, theirs) if i % 2 == 0 else (theirs, ours)
        for name, (pf, dc, out) in run_pair(order, prompt, args.gen).items():
            results[name]["prefill"].append(pf)
            results[name]["decode"].append(dc)
            tokens[name] = out
            print(f"  run {i + 1} {name:9s} prefill {pf:8.1f} tok/s   decode {dc:6.2f} tok/s")
    theirs.close()
    if args.profile:
        profile_decode(ours, prompt, args.profile)
    ours.close()

    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in results.items()}
    print(f"\n{'':10s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for n in ("edgemoe", "llama.cpp"):
        print(f"{n:10s} {med[n]['prefill']:14.1f} {med[n]['decode']:13.2f}")
    pr = med["edgemoe"]["prefill"] / med["llama.cpp"]["prefill"]
    dr = med["edgemoe"]["decode"] / med["llama.cpp"]["decode"]
    print(f"{'ratio':10s} {pr:14.3f} {dr:13.3f}   (targets: prefill >= 0.8, decode >= 0.9)")
    same = sum(a == b for a, b in zip(tokens["edgemoe"], tokens["llama.cpp"]))
    print(f"greedy tokens identical: {same}/{args.gen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
