#!/usr/bin/env python3
"""Regenerate docs/RESULTS.md and its plots from scratch: every figure in that page comes from here.

    sudo .venv/bin/python scripts/bench.py                   # everything (hours on 2 cores)
    .venv/bin/python scripts/bench.py --quick                # small models only, < 5 minutes
    sudo .venv/bin/python scripts/bench.py --sections large  # rerun one part; the rest is kept
    .venv/bin/python scripts/bench.py --render-only          # rewrite the page from results/

Sections (each stores its figures in docs/results/<section>.json, then the page is rendered from
those files, so a section rerun replaces only its own figures):
- machine: CPU, memory, load, memory bandwidth measured now (the bound of full-memory decode);
- routing: locality of the synthetic Qwen3-30B-A3B-shaped model's routing on held-out text,
  measured on the model itself (scripts/routing_locality.py), beside the published figures;
- quality: the bundled model on its held-out text (both domains alternating), every policy the
  runtime has at 100/75/50/35/25% of expert bytes: perplexity, its ratio to full, KL and top-1
  agreement against full (`edgemoe perplexity` decoding token by token), experts per token;
- speed: the bundled model under the edge emulator (memory limit = the budget, storage
  throttled; scripts/bench_budget.py), every policy and llama-cpp-python on the exported GGUF;
- large: the Qwen3-30B-A3B shape at Q4_K under 8 GiB and the OLMoE-1B-7B shape under 2 GiB on
  emulated boards, every policy against llama.cpp, with the physical bound of each figure;
- ablations: Eq. 1 against usage counts, swap interval, uniform against planned slots,
  prefetch depth, adaptive-gating threshold.
Matplotlib (the `dev` extra) draws the plots. Without root (no cgroups) speed runs are
unlimited and the page says so. Models are built in --work (default /tmp/edgemoe-bench) and
reused; the large shapes (~36 GB for the 30B shape's shard set and GGUF) in --large-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

BUNDLED = ROOT / "models" / "edgemoe-tiny-shakespy"
SECTIONS = ("machine", "routing", "quality", "speed", "large", "large_quality", "ablations")
FRACTIONS = (1.0, 0.75, 0.5, 0.35, 0.25)
LOSS_LIMIT = 0.03      # a lossy policy losing more PPL than this at 50% is called out


@dataclass(frozen=True)
class Mode:
    name: str
    ctx: int                 # perplexity window
    chunks: int              # perplexity windows
    speed_profiles: tuple[str, ...]
    speed_budgets: tuple[float, ...]
    speed_n: int             # decode steps per speed run
    routing_chunks: int
    large_routing_chunks: int  # windows of 512 tokens measured on the 30B shape (slow: it runs)
    large: bool
    large_n: int


QUICK = Mode("quick", ctx=256, chunks=2, speed_profiles=("rpi5-nvme",), speed_budgets=(0.5,),
             speed_n=16, routing_chunks=2, large_routing_chunks=0, large=False, large_n=0)
FULL = Mode("full", ctx=512, chunks=16,
            speed_profiles=("rpi5-sd", "rpi5-nvme", "jetson-orin-nano"),
            speed_budgets=FRACTIONS, speed_n=32, routing_chunks=4, large_routing_chunks=1,
            large=True, large_n=16)

# Large shapes: (preset, memory limit, profiles).
LARGE = (("qwen3-30b-a3b", "8GiB", ("rpi5-nvme", "rpi5-sd")),
         ("olmoe-1b-7b", "2GiB", ("rpi5-nvme", "rpi5-sd")))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
    # One thread everywhere: BLAS workers spin like ggml's and collapse on a loaded host.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(
               [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def policies() -> list[str]:
    """The residency policies the runtime offers (new ones are picked up here)."""
    from edgemoe.runtime import POLICIES

    return list(POLICIES)


# -- machine ----------------------------------------------------------------------------------

def memory_bandwidth(size: int = 256 << 20, repeats: int = 5) -> dict:
    """Best of `repeats`: bytes read per second summing a large array (the bound of decode at
    full memory reads weights once per token) and copy rate (read + write bytes)."""
    a = np.ones(size // 8, dtype=np.float64)
    b = np.empty_like(a)
    read = copy = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        read = max(read, size / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        np.copyto(b, a)
        copy = max(copy, 2 * size / (time.perf_counter() - t0))
    return {"read_bps": read, "copy_bps": copy}


def section_machine(ctx) -> dict:
    import psutil

    from edge_emulate import unavailable_reason

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    try:
        commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).stdout.strip()
    except OSError:
        commit = None
    import llama_cpp

    return {"cpu": cpu, "cores": os.cpu_count(), "ram": psutil.virtual_memory().total,
            "load": os.getloadavg(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "commit": commit,
            "kernel": platform.release(), "emulation": unavailable_reason() or "available",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "bandwidth": memory_bandwidth()}


# -- shared models ----------------------------------------------------------------------------

def bundled_shards(work: Path) -> tuple[Path, Path]:
    """The bundled model converted, calibrated and exported once into `work`."""
    import converters

    shards, gguf = work / "bundled", work / "bundled.gguf"
    if not (shards / "manifest.json").exists():
        log("converting the bundled model")
        converters.convert(BUNDLED, shards, progress=False, force=True)
    # The converter writes calibration.json with the experts' norms; the routing trace and
    # sensitivities (slot plan, gating, --quality's threshold, swap's schedule) come from here.
    from edgemoe.runtime import TRACE_FILE

    if not (shards / TRACE_FILE).exists():
        log("calibrating it")
        p = run([sys.executable, "-m", "edgemoe", "calibrate", str(shards), "-t", "1"])
        if p.returncode:
            raise SystemExit(f"calibrate failed: {p.stderr[-500:]}")
    if not gguf.exists():
        from converters.exporter import export_gguf

        export_gguf(shards, gguf)
    return shards, gguf


def heldout_text(work: Path, chars: int = 400_000) -> Path:
    import prepare_corpus

    path = work / "heldout.txt"
    if not path.exists():
        path.write_text(prepare_corpus.alternating_heldout(prepare_corpus.load_corpus(),
                                                           total_chars=chars))
    return path


def large_model(preset: str, large_dir: Path, generate: bool) -> tuple[Path, Path] | None:
    import synthetic_gguf

    shards, gguf = large_dir / preset, large_dir / f"{preset}.gguf"
    if (shards / "manifest.json").exists() and gguf.exists():
        return shards, gguf
    if not generate:
        return None
    log(f"writing the {preset} shape into {large_dir} (once)")
    large_dir.mkdir(parents=True, exist_ok=True)
    synthetic_gguf.write_synthetic(synthetic_gguf.preset(preset), shards, gguf, force=True)
    return shards, gguf


# -- routing ----------------------------------------------------------------------------------

def section_routing(ctx) -> dict:
    import routing_locality
    import synthetic_gguf
    from edgemoe.residency.traces import SelectionTrace

    text = heldout_text(ctx.work).read_text()
    out = {"published": {k: list(v) for k, v in routing_locality.PUBLISHED.items()}}
    small = ctx.work / "routing-small"
    if not (small / "manifest.json").exists():
        spec = synthetic_gguf.preset("qwen3-30b-a3b", n_layer=4, n_embd=512, n_ff_exp=256,
                                     n_vocab=4096)
        synthetic_gguf.write_synthetic(spec, small, force=True)
    # (name, shards, budget, policy): masked runs show the unmasked router through the engine's
    # observer; exact (ondemand) runs show the router's choice at the policy's gate.
    n = ctx.mode.routing_chunks
    models = [("qwen3-30b-a3b routing, 4 layers x 128 (small), exact", small, "60%", "ondemand", n),
              ("qwen3-30b-a3b routing, 4 layers x 128 (small), masked", small, None, "full", n)]
    if ctx.mode.large:
        m = large_model("qwen3-30b-a3b", ctx.large_dir, ctx.generate)
        if m:
            models.append(("qwen3-30b-a3b shape (synthetic, 48 x 128, top-8)", m[0], "8GiB",
                           "swap", ctx.mode.large_routing_chunks))
    bundled, _ = bundled_shards(ctx.work)
    models.append(("bundled model (trained, 4 x 8, top-2)", bundled, None, "full", n))
    traces = {}
    for name, shards, budget, policy, chunks in models:
        log(f"routing locality: {name}")
        trace = ctx.work / f"{shards.name}-{policy}.selections.npz"
        loc, loc0, seconds = routing_locality.measure(
            shards, text, n_ctx=512, n_chunks=chunks, memory_budget=budget,
            policy=policy, save_trace=trace, verbose=False)
        traces[name] = trace
        out.setdefault("models", []).append({"name": name, "all_layers": loc.to_dict(),
                                             "layer0": loc0.to_dict(), "seconds": seconds,
                                             "budget": budget, "policy": policy})
    # The synthetic routers read only what no expert writes, so which experts ran (masked
    # redirects, exact loads) cannot change the routing: the two runs of the small model agree.
    a, b = (SelectionTrace.load(traces[models[i][0]]) for i in (0, 1))
    same = np.mean([np.array_equal(np.sort(a.ids[l], 1), np.sort(b.ids[l], 1)) for l in a.ids])
    rows = np.mean([(np.sort(a.ids[l], 1) == np.sort(b.ids[l], 1)).all(1).mean() for l in a.ids])
    out["exact_vs_masked"] = {"identical_layers": float(same), "identical_rows": float(rows)}
    return out


# -- quality ----------------------------------------------------------------------------------

def _open(shards, n_ctx, **cfg):
    from edgemoe.runtime import ResidencyConfig, open_engine

    engine, _ = open_engine(shards, ResidencyConfig(**cfg), n_ctx=n_ctx, n_threads=1,
                            n_batch=n_ctx)
    return engine


def ppl_run(shards, tokens, mode: Mode, base: Path | None, save: Path | None = None,
            tweak=None, **cfg) -> dict:
    """One `edgemoe perplexity` run in process: its figures, or the error that refused it."""
    from edgemoe import perplexity
    from edgemoe.errors import EdgeMoeError
    from edgemoe.residency.telemetry import record

    try:
        engine = _open(shards, mode.ctx, **cfg)
    except EdgeMoeError as exc:
        return {"error": str(exc)}
    with engine:
        if tweak is not None:
            note = tweak(engine)
            if note:
                return {"error": note}
        res = perplexity.evaluate(engine, tokens, mode.ctx, n_chunks=mode.chunks,
                                  save_logits=save, kl_base=base)
        out = res.to_dict()
        out.pop("chunk_ppl")
        out["decode_tok_s"] = res.n_scored / max(res.decode_seconds, 1e-9)
        if engine.policy is not None:
            out["telemetry"] = record(engine.policy.telemetry.counters,
                                      engine.policy.telemetry.resident_bytes)
    return out


def _tokens(shards, text: str) -> tuple[list[int], int | None]:
    from edgemoe.tokenizer import Vocab
    from edgemoe.shardset import ShardSet

    with Vocab(ShardSet.open(shards).base_path) as vocab:
        tokens = vocab.tokenize(text, add_special=True)
        return tokens, (vocab.bos if vocab.add_bos else None)


def gating_threshold(shards, rate: float) -> float | None:
    from bench_budget import adaptive_threshold

    return adaptive_threshold(str(shards), rate)


def section_quality(ctx) -> dict:
    shards, _ = bundled_shards(ctx.work)
    tokens, _ = _tokens(shards, heldout_text(ctx.work).read_text())
    base = ctx.work / "quality-full.logits"
    log("quality: the full model's reference")
    full = ppl_run(shards, tokens, ctx.mode, None, save=base)
    threshold = gating_threshold(shards, 0.25)
    runners = {p: {"policy": p} for p in policies()}
    if threshold is not None:
        runners["ondemand+gating"] = {"policy": "ondemand", "adaptive_gating": threshold}
        # ondemand's per-miss decisions (`--quality`): wait / substitute / drop by s_l * w^2.
        for quality in ("balanced", "fast"):
            runners[f"ondemand+{quality}"] = {"policy": "ondemand", "quality": quality}
    rows = {}
    for name, cfg in runners.items():
        for f in FRACTIONS:
            budget = f"{round(100 * f)}%"
            log(f"quality: {name} at {budget}")
            rows.setdefault(name, {})[budget] = ppl_run(shards, tokens, ctx.mode, base,
                                                        memory_budget=budget, **cfg)
    return {"full": full, "runners": rows, "threshold": threshold, "n_tokens": len(tokens),
            "ctx": ctx.mode.ctx, "chunks": ctx.mode.chunks, "drop_rate": 0.25}


# -- speed ------------------------------------------------------------------------------------

def bench_budget(shards, gguf, budget: str, profiles, n: int, text: Path, extra=(),
                 runners=None, pass_relative: bool = False, timeout: float = 7200) -> dict:
    out = Path(str(shards) + f".bench-{budget.replace('%', 'pct')}.json")
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_budget.py"), str(shards),
           "--budget", budget, "--profiles", *profiles, "-n", str(n), "--no-plan",
           "--text", str(text), "--json", str(out), "--threads", "1",
           "--timeout", str(timeout)]
    if gguf is not None:
        cmd += ["--gguf", str(gguf)]
    if runners:
        cmd += ["--policies", *runners]
    if pass_relative:
        cmd.append("--pass-relative")
    for name, spec in extra:
        cmd += ["--extra", f"{name}={json.dumps(spec)}"]
    p = run(["nice", "-n", "10", *cmd])
    if p.returncode != 0 or not out.exists():
        return {"error": f"bench_budget exit {p.returncode}: {p.stderr.strip()[-600:]}"}
    doc = json.loads(out.read_text())
    doc["log"] = p.stdout
    return doc


def section_speed(ctx) -> dict:
    shards, gguf = bundled_shards(ctx.work)
    text = heldout_text(ctx.work)
    out = {}
    for f in ctx.mode.speed_budgets:
        budget = f"{round(100 * f)}%"
        log(f"speed: bundled model at {budget} on {', '.join(ctx.mode.speed_profiles)}")
        out[budget] = bench_budget(shards, gguf, budget, ctx.mode.speed_profiles,
                                   ctx.mode.speed_n, text, pass_relative=True)
    return {"budgets": out, "n": ctx.mode.speed_n, "weights": _weights(shards)}


# -- large shapes -----------------------------------------------------------------------------

def _norms_child(shards: Path) -> None:
    """calibration.json with the experts' norms (swap and static need them), computed once
    outside the timed runs."""
    if (shards / "calibration.json").exists():
        return
    code = ("from edgemoe.runtime import load_calibration; from edgemoe.shardset import "
            f"ShardSet; load_calibration(ShardSet.open({str(shards)!r}), need_norms=True)")
    p = run(["nice", "-n", "10", sys.executable, "-c", code])
    if p.returncode:
        raise RuntimeError(f"norms of {shards}: {p.stderr[-400:]}")


def _ppl_child(shards, text: Path, budget: str, policy: str, ctx_size: int, chunks: int,
               save=None, base=None) -> dict:
    out = Path(str(shards) + f".ppl-{policy}.json")
    cmd = [sys.executable, "-m", "edgemoe", "perplexity", str(shards), "-f", str(text),
           "-c", str(ctx_size), "--chunks", str(chunks), "-t", "1", "--memory-budget", budget,
           "--policy", policy, "--json", str(out)]
    if save:
        cmd += ["--save-logits", str(save)]
    if base:
        cmd += ["--kl-base", str(base)]
    p = run(["nice", "-n", "10", *cmd])
    if p.returncode:
        return {"error": p.stderr.strip()[-400:]}
    doc = json.loads(out.read_text())
    doc.pop("chunk_ppl", None)
    return doc


def section_large(ctx) -> dict:
    text = heldout_text(ctx.work)
    out = {}
    from bench_budget import runner_specs

    # A run cut short resumes: profiles already measured are kept.
    stored = ctx.results_dir / "large.json" if ctx.results_dir else None
    if stored is not None and stored.exists():
        out = json.loads(stored.read_text())["figures"]
    for preset, limit, profiles in LARGE:
        if ctx.large_presets and preset not in ctx.large_presets:
            continue
        model = large_model(preset, ctx.large_dir, ctx.generate)
        if model is None:
            out[preset] = {"error": f"{ctx.large_dir / preset} not generated (--generate)"}
            continue
        shards, gguf = model
        _norms_child(shards)
        doc = out.get(preset) if "error" not in out.get(preset, {"error": 1}) else None
        doc = doc or {"limit": limit, "weights": _weights(shards), "quality": {},
                      "speed": {"profiles": {}, "n": ctx.mode.large_n}}
        out[preset] = doc
        n_of = doc["speed"].setdefault("n_by_profile", {})
        runners = [r for r in runner_specs(limit, None) if r != "full"]
        # One profile at a time, each stored as soon as it is measured (hours in all).
        for profile in profiles:
            have = doc["speed"]["profiles"].get(profile)
            if have and "error" not in have:
                n_of.setdefault(profile, doc["speed"].get("n"))
                continue
            n = ctx.large_n or ctx.mode.large_n
            log(f"large: {preset} under {limit} on {profile}, {n} tokens: {', '.join(runners)}")
            speed = bench_budget(shards, gguf, limit, [profile], n, text,
                                 runners=runners, timeout=5400)
            n_of[profile] = n
            if "error" in speed:
                doc["speed"]["profiles"][profile] = {"error": speed["error"]}
            else:
                doc["speed"]["profiles"].update(speed["profiles"])
                doc["speed"]["budget_bytes"] = speed["budget_bytes"]
            ctx.save_partial("large", out)
    return out


def section_large_quality(ctx) -> dict:
    """Quality beside the large shapes' speeds: perplexity, KL and top-1 agreement of each lossy
    policy against the exact (ondemand) run under the same limit, one window of 128 tokens."""
    text = heldout_text(ctx.work)
    out = {}
    for preset, limit, _ in LARGE:
        model = large_model(preset, ctx.large_dir, ctx.generate)
        if model is None:
            continue
        shards, _ = model
        _norms_child(shards)
        base = Path(str(shards) + ".exact.logits")
        log(f"large quality: {preset} under {limit}")
        doc = out[preset] = {"limit": limit}
        doc["ondemand"] = _ppl_child(shards, text, limit, "ondemand", 128, 1, save=base)
        for p in policies():
            if p not in ("ondemand", "full"):
                doc[p] = _ppl_child(shards, text, limit, p, 128, 1, base=base)
            ctx.save_partial("large_quality", out)
    return out


def _weights(shards) -> dict:
    """Bytes per token of weights touched at full residency, and one expert's bytes."""
    from gguf import GGUFReader

    from edgemoe.shardset import ShardSet

    ss = ShardSet.open(shards)
    base = sum(int(t.n_bytes) for t in GGUFReader(ss.base_path).tensors)
    expert = ss.expert(ss.expert_layers[0], 0).data_bytes
    return {"base_bytes": base, "expert_bytes": expert, "n_expert_layers": len(ss.expert_layers),
            "k": ss.n_expert_used, "n_expert": ss.n_expert,
            "touched_per_token": base + ss.n_expert_used * len(ss.expert_layers) * expert}


# -- ablations --------------------------------------------------------------------------------

def _usage_counts(engine) -> str | None:
    """Swap importance as plain usage counts instead of Eq. 1 (the ablation SwapMoE reports)."""
    from edgemoe.residency.importance import ImportanceTracker
    from edgemoe.residency.routing import topk

    policy = engine.policy
    tracker = getattr(policy, "tracker", None)
    if not isinstance(tracker, ImportanceTracker):
        return "this swap policy has no ImportanceTracker to replace"

    class Counts(ImportanceTracker):
        def observe(self, layer, probs, x_norm):
            ids, _ = topk(probs, self.k)
            cur = self.current[layer]
            cur += np.bincount(ids.ravel(), minlength=cur.shape[0])
            return ids

    policy.tracker = Counts(tracker.norms, tracker.k, tracker.decay)
    return None


def _uniform_view(shards: Path, work: Path) -> Path:
    """A copy of the shard set without its routing trace and plan: slots fall back to uniform.
    (A copy: a shard set refuses files that resolve outside its directory.)"""
    view = work / "bundled-uniform"
    if view.exists():
        shutil.rmtree(view)
    shutil.copytree(shards, view, ignore=shutil.ignore_patterns("routing_trace.npz", "plan.json"))
    return view


def section_ablations(ctx) -> dict:
    shards, gguf = bundled_shards(ctx.work)
    tokens, _ = _tokens(shards, heldout_text(ctx.work).read_text())
    base = ctx.work / "quality-full.logits"
    if not base.exists():
        ppl_run(shards, tokens, ctx.mode, None, save=base)
    out: dict = {}
    q = lambda **cfg: ppl_run(shards, tokens, ctx.mode, base, **cfg)  # noqa: E731
    log("ablation: Eq. 1 against usage counts")
    out["importance"] = {"Eq. 1": q(memory_budget="50%", policy="swap"),
                         "usage counts": q(memory_budget="50%", policy="swap",
                                           tweak=_usage_counts)}
    log("ablation: swap interval")
    out["swap_interval"] = {str(n): q(memory_budget="50%", policy="swap", swap_interval=n)
                            for n in (4, 16, 64)}
    log("ablation: uniform against planned slots")
    view = _uniform_view(shards, ctx.work)
    out["slots"] = {}
    for policy in ("swap", "ondemand"):
        out["slots"][policy] = {
            "planned": q(memory_budget="35%", policy=policy),
            "uniform": ppl_run(view, tokens, ctx.mode, base, memory_budget="35%", policy=policy)}
    log("ablation: adaptive-gating threshold")
    out["gating"] = {}
    for rate in (0.1, 0.25, 0.4):
        t = gating_threshold(shards, rate)
        if t is not None:
            out["gating"][str(rate)] = {"threshold": t, **q(memory_budget="35%",
                                                            policy="ondemand",
                                                            adaptive_gating=t)}
    log("ablation: prefetch depth (speed)")
    extra = [(f"prefetch{d}", {"policy": "ondemand", "n_prefetch": d}) for d in (0, 1, 2)]
    out["prefetch"] = bench_budget(shards, gguf, "35%", ctx.mode.speed_profiles[-1:],
                                   ctx.mode.speed_n, heldout_text(ctx.work), extra=extra,
                                   runners=["full"], pass_relative=True)
    return out


# -- the page ---------------------------------------------------------------------------------

class Context:
    results_dir: Path | None = None
    started: dict = {}

    def save_partial(self, name: str, figures: dict) -> None:
        """Store a long section's figures so far (marked partial) so that a run cut short
        still leaves them on the page."""
        if self.results_dir is None:
            return
        doc = {"figures": figures, "seconds": time.perf_counter() - self.started[name],
               "mode": self.mode.name, "partial": True,
               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join(["scripts/bench.py", *sys.argv[1:]])}
        (self.results_dir / f"{name}.json").write_text(json.dumps(doc, indent=1, default=_json))

    def __init__(self, args):
        self.mode = QUICK if args.quick else FULL
        self.work = Path(args.work)
        self.large_dir = Path(args.large_dir)
        self.generate = not args.no_generate
        self.large_n = args.large_n
        self.large_presets = args.large_presets
        self.work.mkdir(parents=True, exist_ok=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small models and short runs only (< 5 min; CI runs it)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=None,
                    help="run only these sections (default: all of the mode); the others' "
                    "figures are kept from results/")
    ap.add_argument("--out", type=Path, default=ROOT / "docs",
                    help="where RESULTS.md and results/ go (default: docs/)")
    ap.add_argument("--work", default=os.environ.get("EDGEMOE_BENCH_WORK", "/tmp/edgemoe-bench"),
                    help="models and logits built on the way (default: %(default)s)")
    ap.add_argument("--large-dir", default=None,
                    help="where the large shapes live (default: WORK/large; ~40 GB)")
    ap.add_argument("--no-generate", action="store_true",
                    help="do not write missing large shapes; skip them")
    ap.add_argument("--large-n", type=int, default=None, metavar="N",
                    help="decode steps per run on the large shapes (default: 16)")
    ap.add_argument("--large-presets", nargs="+", default=None, metavar="PRESET",
                    help="only these large shapes")
    ap.add_argument("--render-only", action="store_true", help="only rewrite the page")
    args = ap.parse_args(argv)
    args.large_dir = args.large_dir or str(Path(args.work) / "large")
    ctx = Context(args)
    results_dir = args.out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    results = load_results(results_dir)
    if not args.render_only:
        todo = args.sections or [s for s in SECTIONS
                                 if not s.startswith("large") or ctx.mode.large]
        ctx.results_dir = results_dir
        for name in todo:
            t0 = ctx.started[name] = time.perf_counter()
            log(f"section {name}")
            fig = globals()[f"section_{name}"](ctx)
            results[name] = {"figures": fig, "seconds": time.perf_counter() - t0,
                             "mode": ctx.mode.name,
                             "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                             "command": " ".join(["scripts/bench.py", *sys.argv[1:]])}
            # One file per section: a rerun of one section (or two runs of different
            # sections at once) replaces only its own figures.
            (results_dir / f"{name}.json").write_text(json.dumps(results[name], indent=1,
                                                                 default=_json))
    import bench_render

    page = bench_render.render(results, results_dir)
    target = args.out / "RESULTS.md"
    target.write_text(page)
    log(f"wrote {target}")
    return 0


def load_results(results_dir: Path) -> dict:
    """Every section's figures stored in results_dir (one JSON file per section)."""
    out = {}
    legacy = results_dir / "results.json"      # all sections in one file (earlier runs)
    if legacy.exists():
        out.update({k: v for k, v in json.loads(legacy.read_text()).items() if k in SECTIONS})
    for name in SECTIONS:
        path = results_dir / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def _json(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
