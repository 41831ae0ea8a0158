#!/usr/bin/env python3
"""Run a command as if on an edge board: a real memory limit and a real read-bandwidth throttle.

    sudo python scripts/edge_emulate.py --profile rpi5-sd --drop SHARDS -- edgemoe run SHARDS ...
    sudo python scripts/edge_emulate.py --mem 256MiB --read-bps 50MB/s --drop big.bin -- cat big.bin

The command runs in a memory cgroup (its limit counts RSS *and* the page cache the command
causes, which is the pressure a board with that much RAM is under) and an I/O cgroup that caps
read bandwidth on the whole disk holding the given paths (block throttling works per disk, not per
partition). The page cache of every file under the --drop paths is dropped first so the run
starts cold. Afterwards it prints the group's peak usage, limit hits, OOM kills, bytes read from
the disk and the command's exit code, and removes the groups, also on error or Ctrl-C.

`--self-check DIR` measures that it works on this machine: cold-read rates of a 300 MB file
without and with each throttle, and a 256 MiB limit holding (and killing an overrun). A throttle
only lowers bandwidth: a profile faster than the disk itself runs at the disk's speed.

cgroup v1 (memory + blkio controllers) is used when mounted, otherwise cgroup v2 (memory + io).
Without root or without these controllers it says so and exits with status 2.

Benchmarks import it: `from edge_emulate import run_limited` (scripts/ is on sys.path when a
script in scripts/ runs) and get a LimitedResult with the same figures.
Stdlib only, so it runs with any Python 3.10+.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import mmap
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Profiles: read bandwidth of the storage the shards live on, RAM of the board.

GiB = 1 << 30


@dataclass(frozen=True)
class Profile:
    name: str
    mem_bytes: int
    read_bps: int
    what: str


# Sequential read figures as commonly measured on these boards (decimal MB/s).
PROFILES = {
    p.name: p
    for p in (
        Profile("rpi5-sd", 8 * GiB, 90_000_000, "Raspberry Pi 5 8 GB, UHS-I SD card (~90 MB/s)"),
        Profile("rpi5-nvme", 8 * GiB, 800_000_000, "Raspberry Pi 5 8 GB, NVMe on PCIe 2.0 x1 (~800 MB/s)"),
        Profile("jetson-orin-nano", 8 * GiB, 1_500_000_000, "Jetson Orin Nano 8 GB, NVMe (~1.5 GB/s)"),
    )
}


class EmulationError(Exception):
    """The limits cannot be applied here (no root, no cgroup controller, no block device...)."""


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: str) -> int:
    """'256MiB' -> 268435456, '8GB' -> 8e9, '512M' -> 512 MiB (a bare letter means binary, as
    cgroups and most tools read it), '90MB/s' -> 90e6 (a trailing '/s' is allowed for rates)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(i?)([bB]?)\s*(/s)?\s*", text)
    if not m:
        raise ValueError(f"cannot read size {text!r}: expected e.g. 256MiB, 8GB, 90MB/s")
    number, letter, binary, byte_suffix, _ = m.groups()
    letter = letter.lower()
    if letter and not binary and not byte_suffix:
        binary = "i"  # '512M' = 512 MiB
    return int(float(number) * _UNITS[letter + binary])


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------
# Which disk holds a path.

@dataclass(frozen=True)
class Disk:
    major: int
    minor: int
    name: str

    @property
    def dev(self) -> str:
        return f"{self.major}:{self.minor}"


def disk_of(path: str) -> Disk:
    """The whole block device holding `path` (the disk, not the partition: throttling applies to
    whole devices)."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    sys_dev = f"/sys/dev/block/{major}:{minor}"
    if major == 0 or not os.path.exists(sys_dev):
        raise EmulationError(
            f"{path} is on a filesystem with no block device (st_dev {major}:{minor}: tmpfs, "
            "overlay, network or FUSE?); cannot throttle its reads. Put the files on a disk.")
    real = os.path.realpath(sys_dev)
    if os.path.exists(os.path.join(real, "partition")):
        real = os.path.dirname(real)  # /sys/devices/.../vda/vda1 -> .../vda
    with open(os.path.join(real, "dev")) as f:
        dmajor, dminor = (int(x) for x in f.read().strip().split(":"))
    return Disk(dmajor, dminor, os.path.basename(real))


# ---------------------------------------------------------------------------------------------
# Page cache: measure (mincore) and drop (posix_fadvise DONTNEED) for every file under paths.

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mincore.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value
_PAGE = mmap.PAGESIZE


def _files_under(paths: list[str]) -> list[str]:
    files = []
    for p in paths:
        if os.path.isfile(p):
            files.append(p)
        elif os.path.isdir(p):
            for root, _, names in os.walk(p):
                files.extend(os.path.join(root, n) for n in sorted(names)
                             if os.path.isfile(os.path.join(root, n)))
        else:
            raise EmulationError(f"--drop {p}: no such file or directory")
    return files


def _cached_bytes(fd: int, size: int) -> int:
    """Bytes of the file currently in the page cache (mincore over a read-only mapping)."""
    if size == 0:
        return 0
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, _MAP_FAILED):
        return 0
    try:
        pages = (size + _PAGE - 1) // _PAGE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, size, vec) != 0:
            return 0
        return min(size, sum(b & 1 for b in bytes(vec)) * _PAGE)
    finally:
        _libc.munmap(addr, size)


@dataclass(frozen=True)
class DropReport:
    files: int
    file_bytes: int
    cached_before: int
    cached_after: int  # pages still cached: dirty and unsyncable, or mapped by another process


def drop_page_cache(paths: list[str]) -> DropReport:
    files = _files_under(paths)
    total = before = after = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            total += size
            before += _cached_bytes(fd, size)
            # DONTNEED skips dirty pages, so write a freshly created file back first.
            try:
                os.fdatasync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            after += _cached_bytes(fd, size)
        finally:
            os.close(fd)
    return DropReport(len(files), total, before, after)


# ---------------------------------------------------------------------------------------------
# cgroups. Both versions expose the same operations; pick whichever has the controllers we need.

def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _cgroup_mounts() -> tuple[dict[str, str], str | None]:
    """({v1 controller: mount point}, cgroup2 mount point or None) from /proc/self/mounts."""
    v1: dict[str, str] = {}
    v2 = None
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, fstype, opts, *_ = line.split()
            if fstype == "cgroup":
                for opt in opts.split(","):
                    v1.setdefault(opt, mnt)
            elif fstype == "cgroup2" and v2 is None:
                v2 = mnt
    return v1, v2


@dataclass
class GroupStats:
    peak_bytes: int | None
    limit_hits: int | None  # v1 memory.failcnt, v2 memory.events "max"
    oom_kills: int | None
    read_bytes: dict[str, int]  # per throttled device "MAJ:MIN"
    memory_stat: dict[str, int]


class _Cgroup:
    """One emulation run's groups. create() -> attach(pid) ... -> stats() -> destroy()."""

    version = 0
    dirs: list[str]

    def procs(self) -> list[int]:
        pids: set[int] = set()
        for d in self.dirs:
            try:
                pids.update(int(x) for x in _read(os.path.join(d, "cgroup.procs")).split())
            except FileNotFoundError:
                pass
        return sorted(pids)

    def attach(self, pid: int) -> None:
        for d in self.dirs:
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def destroy(self) -> None:
        # Anything left inside was started by our command (e.g. a daemonised grandchild).
        for _ in range(50):
            pids = self.procs()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for d in self.dirs:
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the last task is being reaped
                    time.sleep(0.1)
            else:
                print(f"edge_emulate: warning: could not remove {d}", file=sys.stderr)


def _mkdir_group(parent: str, name: str) -> str:
    path = os.path.join(parent, name)
    try:
        os.mkdir(path)
    except PermissionError:
        raise EmulationError(
            f"cannot create cgroup {path}: permission denied (running as uid {os.geteuid()}; "
            "creating cgroups needs root)") from None
    except OSError as exc:
        raise EmulationError(f"cannot create cgroup {path}: {exc.strerror}") from None
    return path


def _int_file(path: str) -> int | None:
    try:
        return int(_read(path).strip())
    except (FileNotFoundError, ValueError):
        return None


def _kv_file(path: str) -> dict[str, int]:
    out = {}
    try:
        for line in _read(path).splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                out[parts[0]] = int(parts[1])
    except FileNotFoundError:
        pass
    return out


class CgroupV1(_Cgroup):
    version = 1

    def __init__(self, mounts: dict[str, str], name: str, mem: int | None, read_bps: int | None,
                 disks: list[Disk]):
        self.dirs = []
        self.mem_dir = self.blkio_dir = None
        self.disks = disks
        try:
            if mem is not None:
                self.mem_dir = _mkdir_group(mounts["memory"], name)
                self.dirs.append(self.mem_dir)
                _write(os.path.join(self.mem_dir, "memory.limit_in_bytes"), str(mem))
                # With swap accounting, also forbid escaping the limit into swap.
                memsw = os.path.join(self.mem_dir, "memory.memsw.limit_in_bytes")
                if os.path.exists(memsw):
                    _write(memsw, str(mem))
            if read_bps is not None:
                self.blkio_dir = _mkdir_group(mounts["blkio"], name)
                self.dirs.append(self.blkio_dir)
                for disk in disks:
                    _write(os.path.join(self.blkio_dir, "blkio.throttle.read_bps_device"),
                           f"{disk.dev} {read_bps}")
        except BaseException:
            self.destroy()
            raise

    def stats(self) -> GroupStats:
        peak = hits = ooms = None
        mstat: dict[str, int] = {}
        if self.mem_dir:
            peak = _int_file(os.path.join(self.mem_dir, "memory.max_usage_in_bytes"))
            hits = _int_file(os.path.join(self.mem_dir, "memory.failcnt"))
            ooms = _kv_file(os.path.join(self.mem_dir, "memory.oom_control")).get("oom_kill")
            mstat = _kv_file(os.path.join(self.mem_dir, "memory.stat"))
        reads: dict[str, int] = {}
        if self.blkio_dir:
            text = _read(os.path.join(self.blkio_dir, "blkio.throttle.io_service_bytes"))
            for line in text.splitlines():
                parts = line.split()  # "254:0 Read 123"
                if len(parts) == 3 and parts[1] == "Read":
                    reads[parts[0]] = int(parts[2])
        return GroupStats(peak, hits, ooms, reads, mstat)


class CgroupV2(_Cgroup):
    version = 2

    def __init__(self, root: str, name: str, mem: int | None, read_bps: int | None,
                 disks: list[Disk]):
        wanted = (["memory"] if mem is not None else []) + (["io"] if read_bps is not None else [])
        # A new child of the root gets only the controllers the root delegates to its children.
        enabled = _read(os.path.join(root, "cgroup.subtree_control")).split()
        missing = [c for c in wanted if c not in enabled]
        if missing:
            try:
                _write(os.path.join(root, "cgroup.subtree_control"),
                       " ".join("+" + c for c in missing))
            except OSError as exc:
                raise EmulationError(
                    f"cannot enable cgroup v2 controllers {missing} in {root}: {exc.strerror}"
                ) from None
        self.dir = _mkdir_group(root, name)
        self.dirs = [self.dir]
        self.disks = disks
        self.mem = mem
        try:
            if mem is not None:
                _write(os.path.join(self.dir, "memory.max"), str(mem))
                swap = os.path.join(self.dir, "memory.swap.max")
                if os.path.exists(swap):
                    _write(swap, "0")
            if read_bps is not None:
                for disk in disks:
                    _write(os.path.join(self.dir, "io.max"), f"{disk.dev} rbps={read_bps}")
        except BaseException:
            self.destroy()
            raise

    def stats(self) -> GroupStats:
        peak = hits = ooms = None
        mstat: dict[str, int] = {}
        if self.mem is not None:
            # memory.peak exists from Linux 5.19; older kernels have no peak figure.
            peak = _int_file(os.path.join(self.dir, "memory.peak"))
            events = _kv_file(os.path.join(self.dir, "memory.events"))
            hits, ooms = events.get("max"), events.get("oom_kill")
            mstat = _kv_file(os.path.join(self.dir, "memory.stat"))
        reads: dict[str, int] = {}
        try:
            for line in _read(os.path.join(self.dir, "io.stat")).splitlines():
                dev, *fields = line.split()  # "254:0 rbytes=123 wbytes=0 ..."
                kv = dict(f.split("=", 1) for f in fields if "=" in f)
                if "rbytes" in kv:
                    reads[dev] = int(kv["rbytes"])
        except FileNotFoundError:
            pass
        return GroupStats(peak, hits, ooms, reads, mstat)


def _pick_version(mem: int | None, read_bps: int | None) -> tuple[int, str]:
    """(cgroup version, its mount point) able to apply these limits, else EmulationError."""
    v1, v2 = _cgroup_mounts()
    need_v1 = (["memory"] if mem is not None else []) + (["blkio"] if read_bps is not None else [])
    if all(c in v1 for c in need_v1):
        return 1, ""
    need_v2 = (["memory"] if mem is not None else []) + (["io"] if read_bps is not None else [])
    available = _read(os.path.join(v2, "cgroup.controllers")).split() if v2 else []
    if v2 and all(c in available for c in need_v2):
        return 2, v2
    found_v2 = f"cgroup2 at {v2} with controllers [{' '.join(available)}]" if v2 else "no cgroup2"
    raise EmulationError(
        f"no cgroup with the controllers needed: cgroup v1 needs {need_v1} (mounted: "
        f"{sorted(c for c in v1 if c in ('memory', 'blkio')) or 'none'}), cgroup v2 needs "
        f"{need_v2} ({found_v2})")


def unavailable_reason(mem: bool = True, read_bps: bool = True) -> str | None:
    """Why limits cannot be applied on this machine (no root, no controllers), or None."""
    if os.geteuid() != 0:
        return f"creating cgroups needs root (running as uid {os.geteuid()})"
    try:
        _pick_version(1 if mem else None, 1 if read_bps else None)
    except EmulationError as exc:
        return str(exc)
    return None


_GROUP_PREFIX = "edgemoe-emulate-"


def _remove_stale_groups() -> None:
    """Remove empty groups left by an emulator that was killed outright (SIGKILL leaves no chance
    to clean up); the pid in a group's name tells whether its creator still runs."""
    v1, v2 = _cgroup_mounts()
    for root in {*(v1[c] for c in ("memory", "blkio") if c in v1), *([v2] if v2 else [])}:
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            if not name.startswith(_GROUP_PREFIX):
                continue
            pid = name[len(_GROUP_PREFIX):].split("-")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                try:
                    os.rmdir(os.path.join(root, name))  # fails, harmlessly, if not empty
                except OSError:
                    pass


def open_cgroup(mem: int | None, read_bps: int | None, disks: list[Disk]) -> _Cgroup:
    """Create this run's groups with the limits set, in whichever cgroup version can do it."""
    name = f"{_GROUP_PREFIX}{os.getpid()}-{time.monotonic_ns() % 10**9}"
    version, v2_root = _pick_version(mem, read_bps)
    _remove_stale_groups()
    if version == 1:
        return CgroupV1(_cgroup_mounts()[0], name, mem, read_bps, disks)
    return CgroupV2(v2_root, name, mem, read_bps, disks)


# ---------------------------------------------------------------------------------------------
# Running a command under the limits.

@dataclass
class LimitedResult:
    cmd: list[str]
    rc: int                   # exit status; -N when killed by signal N
    elapsed_s: float
    cgroup_version: int
    mem_limit: int | None
    read_bps: int | None
    disks: list[str]          # throttled devices, "MAJ:MIN name"
    peak_bytes: int | None    # the group's peak usage (RSS + page cache), None without a limit
    peak_rss_bytes: int | None  # the command process's peak RSS (VmHWM, polled until exit)
    sampled_rss_bytes: int | None  # largest RSS (VmRSS) seen by polling every 5 ms
    limit_hits: int | None
    oom_kills: int | None
    read_bytes: int | None    # bytes the group read from the throttled disks
    memory_stat: dict[str, int]
    drop: DropReport | None
    timed_out: bool
    stdout: str | None
    stderr: str | None

    @property
    def oom(self) -> bool:
        return bool(self.oom_kills) or (self.mem_limit is not None and self.rc == -signal.SIGKILL
                                        and not self.timed_out)

    def summary(self) -> str:
        lines = [f"exit code {self.rc}{' (timed out)' if self.timed_out else ''}, "
                 f"elapsed {self.elapsed_s:.2f} s"]
        if self.mem_limit is not None:
            verdict = ("no peak figure on this kernel" if self.peak_bytes is None
                       else "held" if self.peak_bytes <= self.mem_limit else "EXCEEDED")
            lines.append(f"peak usage {fmt_bytes(self.peak_bytes)} of {fmt_bytes(self.mem_limit)} "
                         f"limit ({verdict}), limit hits {self.limit_hits}, "
                         f"OOM kills {self.oom_kills}")
        lines.append(f"command peak RSS {fmt_bytes(self.peak_rss_bytes)} (VmHWM)")
        if self.read_bps is not None and self.read_bytes is not None:
            rate = self.read_bytes / self.elapsed_s / 1e6 if self.elapsed_s > 0 else 0.0
            lines.append(f"read {self.read_bytes / 1e6:.1f} MB from {', '.join(self.disks)} "
                         f"(throttle {self.read_bps / 1e6:.1f} MB/s, average {rate:.1f} MB/s)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["oom"] = self.oom
        return d


def resolve_limits(profile: str | None, mem: int | str | None,
                   read_bps: int | str | None) -> tuple[int | None, int | None]:
    """Profile values, each overridden by an explicit mem / read_bps (strings are parsed)."""
    pmem = pbps = None
    if profile is not None:
        if profile not in PROFILES:
            raise EmulationError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
        pmem, pbps = PROFILES[profile].mem_bytes, PROFILES[profile].read_bps
    if isinstance(mem, str):
        mem = parse_size(mem)
    if isinstance(read_bps, str):
        read_bps = parse_size(read_bps)
    mem = pmem if mem is None else mem
    read_bps = pbps if read_bps is None else read_bps
    if mem is not None and mem < (4 << 20):
        raise EmulationError(f"memory limit {mem} B is below 4 MiB; nothing would start")
    if read_bps is not None and read_bps <= 0:
        raise EmulationError(f"read bandwidth must be positive, got {read_bps}")
    return mem, read_bps


def run_limited(cmd: list[str], profile: str | None = None, mem: int | str | None = None,
                read_bps: int | str | None = None, drop: list[str] = (),
                throttle_paths: list[str] = (), capture: bool = False,
                timeout: float | None = None, env: dict | None = None,
                cwd: str | None = None) -> LimitedResult:
    """Run `cmd` in fresh cgroups with the memory limit and read throttle of `profile` (or the
    explicit `mem` / `read_bps`), after dropping the page cache of every file under `drop`.
    The throttle applies to the disks holding `throttle_paths`, else those holding `drop`.
    Raises EmulationError when the limits cannot be applied."""
    mem, read_bps = resolve_limits(profile, mem, read_bps)
    disks: list[Disk] = []
    if read_bps is not None:
        where = list(throttle_paths) or list(drop)
        if not where:
            raise EmulationError("a read throttle needs the paths whose disk to throttle "
                                 "(drop=[shard dir] or throttle_paths=[...])")
        for p in where:
            d = disk_of(p)
            if d not in disks:
                disks.append(d)
    group = open_cgroup(mem, read_bps, disks) if (mem is not None or read_bps is not None) else None
    proc = sampler = timer = None
    try:
        drop_report = drop_page_cache(list(drop)) if drop else None
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            preexec_fn=lambda: _enter(group))
        out_chunks: dict[str, bytes] = {}
        readers = []
        if capture:
            for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr)):
                t = threading.Thread(target=lambda n=name, s=stream: out_chunks.__setitem__(n, s.read()),
                                     daemon=True)
                t.start()
                readers.append(t)
        expired = threading.Event()
        if timeout is not None:
            timer = threading.Timer(timeout, lambda: (expired.set(), proc.kill()))
            timer.start()
        sampler = _PeakRss(proc.pid)
        _, status = os.waitpid(proc.pid, 0)
        sampler.stop()
        elapsed = time.monotonic() - start
        if timer is not None:
            timer.cancel()
        timed_out = expired.is_set()
        proc.returncode = os.waitstatus_to_exitcode(status)
        for t in readers:
            t.join()
        stats = group.stats() if group else None
    except BaseException:
        if timer is not None:   # a pending Timer thread would hold the interpreter's exit
            timer.cancel()
        if proc is not None and proc.returncode is None:
            _stop(proc)
        if sampler is not None:
            sampler.stop()
        raise
    finally:
        if group is not None:
            group.destroy()
    return LimitedResult(
        cmd=list(cmd), rc=proc.returncode, elapsed_s=elapsed,
        cgroup_version=group.version if group else 0, mem_limit=mem, read_bps=read_bps,
        disks=[f"{d.dev} {d.name}" for d in disks],
        peak_bytes=stats.peak_bytes if stats else None,
        peak_rss_bytes=sampler.peak, sampled_rss_bytes=sampler.sampled,
        limit_hits=stats.limit_hits if stats else None,
        oom_kills=stats.oom_kills if stats else None,
        read_bytes=sum(stats.read_bytes.get(d.dev, 0) for d in disks) if stats and disks else None,
        memory_stat=stats.memory_stat if stats else {},
        drop=drop_report, timed_out=timed_out,
        stdout=out_chunks.get("stdout", b"").decode(errors="replace") if capture else None,
        stderr=out_chunks.get("stderr", b"").decode(errors="replace") if capture else None)


_PR_SET_PDEATHSIG = 1


def _enter(group: _Cgroup | None) -> None:
    """In the child, before exec: die with the emulator (even if it is SIGKILLed, so no command
    outlives its limits), and join the groups so every byte the command touches is accounted."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if group is not None:
        group.attach(os.getpid())


class _PeakRss:
    """Polls the kernel's own peak-RSS counter (VmHWM) of a process until it exits.

    ru_maxrss from wait4 would be wrong here: Linux carries into it the RSS of the forked copy of
    the parent before exec, so a command started from a large process (a test runner with torch
    loaded) would report the parent's size. VmHWM belongs to the exec'd program's memory map only
    and never decreases, so polling misses at most the growth in the last interval before exit."""

    def __init__(self, pid: int, interval: float = 0.005):
        self.pid, self.interval = pid, interval
        self.peak = self.sampled = None  # VmHWM; largest VmRSS seen
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> tuple[int, int] | None:
        """(VmHWM, VmRSS) in bytes, None once the process has exited (a zombie has no memory)."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("VmHWM", "VmRSS")))
            return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024
        except (FileNotFoundError, ProcessLookupError, KeyError):
            return None

    def _run(self) -> None:
        while True:
            sample = self._read()
            if sample is not None:
                self.peak = max(self.peak or 0, sample[0])
                self.sampled = max(self.sampled or 0, sample[1])
            if self._done.wait(self.interval):
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _stop(proc: subprocess.Popen) -> None:
    """Interrupt the child (as Ctrl-C would), then kill it if it does not stop in 5 s."""
    for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ChildProcessError:  # already reaped by wait4
            return


# ---------------------------------------------------------------------------------------------

# A reader that reports its own throughput, so process start-up does not count.
_READER = """
import sys, time
t, n = time.monotonic(), 0
with open(sys.argv[1], 'rb', buffering=0) as f:
    while chunk := f.read(1 << 20):
        n += len(chunk)
print(n / (time.monotonic() - t))
"""
# Touch `mib` MiB of anonymous memory, then stream the file through the page cache.
_HOG = """
import sys
a = bytearray(int(sys.argv[2]) << 20)
for i in range(0, len(a), 4096):
    a[i] = 1
with open(sys.argv[1], 'rb', buffering=0) as f:
    while f.read(1 << 20):
        pass
print('done')
"""


def self_check(directory: Path) -> int:
    """The figures that show the emulation is real on this machine, as a table."""
    reason = unavailable_reason()
    if reason:
        print(f"edge_emulate: cannot emulate: {reason}", file=sys.stderr)
        return 2
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"edge_emulate_check_{os.getpid()}.bin"
    size = 300 * 10**6
    rows = []
    ok = True
    try:
        with open(path, "wb") as f:
            for _ in range(size // 10**6):
                f.write(os.urandom(10**6))
        disk = disk_of(str(path))
        rows.append(("disk", f"{disk.dev} ({disk.name}) holding {path}"))
        for label, bps in [("no throttle", None), ("50 MB/s", 50 * 10**6)] + [
                (f"{p.name} {p.read_bps / 1e6:.0f} MB/s", p.read_bps) for p in PROFILES.values()]:
            if bps is None:
                drop_page_cache([str(path)])
                out = subprocess.run([sys.executable, "-c", _READER, str(path)],
                                     capture_output=True, text=True, check=True).stdout
            else:
                res = run_limited([sys.executable, "-c", _READER, str(path)], read_bps=bps,
                                  drop=[str(path)], capture=True, timeout=120)
                out = res.stdout
            rate = float(out.strip())
            if bps is None:
                native = rate
                verdict = ""
            elif bps > 0.9 * native:
                verdict = "(the throttle is above this disk's own speed)"
            else:
                within = abs(rate - bps) <= 0.15 * bps
                verdict = "ok" if within else "OFF by more than 15%"
                ok &= within
            rows.append((f"read 300 MB cold, {label}", f"{rate / 1e6:.1f} MB/s {verdict}"))
        mem = 256 << 20
        for mib, expect_oom in ((200, False), (400, True)):
            res = run_limited([sys.executable, "-c", _HOG, str(path), str(mib)], mem=mem,
                              drop=[str(path)], capture=True, timeout=120)
            held = res.peak_bytes <= mem and res.oom == expect_oom
            ok &= held
            rows.append((f"256 MiB limit, {mib} MiB + streaming 300 MB",
                         f"peak {fmt_bytes(res.peak_bytes)}, exit {res.rc}, OOM kills "
                         f"{res.oom_kills} ({'as expected' if held else 'UNEXPECTED'})"))
    finally:
        path.unlink(missing_ok=True)
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print("self-check " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Run a command under an edge board's memory limit and storage read bandwidth "
        "(cgroups; needs root).",
        epilog="profiles: " + "; ".join(f"{p.name}: {p.what}, {fmt_bytes(p.mem_bytes)}"
                                         for p in PROFILES.values())
        + ". Exit status: the command's (128+N if killed by signal N); 2 if the limits cannot "
        "be applied.")
    ap.add_argument("--profile", choices=sorted(PROFILES), help="board to emulate")
    ap.add_argument("--mem", help="memory limit, overrides the profile's (e.g. 2GiB, 512M)")
    ap.add_argument("--read-bps", help="read bandwidth, overrides the profile's (e.g. 90MB/s)")
    ap.add_argument("--drop", action="append", default=[], metavar="PATH",
                    help="drop the page cache of every file under PATH first; its disk is the "
                    "one throttled (repeatable)")
    ap.add_argument("--throttle", action="append", default=[], metavar="PATH",
                    help="throttle the disk holding PATH instead of those of --drop (repeatable)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command and arguments")
    ap.add_argument("--self-check", metavar="DIR",
                    help="measure, with a 300 MB file written in DIR, that the limits hold here")
    args = ap.parse_args(argv)
    if args.self_check:
        return self_check(Path(args.self_check))
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given (put it after --)")
    if args.profile is None and args.mem is None and args.read_bps is None:
        ap.error("give --profile or --mem / --read-bps")
    try:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        mem, bps = resolve_limits(args.profile, args.mem, args.read_bps)
        if bps is not None and not (args.drop or args.throttle):
            args.throttle = [os.getcwd()]  # the summary names the disk this throttled
        print(f"edge_emulate: {args.profile or 'custom'}: memory limit {fmt_bytes(mem)}, read "
              f"{'unlimited' if bps is None else f'{bps / 1e6:.1f} MB/s'}", file=sys.stderr)
        result = run_limited(cmd, mem=mem, read_bps=bps, drop=args.drop,
                             throttle_paths=args.throttle)
    except EmulationError as exc:
        print(f"edge_emulate: cannot emulate: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"edge_emulate: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"edge_emulate: cannot run {cmd[0]!r}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge_emulate: interrupted; groups removed", file=sys.stderr)
        return 130
    if result.drop:
        d = result.drop
        print(f"edge_emulate: dropped page cache of {d.files} files ({fmt_bytes(d.file_bytes)}): "
              f"{fmt_bytes(d.cached_before)} cached before, {fmt_bytes(d.cached_after)} after",
              file=sys.stderr)
    print(f"edge_emulate: cgroup v{result.cgroup_version}, throttled "
          f"{', '.join(result.disks) or 'nothing'}", file=sys.stderr)
    for line in result.summary().splitlines():
        print(f"edge_emulate: {line}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=1)
    return result.rc if result.rc >= 0 else 128 - result.rc


if __name__ == "__main__":
    sys.exit(main())
