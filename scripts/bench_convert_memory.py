#!/usr/bin/env python3
"""Peak memory of `edgemoe convert` on a >= 2 GB bf16 checkpoint.

    python scripts/bench_convert_memory.py                       # build or reuse, convert, report
    python scripts/bench_convert_memory.py --checkpoint DIR --expert-type Q8_0

Builds a synthetic qwen3_moe checkpoint with scripts/make_synthetic.py (or reuses one), starts
`python -m edgemoe convert` as a child process with the checkpoint's page cache dropped, and
measures:
- peak RSS: the converter's VmHWM (the kernel's own high-water mark, read from
  /proc/<pid>/status every 5 ms until exit), and the largest VmRSS seen by that polling;
- page cache caused: as root with a memory cgroup, the child runs in its own group (limit = this
  machine's RAM, so nothing is forced out); the group's peak usage counts RSS plus every page of
  input read and output written, and its memory.stat at the end splits cache from RSS;
- then (unless --no-limited-run) a second conversion inside a memory cgroup capped at the
  acceptance limit itself, 2 x largest tensor + 400 MB, page cache included: it must finish
  without an OOM kill.
The acceptance check is peak RSS < 2 x largest tensor + 400 MB; exit status 0 when it holds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import edge_emulate  # noqa: E402
import make_synthetic  # noqa: E402
from edge_emulate import fmt_bytes  # noqa: E402

MB = 10**6


def checkpoint_sizes(directory: Path) -> tuple[int, int, str]:
    """(bytes of all safetensors files, bytes of the largest tensor, its name) from the headers."""
    total, largest, largest_name = 0, 0, ""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"bench_convert_memory: {directory} holds no *.safetensors")
    for path in files:
        total += path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                if end - begin > largest:
                    largest, largest_name = end - begin, name
    return total, largest, largest_name


def ensure_checkpoint(directory: Path, size: int) -> None:
    if (directory / "config.json").is_file():
        total, _, _ = checkpoint_sizes(directory)
        if total >= size:
            print(f"reusing {directory} ({fmt_bytes(total)})")
            return
        raise SystemExit(f"bench_convert_memory: {directory} holds {fmt_bytes(total)}, less than "
                         f"--size {fmt_bytes(size)}; give another --checkpoint or remove it")
    spec = make_synthetic.plan(size, replace(make_synthetic.SynthSpec(), dtype="bf16"), set())
    print(f"building {directory}: {spec.n_layer} layers, {spec.n_expert} experts, hidden "
          f"{spec.n_embd}, expert ffn {spec.n_ff_exp}, {fmt_bytes(spec.nbytes())} bf16")
    make_synthetic.make_synthetic(directory, spec)


def convert_under(src: Path, out: Path, args, mem: int | None) -> edge_emulate.LimitedResult:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "edgemoe", "convert", str(src), str(out), "-q",
           "--expert-type", args.expert_type, "--dense-type", args.dense_type]
    res = edge_emulate.run_limited(cmd, mem=mem, drop=[str(src)], capture=True)
    if res.rc != 0 and not res.oom:
        sys.stderr.write(res.stderr or "")
        raise SystemExit(f"bench_convert_memory: convert failed with exit code {res.rc}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/edgemoe-bench/synth-qwen3moe-2GB"),
                    help="checkpoint to convert; built here when absent")
    ap.add_argument("--size", default="2GB", help="size of a checkpoint to build (>= 2GB)")
    ap.add_argument("--out", type=Path, help="shard-set directory (default: CHECKPOINT.shards)")
    ap.add_argument("--expert-type", default="Q4_K")
    ap.add_argument("--dense-type", default="Q8_0")
    ap.add_argument("--no-limited-run", action="store_true",
                    help="skip the second conversion under a cgroup capped at the limit")
    ap.add_argument("--keep", action="store_true", help="keep the shard set afterwards")
    args = ap.parse_args(argv)
    src = args.checkpoint
    out = args.out or src.with_name(src.name + ".shards")

    ensure_checkpoint(src, edge_emulate.parse_size(args.size))
    ckpt_bytes, largest, largest_name = checkpoint_sizes(src)
    limit = 2 * largest + 400 * MB
    reason = edge_emulate.unavailable_reason(mem=True, read_bps=False)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    print(f"convert {src} -> {out} (experts {args.expert_type}, dense {args.dense_type})")
    res = convert_under(src, out, args, mem=None if reason else ram)
    rows = [("checkpoint bytes", f"{ckpt_bytes / MB:.1f} MB"),
            ("largest tensor", f"{largest / MB:.1f} MB ({largest_name})"),
            ("limit 2 x largest + 400 MB", f"{limit / MB:.1f} MB"),
            ("convert time", f"{res.elapsed_s:.1f} s ({ckpt_bytes / MB / res.elapsed_s:.1f} MB/s of input)"),
            ("peak RSS (VmHWM)", f"{res.peak_rss_bytes / MB:.1f} MB"),
            ("largest sampled RSS (5 ms)", f"{res.sampled_rss_bytes / MB:.1f} MB")]
    if reason:
        rows.append(("page cache caused", f"not measured: {reason}"))
    else:
        stat = res.memory_stat
        rows += [("cgroup peak (RSS + page cache)", f"{res.peak_bytes / MB:.1f} MB"),
                 ("page cache at end (cache / dirty)",
                  f"{stat.get('total_cache', stat.get('file', 0)) / MB:.1f} MB / "
                  f"{stat.get('total_dirty', stat.get('file_dirty', 0)) / MB:.1f} MB")]
    passed = res.peak_rss_bytes < limit
    rows.append(("peak RSS < limit", "PASS" if passed else "FAIL"))

    if not (reason or args.no_limited_run):
        capped = convert_under(src, out, args, mem=limit)
        held = not capped.oom and capped.rc == 0 and capped.peak_bytes <= limit
        rows += [("run 2: cgroup limit = the limit", f"exit {capped.rc}, OOM kills {capped.oom_kills}, "
                  f"peak {capped.peak_bytes / MB:.1f} MB incl. page cache, "
                  f"RSS {capped.peak_rss_bytes / MB:.1f} MB, {capped.elapsed_s:.1f} s"),
                 ("run 2 within the limit", "PASS" if held else "FAIL")]
        passed = passed and held

    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
