#!/usr/bin/env python3
"""What the read-time crc32 checks cost: decode speed with them on and off, side by side in one
process (one thread, the same engine, runs alternating), under a residency policy that reads
experts while it decodes (ondemand by default: every miss is a read, checked before it runs).

    python scripts/bench_checksums.py SHARDS [--budget 50%] [--policy ondemand] [--tokens 64]

Prints decode tok/s of each run, the median of each setting, their ratio, the expert bytes read
per token, zlib.crc32's own speed on one expert's data run, the time the checks took as timed
inside the pool, and CPU time per token on and off (what the checks cost in work, which other
processes' load does not blur the way it blurs wall-clock speed).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import edgemoe  # noqa: E402
from edgemoe.shardset import ShardSet  # noqa: E402

PROMPTS = ["ROMEO: what light through yonder window breaks? It is the east,",
           "The history of the kingdom begins with a quarrel between two brothers",
           "def parse(text):\n    tokens = text.split()\n    for",
           "In the morning the market fills with fishermen and their nets"]


def _cpu() -> float:
    """CPU seconds this process used (every thread: the decode and the expert loader)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards", type=Path)
    p.add_argument("--budget", default="50%")
    p.add_argument("--policy", default="ondemand")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()

    shard = next(ShardSet.open(args.shards).experts())
    run = np.frombuffer(shard.path.read_bytes()[shard.data_offset:shard.data_offset +
                                                 shard.data_bytes], dtype=np.uint8)
    t0 = time.perf_counter()
    for _ in range(50):
        zlib.crc32(run)
    crc_rate = 50 * run.nbytes / (time.perf_counter() - t0)
    print(f"zlib.crc32: {crc_rate / 1e9:.2f} GB/s on a {run.nbytes / 2**20:.2f} MiB expert run")

    speeds: dict[bool, list[float]] = {True: [], False: []}
    per_token: dict[bool, list[float]] = {True: [], False: []}
    share: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    with edgemoe.Model(args.shards, n_ctx=512, n_threads=1, memory_budget=args.budget,
                       policy=args.policy) as m:
        pool = m.engine.pool
        for r in range(args.rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                pool.check_crc = on
                m.reset()
                before, checks = pool.bytes_read, pool.check_seconds
                cpu0 = _cpu()
                m.generate(PROMPTS[r % len(PROMPTS)], max_tokens=args.tokens, temperature=0)
                s = m.last_stats
                speeds[on].append(s.decode_tokens_per_second)
                cpu[on].append((_cpu() - cpu0) / max(s.n_generated, 1))
                share[on].append((pool.check_seconds - checks) / (s.prefill_seconds +
                                                                 s.decode_seconds))
                per_token[on].append((pool.bytes_read - before) / max(s.n_generated, 1))
                print(f"round {r} checksums {'on ' if on else 'off'}: decode "
                      f"{s.decode_tokens_per_second:7.2f} tok/s, "
                      f"{per_token[on][-1] / 2**20:.2f} MiB read per token, checks "
                      f"{100 * share[on][-1]:.2f}% of the generation's time, "
                      f"{1e3 * cpu[on][-1]:.2f} ms CPU per token", flush=True)
    pairs = [a / b for a, b in zip(speeds[True], speeds[False])]
    print(f"checks took {100 * statistics.median(share[True]):.2f}% (median) of the generation "
          f"time with checksums on (timed inside the pool; first reads crc32, re-reads word sums)")
    print(f"on/off decode speed per round: {', '.join(f'{x:.3f}' for x in pairs)}; median "
          f"{statistics.median(pairs):.4f}")
    c_on, c_off = statistics.median(cpu[True]), statistics.median(cpu[False])
    print(f"CPU time per token (all threads; robust to other load): on {1e3 * c_on:.2f} ms, off "
          f"{1e3 * c_off:.2f} ms: checks cost {100 * (c_on / c_off - 1):+.2f}%")
    on, off = statistics.median(speeds[True]), statistics.median(speeds[False])
    print(f"median decode: on {on:.2f} tok/s, off {off:.2f} tok/s; on/off = {on / off:.4f} "
          f"({100 * (1 - on / off):+.2f}% cost); read per token "
          f"{statistics.mean(per_token[True]) / 2**20:.2f} MiB (on), "
          f"{statistics.mean(per_token[False]) / 2**20:.2f} MiB (off)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
