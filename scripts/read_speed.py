#!/usr/bin/env python3
"""Cold expert reads as the pool makes them (edgemoe.pool.read_span): O_DIRECT against buffered
pread + POSIX_FADV_DONTNEED, MB/s and CPU per read. Run it under scripts/edge_emulate.py to see
a board's storage.

    python scripts/read_speed.py SHARDS [--experts 96] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edgemoe.pool as pool  # noqa: E402
from edgemoe.shardset import ShardSet  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards")
    ap.add_argument("--experts", type=int, default=96, help="experts read per pass")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    experts = list(ShardSet.open(args.shards).experts())[: args.experts]
    total = sum(s.data_bytes for s in experts)
    direct_ok = pool._direct
    for _ in range(args.repeats):
        for direct in ((True, False) if direct_ok else (False,)):
            pool._direct = direct
            for s in experts:   # cold: whatever the page cache holds of these files goes
                fd = os.open(s.path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            t0, c0 = time.perf_counter(), time.process_time()
            for s in experts:
                pool.read_span(s.path, s.data_offset, s.data_bytes)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"{'O_DIRECT' if direct else 'buffered':8s} {total / wall / 1e6:7.0f} MB/s  "
                  f"{cpu / len(experts) * 1e3:5.2f} ms CPU per read  "
                  f"{wall / len(experts) * 1e3:6.2f} ms per read ({len(experts)} experts)")
    if not direct_ok:
        print("this filesystem refuses O_DIRECT: buffered reads only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
