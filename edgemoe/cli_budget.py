"""`edgemoe calibrate` and `edgemoe plan`.

calibrate SHARDS [--text FILE]: runs the model on calibration text (teacher-forced, every
expert resident) and stores beside the shard set
- calibration.json: ||E_i|| of every expert, how often each expert was in the router's top-k,
  and per-layer sensitivities s_l for adaptive gating, measured "isolated": the last-ranked expert
  of one layer is dropped at one position and the KL divergence this causes there and over the
  following `--window` positions is fitted against that expert's weight squared;
- routing_trace.npz: per token and expert layer the router's probabilities, the norm of the
  experts' input and the next layer's router applied to it (the prefetch predictor).

plan SHARDS --budget X [--policy P]: will it fit, how (slots per layer from the slot DP), how fast
(decode tok/s, hit rate, bytes read per token from the planner's model fed with measured read
times of the shards' device and measured compute times of this machine), and swap's interval and
importance decay (the schedule whose replay over the calibration trace keeps the most top-k
router mass on resident experts); writes plan.json that `edgemoe run` uses for the same budget.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from edgemoe.cli import ranged
from edgemoe.shardset import write_atomic
from edgemoe.errors import EdgeMoeError
from edgemoe.residency import calibration as calib
from edgemoe.residency.budget import expert_allowance, parse_budget
from edgemoe.residency.traces import RoutingTrace
from edgemoe.runtime import PLAN_FILE, POLICIES, TRACE_FILE, PlanKey, substitute_bytes

# Used when no --text is given: plain prose on several topics, so routing sees some variety.
DEFAULT_TEXT = """\
The harbour was quiet before dawn. Fishing boats rocked against the stone quay while the gulls
waited on the roofs of the sheds, and an old man mended a net by the light of a paraffin lamp.
When the tide turned, the first engines coughed into life and the boats slipped out one by one.

To bake bread, mix flour, water, salt and yeast into a rough dough and let it rest for twenty
minutes. Knead until the dough is smooth and springs back when pressed, then leave it covered in
a warm place until it has doubled in size. Shape the loaf, let it rise again, and bake it in a hot
oven until the crust is brown and the base sounds hollow when tapped.

def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

for i in range(10):
    print(i, fibonacci(i))

The committee met on Tuesday to discuss the budget for the coming year. The treasurer reported
that income from membership fees had fallen by eight percent, while the cost of renting the hall
had risen. After a long debate the members agreed to raise the annual fee and to hold two
fundraising events in the spring.

A prime number has exactly two divisors, one and itself. Every integer greater than one can be
written as a product of primes in exactly one way, apart from the order of the factors. There are
infinitely many primes: if there were a largest one, the product of all primes plus one would
have a prime factor missing from the list.
"""


def calibration_tokens(shards_path: Path, text: str, limit: int) -> list[int]:
    from edgemoe.shardset import ShardSet
    from edgemoe.tokenizer import Vocab

    with Vocab(ShardSet.open(shards_path).base_path) as vocab:
        tokens = vocab.tokenize(text)
    if len(tokens) < 8:
        raise EdgeMoeError(f"calibration text has {len(tokens)} tokens; need at least 8")
    return tokens[:limit]


def _engine_opener(shards_path: Path, n_threads: int | None, **fixed):
    """open(policy=None, **kw) -> an Engine on the shard set (calibration and profiling open
    the engines they watch)."""
    from edgemoe.engine import Engine

    return lambda **kw: Engine(shards_path, n_threads=n_threads, **{**fixed, **kw})


def calibrate(shards_path: str | Path, tokens: list[int], samples: int = 16, window: int = 16,
              n_threads: int | None = None, seed: int = 0,
              n_ctx: int | None = None) -> tuple[calib.Calibration, RoutingTrace]:
    """Norms, usage, sensitivities and the routing trace of `tokens` (residency.calibration)."""
    from edgemoe.shardset import ShardSet

    shards_path = Path(shards_path)
    opener = _engine_opener(shards_path, n_threads, n_ctx=len(tokens),
                            n_batch=min(256, len(tokens)))
    return calib.calibrate(opener, ShardSet.open(shards_path), tokens, samples, window, seed,
                           n_ctx)


def measure_profile(shards_path: str | Path, n_threads: int | None = None, n_decode: int = 64,
                    device: str | None = None):
    """The planner's Profile measured on this machine and device (residency.profiling)."""
    from edgemoe.residency.profiling import measure_profile as measure
    from edgemoe.shardset import ShardSet

    shards_path = Path(shards_path)
    return measure(ShardSet.open(shards_path), _engine_opener(shards_path, n_threads, device=device),
                   n_decode)


def plan_shards(shards_path: str | Path, budget_text: str, policy: str | None = None,
                n_ctx: int = 2048, n_batch: int = 512, kv_type: str = "f16",
                n_threads: int | None = None, n_prefetch: int | None = None,
                adaptive_gating: float | None = None, profile=None, write: bool = True,
                prompt_tokens: int = 32, decode_tokens: int = 256, device: str | None = None):
    """The `edgemoe plan` answer: (predictions, report lines, plan document), for `device`
    (None: the best available, as `run` picks)."""
    from edgemoe.engine import Engine
    from edgemoe.residency.planner import plan as make_plans
    from edgemoe.runtime import empty_policy, needs_from_files
    from edgemoe.shardset import ShardSet

    shards_path = Path(shards_path)
    shards = ShardSet.open(shards_path)
    budget = parse_budget(budget_text)
    needs = needs_from_files(shards, n_ctx, kv_type)
    expert_allowance(budget, needs)   # below the minimum: say so before measuring anything
    if not budget.relative:
        k = shards.n_expert_used
        with Engine(shards_path, n_ctx=n_ctx, n_batch=n_batch, kv_type=kv_type, n_slots=k,
                    policy=empty_policy("ondemand", k), n_outputs=1,
                    measure_only=True, device=device) as probe:
            compute = probe.memory()["compute"]
        needs = needs_from_files(shards, n_ctx, kv_type, compute, needs.runtime_bytes)
    cal = calib.Calibration.load(shards_path)
    trace_path = shards_path / TRACE_FILE
    if not trace_path.exists():
        raise EdgeMoeError(f"{trace_path}: no routing trace; run `edgemoe calibrate` first")
    trace = RoutingTrace.load(trace_path)
    if adaptive_gating is not None and cal.sensitivity is None:
        raise EdgeMoeError(f"{shards_path}: --adaptive-gating needs sensitivities; run "
                           "`edgemoe calibrate` on a model with top-k > 1")
    profile = profile or measure_profile(shards_path, n_threads, device=device)
    thresholds = None
    if cal.sensitivity is not None:
        # --quality's wait thresholds, from the same calibration routing.
        from edgemoe.residency.sensitivity import balanced_wait_threshold

        thresholds = {"balanced": balanced_wait_threshold(cal.sensitivity, trace.probs,
                                                          shards.n_expert_used),
                      "fast": math.inf}
    preds, lines = make_plans(budget, needs, trace, profile, norms=cal.norms,
                              n_prefetch=n_prefetch, sensitivity=cal.sensitivity,
                              threshold=adaptive_gating, usage=cal.usage,
                              prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
                              substitute_bytes=(substitute_bytes(shards)
                                                if shards.substitute_type else None),
                              wait_thresholds=thresholds)
    if policy is not None:
        preds = [p for p in preds if p.policy == policy]
    doc = {**PlanKey.of(budget, n_ctx, kv_type, device).fields(),
           "profile": {"read_bytes_per_s": profile.read_bytes_per_s,
                       "read_latency_s": profile.read_latency_s,
                       "sustained_bytes_per_s": profile.sustained_bytes_per_s,
                       "burst_bytes": profile.burst_bytes,
                       "fused_seconds": profile.fused_seconds,
                       "other_seconds": profile.other_seconds,
                       "copy_bytes_per_s": profile.copy_bytes_per_s},
           "policies": {p.policy: {"slots": {str(l): int(n) for l, n in p.slots.items()},
                                   "tok_per_s": p.tok_per_s, "hit_rate": p.hit_rate,
                                   "bytes_read_per_token": p.bytes_read_per_token,
                                   "swap_interval": p.swap_interval,
                                   "swap_decay": p.swap_decay,
                                   "swap_coverage": p.coverage,
                                   "prefetch_accuracy": p.prefetch_accuracy,
                                   "n_prefetch": p.n_prefetch}
                        for p in preds}}
    ondemand = doc["policies"].get("ondemand")
    if ondemand is not None and thresholds is not None:
        ondemand["wait_thresholds"] = {"balanced": thresholds["balanced"]}
        tiers = next(p.tiers for p in preds if p.policy == "ondemand")
        if tiers:
            # The split of the bytes between substitutes and full slots, per --quality.
            ondemand["tiers"] = {
                t.quality: {"substitutes": {str(l): int(t.chosen.count) for l in t.slots},
                            "slots": {str(l): int(n) for l, n in t.slots.items()},
                            "tok_per_s": t.chosen.tok_per_s,
                            "served_share": t.chosen.replay.served_share}
                for t in tiers}
    sustained = (f" ({profile.sustained_bytes_per_s / 1e6:.0f} MB/s sustained after a "
                 f"{profile.burst_bytes / 1e6:.1f} MB burst)"
                 if profile.sustained_bytes_per_s else "")
    lines.insert(1, f"storage: {profile.read_bytes_per_s / 1e6:.0f} MB/s{sustained}, "
                    f"{profile.read_latency_s * 1e3:.2f} ms per read; compute "
                    f"{profile.fused_seconds * 1e3:.1f} ms/token in one graph (masked routing)"
                    + (f"; host -> {doc['device']} copies {profile.copy_bytes_per_s / 1e6:.0f} MB/s"
                       if profile.copy_bytes_per_s else ""))
    if write:
        write_atomic(shards_path / PLAN_FILE, json.dumps(doc, indent=1).encode())
        lines.append(f"wrote {shards_path / PLAN_FILE} (used by `edgemoe run --memory-budget "
                     f"{budget_text}`)")
    return preds, lines, doc


def _calibrate_cmd(args: argparse.Namespace) -> int:
    path = Path(args.shards)
    text = Path(args.text).read_text(errors="replace") if args.text else DEFAULT_TEXT
    tokens = calibration_tokens(path, text, args.tokens)
    t0 = time.perf_counter()
    cal, trace = calibrate(path, tokens, args.samples, args.window, args.threads,
                           n_ctx=args.ctx_size)
    saved = cal.save(path)
    trace.save(path / TRACE_FILE)
    print(f"calibrated on {len(tokens)} tokens in {time.perf_counter() - t0:.1f} s: "
          f"wrote {saved} and {path / TRACE_FILE}")
    if cal.sensitivity:
        print("sensitivity s_l (isolated): " + " ".join(
            f"{l}:{s:.3g}" for l, s in sorted(cal.sensitivity.items())))
    return 0


def _plan_cmd(args: argparse.Namespace) -> int:
    try:
        _, lines, _ = plan_shards(args.shards, args.budget, args.policy, args.ctx_size,
                                  args.batch_size, n_threads=args.threads,
                                  n_prefetch=args.n_prefetch,
                                  adaptive_gating=args.adaptive_gating, write=not args.no_write,
                                  prompt_tokens=args.prompt_tokens, decode_tokens=args.tokens,
                                  device=args.device)
    except ValueError as exc:
        raise EdgeMoeError(str(exc)) from None
    print("\n".join(lines))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="will a shard set fit a memory budget, how, and how fast",
        description="Predict, for a memory budget, the expert slots per layer and the decode "
        "speed, hit rate and bytes read per token of each residency policy, from measured "
        "read and compute times and the routing trace `edgemoe calibrate` stored; writes "
        f"{PLAN_FILE} beside the shards for `edgemoe run` to use.")
    p.add_argument("shards", metavar="SHARDS", help="shard-set directory")
    p.add_argument("--budget", required=True, metavar="SIZE|PCT",
                   help="memory budget: 2GiB, 1.5GB, 512MiB (the whole process) or 50%% (of the "
                   "experts' bytes)")
    p.add_argument("--policy", choices=POLICIES, default=None,
                   help="report only this policy (default: every policy that can run)")
    p.add_argument("-c", "--ctx-size", type=ranged(int, 1), default=2048, metavar="N")
    p.add_argument("-b", "--batch-size", type=ranged(int, 1), default=512, metavar="N")
    p.add_argument("-t", "--threads", type=ranged(int, 1, 1024), default=None, metavar="N")
    p.add_argument("--device", default=None,
                   help="the device `run --device` will use (default: the best available); "
                   "its compute and host -> device copy speed are measured")
    p.add_argument("--n-prefetch", type=ranged(int, 0), default=None, metavar="N",
                   help="ondemand: predicted experts prefetched per layer (default: the fastest "
                   "of 0, 1 and 2 on this storage, which `edgemoe run` then uses)")
    p.add_argument("--adaptive-gating", type=ranged(float, 0.0), default=None, metavar="T",
                   help="ondemand: drop the last expert when s_l * w^2 < T")
    p.add_argument("--prompt-tokens", type=ranged(int, 1), default=32, metavar="N",
                   help="ondemand: the run's prompt length; the cache fills from it, and decode "
                   "pays for the slots it left free (default: %(default)s)")
    p.add_argument("-n", "--tokens", type=ranged(int, 1), default=256, metavar="N",
                   help="ondemand: tokens the run decodes (default: %(default)s; at most what "
                   "the calibration trace holds after the prompt)")
    p.add_argument("--no-write", action="store_true", help=f"do not write {PLAN_FILE}")
    p.set_defaults(func=_plan_cmd)

    c = subparsers.add_parser(
        "calibrate", help="routing statistics, expert norms and sensitivities of a shard set",
        description="Run the model on calibration text and store expert norms, usage counts "
        f"and per-layer sensitivities ({calib.FILE_NAME}) and the routing trace ({TRACE_FILE}) "
        "beside the shard set.")
    c.add_argument("shards", metavar="SHARDS", help="shard-set directory")
    c.add_argument("--text", metavar="FILE", default=None,
                   help="calibration text (default: a built-in mix of prose, a recipe and code)")
    c.add_argument("--tokens", type=ranged(int, 1), default=512, metavar="N",
                   help="use at most N tokens of the text (default: %(default)s)")
    c.add_argument("--samples", type=ranged(int, 0), default=16, metavar="N",
                   help="positions sampled per layer for the sensitivities, 0 = none "
                   "(default: %(default)s)")
    c.add_argument("--window", type=ranged(int, 1), default=16, metavar="N",
                   help="positions over which a dropped expert's KL is summed "
                   "(default: %(default)s)")
    c.add_argument("-c", "--ctx-size", type=ranged(int, 8), default=256, metavar="N",
                   help="read the text in windows of N tokens, each from an empty context, as "
                   "runs of that length see it (a model routes differently at positions it was "
                   "not trained at; swap's schedule and the slot DP follow the recorded routing) "
                   "(default: %(default)s)")
    c.add_argument("-t", "--threads", type=ranged(int, 1, 1024), default=None, metavar="N")
    c.set_defaults(func=_calibrate_cmd)
