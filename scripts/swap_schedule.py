#!/usr/bin/env python3
"""swap's schedules ranked by the planner's quality proxy, beside measured perplexity: does the
proxy's choice track real quality?

    python scripts/swap_schedule.py SHARDS --budget 50% [--trace FILE] [--quality-dir DIR]
                                       [--no-substitutes]

For the slots a run at --budget gets (runtime.choose_slots: plan.json, else the trace's DP), the
real SwapPolicy is replayed over a routing trace (default: SHARDS/routing_trace.npz from
`edgemoe calibrate`; --trace another one, e.g. recorded on the evaluation text itself) for every
interval and decay the planner tries (planner.choose_swap_schedule), and each is printed with its
coverage (top-k router mass on resident experts), hit rate and swaps, best first. With
--quality-dir, the perplexity `scripts/quality_at_budget.py --policies
swap:--swap-interval=N,--swap-decay=D` measured for the same schedule (its JSON files there)
stands beside it, with the rank correlation of proxy and perplexity.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measured_ppl(quality_dir: Path | None, budget: str, interval: int, decay: float,
                 substitutes: bool = True):
    """Perplexity (and its ratio to full) of swap with this schedule from quality_at_budget's
    JSON files, or None."""
    if quality_dir is None:
        return None
    tag = f"swap_swapinterval{interval}_swapdecay{decay:g}" + ("" if substitutes
                                                              else "_nosubstitutes")
    path = quality_dir / f"{tag}_{budget.rstrip('%')}.json"
    full = quality_dir / "full.json"
    if not path.exists() or not full.exists():
        return None
    ppl = json.loads(path.read_text())["ppl"]
    return ppl, ppl / json.loads(full.read_text())["ppl"] - 1.0


def ranks(values: list[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards", type=Path)
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--trace", type=Path, default=None,
                    help="routing trace to replay (default: the shard set's calibration trace)")
    ap.add_argument("--read-tokens", type=float, default=1.0,
                    help="decode steps one expert read takes (default: %(default)s, as a run "
                    "without a plan assumes)")
    ap.add_argument("--quality-dir", type=Path, default=None,
                    help="quality_at_budget.py's --workdir with swap runs per schedule")
    ap.add_argument("-c", "--ctx-size", type=int, default=256)
    ap.add_argument("--no-substitutes", dest="substitutes", action="store_false",
                    help="the slots of a run without the substitute tier, and its measurements "
                    "(quality_at_budget's swap:...,--no-substitutes)")
    args = ap.parse_args()

    from edgemoe.residency import calibration as calib
    from edgemoe.residency.planner import choose_swap_schedule
    from edgemoe.residency.traces import RoutingTrace
    from edgemoe.runtime import (TRACE_FILE, PlanKey, ResidencyConfig, choose_slots,
                                 needs_from_files)
    from edgemoe.shardset import ShardSet

    shards = ShardSet.open(args.shards)
    cfg = ResidencyConfig(memory_budget=args.budget, policy="swap", substitutes=args.substitutes)
    needs = needs_from_files(shards, args.ctx_size, "f16")
    slots = choose_slots(shards, cfg, needs, PlanKey.of(cfg.budget, args.ctx_size, "f16", None))
    trace = RoutingTrace.load(args.trace or args.shards / TRACE_FILE)
    cal = calib.Calibration.load(args.shards)
    schedule = choose_swap_schedule(trace, slots.slots, shards.n_expert_used, cal.norms,
                                    len(slots.slots), args.read_tokens, cal.usage)
    print(f"{args.shards} at {args.budget}: slots {dict(slots.slots)}"
          + (f", substitutes {dict(slots.substitutes)}" if slots.substitutes else "")
          + f"; trace {trace.n_tokens} tokens; reads {args.read_tokens:g} decode steps")
    print(f"{'interval':>8s} {'decay':>5s} {'coverage':>8s} {'hit':>6s} {'swaps':>6s} "
          f"{'PPL':>8s} {'vs full':>8s}")
    rows = sorted(schedule.tried.items(), key=lambda kv: -kv[1].coverage)
    proxy, ppl, keys = [], [], []
    for (interval, decay), r in rows:
        m = measured_ppl(args.quality_dir, args.budget, interval, decay, args.substitutes)
        mark = " <- chosen" if (interval, decay) == (schedule.interval, schedule.decay) else ""
        print(f"{interval:8d} {decay:5g} {r.coverage * 100:7.2f}% {r.hit_rate * 100:5.1f}% "
              f"{r.swaps:6d} " + (f"{m[0]:8.3f} {m[1] * 100:+7.1f}%" if m else f"{'-':>8s} "
                                  f"{'-':>8s}") + mark)
        if m:
            proxy.append(r.coverage)
            ppl.append(m[0])
            keys.append((interval, decay))
    if len(ppl) >= 3:
        rho = float(np.corrcoef(ranks([-p for p in proxy]), ranks(ppl))[0, 1])
        best = min(range(len(ppl)), key=ppl.__getitem__)
        chosen = dict(zip(keys, ppl)).get((schedule.interval, schedule.decay))
        print(f"Spearman rank correlation (higher coverage ~ lower PPL): {rho:+.2f} over "
              f"{len(ppl)} schedules; the chosen schedule's PPL "
              + (f"{chosen:.3f}" if chosen else "not measured")
              + f"; best measured {ppl[best]:.3f} ({keys[best][0]} tok, decay {keys[best][1]:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
