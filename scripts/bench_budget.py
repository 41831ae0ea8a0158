#!/usr/bin/env python3
"""Decode speed of every residency policy under a memory budget on an emulated edge board,
with llama-cpp-python on the exported GGUF alongside.

    sudo /work/venv/bin/python scripts/bench_budget.py SHARDS --gguf MODEL.gguf \\
        --profiles rpi5-sd rpi5-nvme --budget 50% -n 64

For each storage profile of scripts/edge_emulate.py every runner is a child process of this
script, started cold (page cache of the shards / the GGUF dropped) in a memory cgroup whose limit
is the absolute budget, with the disk's read bandwidth throttled:
- full: every expert resident, no memory limit (the reference speed);
- swap, static, ondemand (no prefetch), ondemand +prefetch, ondemand +prefetch +adaptive gating
  (T chosen for a 25% drop rate on the calibration trace): `--memory-budget` = the budget;
- llama.cpp: llama-cpp-python on the exported GGUF (memory-mapped), same limit.
`--budget 50%` is turned into bytes as the runtime counts them: everything the process holds
besides experts (measured in a child: interpreter and libraries, base weights, KV cache, compute
buffers, the read in flight) plus that fraction of the experts' bytes. That byte figure is both
the `--memory-budget` given to edgemoe and the cgroup limit.
Each child prefills the first 12 tokens of a text, then decodes -n more one token per step,
fed from the same text (teacher-forced; after the text, greedy). The default text, BENCH_TEXT, is
held out from `edgemoe calibrate`'s built-in one: the planner predicts from routing on the
calibration text, and a run on other text of the same kind is what it must predict. (Greedy
continuations of a synthetic random model fall into repeating one token, whose routing never
changes: every cache hits, which flatters the caching policies and is no workload.)
The figures are decode tok/s, the residency telemetry (hit rate, bytes read per token, stalls,
swaps), the cgroup's peak usage and OOM kills, and bytes the cgroup read from the disk.
`edgemoe plan`'s prediction for the same budget, measured under the same profile right before
each run (as a user would run it before `edgemoe run`), is printed next to each measured figure.
Needs `edgemoe calibrate SHARDS` first (norms, trace, sensitivities). Without root / cgroups the
runs go unlimited and the peak RSS is compared with the budget instead.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

N_PROMPT = 12

# Held out from DEFAULT_TEXT in edgemoe/cli_budget.py (the calibration text): the same mix of
# narrative, instructions, code and exposition on other subjects.
BENCH_TEXT = """\
The night train left the valley an hour late. Snow had closed the pass the day before, and the
conductor walked the length of the carriages with a lantern, checking that every stove was lit.
In the last compartment two students argued about a chess game while a farmer slept on his coat.

To repair a bicycle puncture, remove the wheel and lever the tyre off the rim. Pull out the inner
tube, pump a little air into it and listen for the hiss, or pass it through a bowl of water and
watch for bubbles. Roughen the area around the hole, spread a thin layer of glue, wait until it is
tacky, and press the patch firmly into place before refitting the tube and the tyre.

def word_counts(lines):
    counts = {}
    for line in lines:
        for word in line.lower().split():
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])

print(word_counts(["the cat sat", "the dog ran"])[:3])

The library board reviewed the opening hours at its autumn meeting. Visitor numbers on weekday
evenings had doubled since the reading room was renovated, while Saturday mornings were quieter
than before. The board voted to open two evenings a week until nine and to trial a children's
story hour on Sunday afternoons.

Water boils at a lower temperature on a mountain because the air pressure there is lower. A liquid
boils when its vapour pressure equals the pressure of the air around it, so with less air pushing
down, fewer degrees of heat are needed. This is why pasta takes longer to cook at altitude and why
pressure cookers, which raise the pressure, cook food faster.
"""


def bench_tokens(shards: str, text: str, need: int) -> list[int]:
    """The text's token ids (the shard set's own vocabulary); at least N_PROMPT + 1 of them."""
    from edgemoe.cli_budget import calibration_tokens

    tokens = calibration_tokens(Path(shards), text, need)
    if len(tokens) <= N_PROMPT:
        raise SystemExit(f"the benchmark text has {len(tokens)} tokens; need more than {N_PROMPT}")
    return tokens


# -- children --------------------------------------------------------------------------------

def _vm_hwm() -> int:
    """This process's peak RSS (VmHWM). Not getrusage: its maxrss also covers the parent that
    forked us before the exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_needs(args) -> dict:
    from edgemoe.engine import Engine
    from edgemoe.runtime import empty_policy, needs_from_files
    from edgemoe.shardset import ShardSet

    shards = ShardSet.open(args.shards)
    needs = needs_from_files(shards, args.n_ctx, "f16")
    k = shards.n_expert_used
    compute = 0
    for name in ("ondemand", "static"):   # exact and masked routing
        with Engine(args.shards, n_ctx=args.n_ctx, n_batch=N_PROMPT, n_threads=args.threads,
                    n_slots=k, policy=empty_policy(name, k)) as probe:
            compute = max(compute, probe.memory()["compute"])
    return {"runtime": needs.runtime_bytes, "fixed_without_compute": needs.fixed_bytes,
            "compute": compute, "experts": needs.expert_bytes_total,
            "minimum": needs.minimum_bytes + compute}


def _decode(eval_one, prefill, text: list[int], n) -> tuple[float, list[int], float]:
    """Prefill text[:N_PROMPT], then n steps of one token each: the text's next token while it
    lasts, then the argmax. Returns (decode tok/s, the greedy prediction at every step, prefill
    tok/s)."""
    t0 = time.perf_counter()
    logits = prefill(text[:N_PROMPT])
    prefill_tok_s = N_PROMPT / (time.perf_counter() - t0)
    out = []
    t0 = time.perf_counter()
    for i in range(n):
        out.append(int(np.argmax(logits)))
        j = N_PROMPT + i
        logits = eval_one(text[j] if j < len(text) else out[-1])
    return n / (time.perf_counter() - t0), out, prefill_tok_s


def child_run(args) -> dict:
    spec = json.loads(args.spec)
    if spec["runner"] == "llama.cpp":
        from bench_vs_llamacpp import LlamaRunner

        runner = LlamaRunner(Path(args.gguf), args.n_ctx, args.threads, N_PROMPT, False)
        tok_s, tokens, prefill_tok_s = _decode(runner.step, runner.prefill, spec["text"], args.n)
        runner.close()
        return {"tok_s": tok_s, "prefill_tok_s": prefill_tok_s, "tokens": tokens,
                "peak_rss": _vm_hwm()}
    from edgemoe.runtime import ResidencyConfig, open_engine

    cfg = ResidencyConfig(memory_budget=spec.get("budget"), policy=spec["policy"],
                          n_prefetch=spec.get("n_prefetch", 1),
                          adaptive_gating=spec.get("adaptive_gating"),
                          swap_interval=spec.get("swap_interval"),
                          quality=spec.get("quality"),
                          substitutes=spec.get("substitutes", True))
    t0 = time.perf_counter()
    engine, plan = open_engine(args.shards, cfg, n_ctx=args.n_ctx, n_batch=N_PROMPT,
                               n_threads=args.threads)
    opened = time.perf_counter() - t0
    from edgemoe.residency.telemetry import record

    if args.replay and not engine.policy.masked:
        from edgemoe.residency.traces import ReplayPolicy, SelectionTrace

        engine.policy = ReplayPolicy(engine.policy, SelectionTrace.load(args.replay))
    with engine:
        marks = {}

        def prefill(prompt):
            logits = engine.eval(prompt, all_logits=False)[-1]
            marks["before"] = engine.policy.telemetry.counters   # decode figures only
            return logits

        tok_s, tokens, prefill_tok_s = _decode(lambda t: engine.eval([t])[-1], prefill,
                                               spec["text"], args.n)
        decode = record(engine.policy.telemetry.counters - marks["before"],
                        engine.policy.telemetry.resident_bytes)
        summary = engine.policy.telemetry.summary()
        memory = engine.memory()
    return {"tok_s": tok_s, "prefill_tok_s": prefill_tok_s, "tokens": tokens, "open_s": opened,
            "decode": decode,
            "summary": summary, "slots": plan.slots if plan else None, "memory": memory,
            "peak_rss": _vm_hwm()}


def child_plan(args) -> dict:
    from edgemoe.cli_budget import measure_profile, plan_shards

    spec = json.loads(args.spec)
    profile = measure_profile(args.shards, args.threads, prompt=spec["text"][:N_PROMPT])
    common = dict(n_ctx=args.n_ctx, n_batch=N_PROMPT, n_threads=args.threads,
                  profile=profile, write=False, prompt_tokens=N_PROMPT, decode_tokens=args.n)
    # Each ondemand run has its prefetch depth fixed, so is each prediction (a plan left to
    # itself picks the fastest depth: `edgemoe plan` prints it and `run` uses it).
    preds, lines, _ = plan_shards(args.shards, spec["budget"], n_prefetch=1, **common)
    out = {p.policy: p.tok_per_s for p in preds}
    if spec.get("adaptive_gating") is not None:
        preds, more, _ = plan_shards(args.shards, spec["budget"], "ondemand", n_prefetch=1,
                                     adaptive_gating=spec["adaptive_gating"], **common)
        out["ondemand+gating"] = preds[0].tok_per_s
        lines += more
    preds, more, _ = plan_shards(args.shards, spec["budget"], "ondemand", n_prefetch=0, **common)
    out["ondemand-noprefetch"] = preds[0].tok_per_s
    return {"predicted": out, "lines": lines}


# -- the parent ------------------------------------------------------------------------------

def _child(args, mode, spec=None, profile=None, mem=None, drop=()):
    cmd = [sys.executable, str(Path(__file__).resolve()), args.shards, "--child", mode,
           "-n", str(args.n), "--n-ctx", str(args.n_ctx), "--threads", str(args.threads)]
    if args.gguf:
        cmd += ["--gguf", args.gguf]
    if args.replay:
        cmd += ["--replay", args.replay]
    if spec is not None:
        cmd += ["--spec", json.dumps(spec)]
    if profile is None and mem is None:
        p = subprocess.run(cmd, capture_output=True, text=True)
        return _parse(p.returncode, p.stdout, p.stderr), None
    from edge_emulate import run_limited

    res = run_limited(cmd, profile=profile, mem=mem, drop=list(drop), capture=True,
                      throttle_paths=[args.shards], timeout=args.timeout)
    return _parse(res.rc, res.stdout, res.stderr), res


def _parse(rc, stdout, stderr):
    lines = [l for l in (stdout or "").splitlines() if l.startswith("{")]
    if rc != 0 or not lines:
        return {"error": f"exit {rc}: {(stderr or '').strip().splitlines()[-1:] or ''}"}
    return json.loads(lines[-1])


def adaptive_threshold(shards: str, rate: float) -> float | None:
    from edgemoe.residency.calibration import Calibration
    from edgemoe.residency.routing import topk
    from edgemoe.residency.sensitivity import threshold_for_drop_rate
    from edgemoe.residency.traces import RoutingTrace
    from edgemoe.runtime import TRACE_FILE

    from edgemoe.errors import ShardSetError

    try:
        cal = Calibration.load(shards)
    except ShardSetError:   # not calibrated: no sensitivities, no gating
        return None
    if not cal.sensitivity:
        return None
    trace = RoutingTrace.load(Path(shards) / TRACE_FILE)
    from edgemoe.shardset import ShardSet

    k = ShardSet.open(shards).n_expert_used
    w_last = {l: topk(trace.probs[l], k, renormalize=True)[1][:, -1] for l in trace.layers}
    return threshold_for_drop_rate(cal.sensitivity, w_last, rate)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards")
    ap.add_argument("--gguf", help="the same model exported as one GGUF (`edgemoe export`)")
    ap.add_argument("--profiles", nargs="+", default=["rpi5-sd", "rpi5-nvme"])
    ap.add_argument("--budget", default="50%", help="percentage of expert bytes or a size")
    ap.add_argument("--policies", nargs="+", default=None,
                    help="runners (default: every policy edgemoe has, ondemand without and with "
                    "prefetch and with adaptive gating, and llama.cpp)")
    ap.add_argument("--text", metavar="FILE",
                    help="text to decode (default: BENCH_TEXT, held out from calibration)")
    ap.add_argument("-n", type=int, default=64, help="tokens decoded per run")
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads of every runner (default 1: on a shared machine ggml's "
                    "spinning workers lose badly when the cores are oversubscribed)")
    ap.add_argument("--drop-rate", type=float, default=0.25,
                    help="adaptive gating: T for this fraction of single-expert decisions")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-plan", action="store_true", help="skip the planner's predictions")
    ap.add_argument("--plan-once", action="store_true",
                    help="profile and plan once per storage profile, not right before each run "
                    "(this machine's speed drifts by 20-30%% over minutes)")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=JSON",
                    help='another edgemoe runner, e.g. \'prefetch2={"policy": "ondemand", '
                    '"n_prefetch": 2}\' (runs under the budget; keys: policy, n_prefetch, '
                    'adaptive_gating, swap_interval, quality, substitutes); repeatable, added '
                    'to --policies')
    ap.add_argument("--pass-relative", action="store_true",
                    help="with a percentage budget: give edgemoe the percentage (of expert "
                    "bytes) and use the byte figure as the cgroup limit only; for models so "
                    "small that the interpreter's own size varies more than the experts weigh")
    ap.add_argument("--replay", metavar="TRACE.npz",
                    help="force this recorded routing (a SelectionTrace: ids.L / weights.L per "
                    "token) into the exact-routing runners (ondemand); masked policies and "
                    "llama.cpp route by the weights")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--child", choices=["needs", "run", "plan"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        out = {"needs": child_needs, "run": child_run, "plan": child_plan}[args.child](args)
        print(json.dumps(out, default=lambda o: {str(k): v for k, v in o.items()}
                         if isinstance(o, dict) else str(o)))
        return 0

    import signal

    from edge_emulate import _sigterm_as_interrupt, unavailable_reason

    # A kill of this parent unwinds through run_limited, which removes the child's cgroups.
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)

    from edgemoe.residency.budget import format_bytes, parse_budget

    no_cgroup = unavailable_reason()
    if no_cgroup:
        print(f"edge emulation unavailable ({no_cgroup}): runs are unlimited, peak RSS is "
              "compared with the budget", file=sys.stderr)
    needs, _ = _child(args, "needs")
    if "error" in needs:
        print(f"needs: {needs['error']}", file=sys.stderr)
        return 1
    budget = parse_budget(args.budget)
    fixed = needs["fixed_without_compute"] + needs["compute"]
    limit = (budget.bytes if not budget.relative
             else int(fixed + budget.fraction * needs["experts"]))
    print(f"budget {args.budget}: {limit} bytes ({format_bytes(limit)}) = fixed "
          f"{format_bytes(fixed)} (runtime {format_bytes(needs['runtime'])}, compute "
          f"{format_bytes(needs['compute'])}) + experts {format_bytes(limit - fixed)} of "
          f"{format_bytes(needs['experts'])}; minimum {format_bytes(needs['minimum'])}")
    threshold = adaptive_threshold(args.shards, args.drop_rate)
    text = bench_tokens(args.shards, Path(args.text).read_text() if args.text else BENCH_TEXT,
                        N_PROMPT + args.n)
    if len(text) < N_PROMPT + args.n:
        print(f"the text has {len(text)} tokens: the last {N_PROMPT + args.n - len(text)} of "
              f"{args.n} decode steps feed the greedy prediction instead", file=sys.stderr)
    edgemoe_budget = args.budget if args.pass_relative and budget.relative else limit
    specs = runner_specs(edgemoe_budget, threshold)
    args.policies = args.policies or list(specs)
    for item in args.extra:
        name, _, body = item.partition("=")
        try:
            extra = json.loads(body)
        except ValueError as exc:
            print(f"--extra {item!r}: not NAME=JSON ({exc})", file=sys.stderr)
            return 2
        specs[name] = {"runner": "edgemoe", "budget": str(edgemoe_budget), **extra}
        args.policies.append(name)
    unknown = [p for p in args.policies if p not in specs]
    if unknown:
        print(f"unknown runner(s) {', '.join(unknown)}; known: {', '.join(specs)}", file=sys.stderr)
        return 2
    plan_key = {"full": "full", "swap": "swap", "static": "static",
                "ondemand": "ondemand-noprefetch", "ondemand+prefetch": "ondemand",
                "ondemand+gating": "ondemand+gating"}
    results = {"budget_bytes": limit, "needs": needs, "threshold": threshold, "profiles": {}}
    for profile in (None,) if no_cgroup else args.profiles:
        name = profile or "unlimited"
        rows = results["profiles"][name] = {}
        predicted = {}
        for key in args.policies:
            if key == "llama.cpp" and not args.gguf:
                continue
            if key == "ondemand+gating" and threshold is None:
                continue
            if not args.no_plan and key in plan_key and key != "full" and (
                    not predicted or not args.plan_once):
                plan, _ = _child(args, "plan", {"budget": str(limit),
                                                "adaptive_gating": threshold, "text": text},
                                 profile=profile, drop=[args.shards])
                predicted = plan.get("predicted", {})
                rows.setdefault("plans", {})[key] = plan
            spec = {**specs[key], "text": text}
            mem = None if key == "full" or no_cgroup else limit
            drop = [args.gguf] if key == "llama.cpp" else [args.shards]
            out, res = _child(args, "run", spec, profile=profile, mem=mem, drop=drop)
            if res is not None:
                out.update(peak=res.peak_bytes, oom=res.oom, oom_kills=res.oom_kills,
                           disk_read=res.read_bytes, limit=res.mem_limit)
            out["predicted_tok_s"] = predicted.get(plan_key.get(key, ""), None)
            rows[key] = out
            print(_row(name, key, out, limit), flush=True)
        _ratios(name, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


def runner_specs(limit: int | str, threshold: float | None) -> dict[str, dict]:
    """Every runner: each policy edgemoe has (the runtime's list, so new ones are benchmarked
    too) under the budget -- full without one --, ondemand without and with prefetch and with
    adaptive gating, and llama.cpp."""
    from edgemoe.runtime import POLICIES

    specs = {}
    for name in POLICIES:
        if name == "ondemand":
            specs["ondemand"] = {"runner": "edgemoe", "policy": "ondemand", "budget": str(limit),
                                 "n_prefetch": 0}
            specs["ondemand+prefetch"] = {"runner": "edgemoe", "policy": "ondemand",
                                          "budget": str(limit), "n_prefetch": 1}
            if threshold is not None:
                specs["ondemand+gating"] = {"runner": "edgemoe", "policy": "ondemand",
                                            "budget": str(limit), "n_prefetch": 1,
                                            "adaptive_gating": threshold}
                # Per-miss decisions: wait / substitute / drop by s_l * w^2 (`--quality`).
                for quality in ("balanced", "fast"):
                    specs[f"ondemand+{quality}"] = {"runner": "edgemoe", "policy": "ondemand",
                                                    "budget": str(limit), "n_prefetch": 1,
                                                    "quality": quality}
        elif name == "full":
            specs["full"] = {"runner": "edgemoe", "policy": "full"}
        else:
            specs[name] = {"runner": "edgemoe", "policy": name, "budget": str(limit)}
    specs["llama.cpp"] = {"runner": "llama.cpp"}
    return specs


def _row(profile, key, out, limit) -> str:
    if "error" in out:
        return f"{profile:10s} {key:18s} FAILED {out['error']}"
    d = out.get("decode") or {}
    peak = out.get("peak")
    parts = [f"{profile:10s} {key:18s} {out['tok_s']:7.2f} tok/s"]
    if out.get("predicted_tok_s"):
        p = out["predicted_tok_s"]
        parts.append(f"plan {p:7.2f} ({(p / out['tok_s'] - 1) * 100:+.0f}%)")
    if d.get("hit_rate") is not None:
        parts.append(f"hit {d['hit_rate'] * 100:5.1f}%")
    if d.get("bytes_read_per_token") is not None:
        parts.append(f"read {d['bytes_read_per_token'] / 2**20:6.2f} MiB/tok")
    if d.get("stall_seconds_per_token") is not None:
        parts.append(f"stall {d['stall_seconds_per_token'] * 1e3:6.1f} ms/tok")
    if d.get("experts_per_token") is not None:
        parts.append(f"{d['experts_per_token']:.2f} exp/layer")
    if out.get("disk_read") is not None:
        parts.append(f"disk {out['disk_read'] / 2**20:7.1f} MiB")
    for label, value in (("cgroup peak", peak), ("rss", out.get("peak_rss"))):
        if value is not None:
            verdict = "" if key == "full" else f" ({'<=' if value <= limit else '>'} budget)"
            parts.append(f"{label} {value / 2**20:7.1f} MiB{verdict}")
    if out.get("oom"):
        parts.append("OOM-KILLED")
    return "  ".join(parts)


def _ratios(profile, rows) -> None:
    tok = {k: v["tok_s"] for k, v in rows.items() if isinstance(v, dict) and "tok_s" in v}
    pairs = [("swap", "full", 0.7), ("swap", "llama.cpp", 5.0), ("ondemand+prefetch", "llama.cpp", 2.0),
             ("ondemand", "llama.cpp", 2.0)]
    for a, b, target in pairs:
        if a in tok and b in tok:
            r = tok[a] / tok[b]
            print(f"{profile:10s} {a} / {b} = {r:.2f}x (target >= {target}x: "
                  f"{'met' if r >= target else 'MISSED'})")


if __name__ == "__main__":
    sys.exit(main())
