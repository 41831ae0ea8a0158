"""scripts/edge_emulate.py: real cgroup limits (as root) and the parts that need no root."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import edge_emulate as ee  # noqa: E402

MiB = 1 << 20
REASON = ee.unavailable_reason()
needs_cgroups = pytest.mark.skipif(REASON is not None, reason=f"cannot apply limits: {REASON}")


def _our_groups() -> list[str]:
    """Groups this test process created and left behind (their names carry our pid)."""
    left = []
    for root in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/blkio", "/sys/fs/cgroup"):
        if os.path.isdir(root):
            left += [n for n in os.listdir(root) if n.startswith(f"edgemoe-emulate-{os.getpid()}-")]
    return left


def _sleeper(tmp_path: Path) -> tuple[Path, str]:
    """Python code that touches a marker file, then sleeps a minute; and the marker."""
    marker = tmp_path / "started"
    return marker, f"import time, pathlib; pathlib.Path({str(marker)!r}).touch(); time.sleep(60)"


def _started(marker: Path, seconds: float = 10.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if marker.exists():
            return True
        subprocess.run(["sleep", "0.05"])
    return marker.exists()


@pytest.fixture
def cold_file(tmp_path: Path) -> Path:
    path = tmp_path / "shard.bin"
    path.write_bytes(os.urandom(20 * 10**6))
    return path


def test_parse_size():
    assert ee.parse_size("256MiB") == 256 * MiB
    assert ee.parse_size("512M") == 512 * MiB
    assert ee.parse_size("8GB") == 8 * 10**9
    assert ee.parse_size("90MB/s") == 90 * 10**6
    assert ee.parse_size("1.5GB/s") == 1_500_000_000
    assert ee.parse_size("4096") == 4096
    with pytest.raises(ValueError, match="cannot read size"):
        ee.parse_size("lots")


def test_profiles_and_overrides():
    assert ee.resolve_limits("rpi5-sd", None, None) == (8 << 30, 90_000_000)
    assert ee.resolve_limits("rpi5-nvme", "2GiB", None) == (2 << 30, 800_000_000)
    assert ee.resolve_limits("jetson-orin-nano", None, "10MB/s") == (8 << 30, 10_000_000)
    with pytest.raises(ee.EmulationError, match="unknown profile 'pi-zero'"):
        ee.resolve_limits("pi-zero", None, None)


def test_disk_of_is_a_whole_disk(tmp_path: Path):
    disk = ee.disk_of(str(tmp_path))
    with open("/proc/partitions") as f:
        listed = {(int(p[0]), int(p[1])): p[3] for p in (line.split() for line in f)
                  if len(p) == 4 and p[0].isdigit()}
    assert listed.get((disk.major, disk.minor)) == disk.name
    assert not os.path.exists(f"/sys/dev/block/{disk.dev}/partition")


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm tmpfs here")
def test_disk_of_tmpfs_is_refused():
    with pytest.raises(ee.EmulationError, match="no block device"):
        ee.disk_of("/dev/shm")


def test_drop_page_cache(cold_file: Path):
    cold_file.read_bytes()  # now cached (and dirty: drop must write it back first)
    report = ee.drop_page_cache([str(cold_file.parent)])
    assert report.files == 1 and report.file_bytes == 20 * 10**6
    assert report.cached_before > 10 * 10**6
    assert report.cached_after == 0


def _python_for_nobody() -> str | None:
    """A Python the unprivileged user can run (a venv under /root is not one); the script is
    stdlib-only, so any Python 3.10+ will do."""
    for exe in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            ok = subprocess.run([exe, "-c", "import sys; assert sys.version_info >= (3, 10)"],
                                user=65534, group=65534, cwd="/", capture_output=True,
                                timeout=30).returncode == 0
        except OSError:
            ok = False
        if ok:
            return exe
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_cli_without_root_says_so():
    exe = _python_for_nobody()
    if exe is None:
        pytest.skip("no Python 3.10+ that user 65534 may run")
    # The script goes in on stdin: the unprivileged user may not be allowed to read the checkout
    # (a fresh clone under a 0700 temporary directory, as in CI).
    proc = subprocess.run(
        [exe, "-", "--mem", "64MiB", "--", "true"], input=(SCRIPTS / "edge_emulate.py").read_text(),
        user=65534, group=65534, cwd="/", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "cannot emulate" in proc.stderr and "root" in proc.stderr


@needs_cgroups
def test_read_throttle_is_real(cold_file: Path):
    # 20 MB at 10 MB/s: about 2 s if the throttle holds, a few ms from the page cache.
    res = ee.run_limited(["dd", f"if={cold_file}", "of=/dev/null", "bs=1M"],
                         read_bps="10MB/s", drop=[str(cold_file)], capture=True, timeout=60)
    assert res.rc == 0, res.stderr
    assert res.drop.cached_after == 0
    assert res.read_bytes >= 20 * 10**6
    rate = 20e6 / res.elapsed_s
    assert 7e6 < rate < 11e6, f"read at {rate / 1e6:.1f} MB/s under a 10 MB/s throttle"
    assert _our_groups() == []


@needs_cgroups
def test_memory_limit_holds_page_cache_included(cold_file: Path):
    # 24 MiB of anonymous memory plus streaming a 20 MB file, under a 40 MiB limit: the page
    # cache counts toward the group and is reclaimed, so the run succeeds at <= the limit.
    code = ("a = bytearray(24 << 20)\n"
            "for i in range(0, len(a), 4096): a[i] = 1\n"
            f"f = open({str(cold_file)!r}, 'rb')\n"
            "while f.read(1 << 20): pass\n")
    res = ee.run_limited([sys.executable, "-c", code], mem="40MiB", drop=[str(cold_file)],
                         capture=True, timeout=60)
    assert res.rc == 0, res.stderr
    assert not res.oom
    assert 24 * MiB < res.peak_bytes <= 40 * MiB
    assert _our_groups() == []


@needs_cgroups
def test_memory_limit_kills_an_overrun():
    code = ("a = bytearray(200 << 20)\n"
            "for i in range(0, len(a), 4096): a[i] = 1\n"
            "print('survived')\n")
    res = ee.run_limited([sys.executable, "-c", code], mem="64MiB", capture=True, timeout=60)
    assert res.oom and res.rc == -9
    assert "survived" not in res.stdout
    assert res.peak_bytes <= 64 * MiB
    assert _our_groups() == []


@needs_cgroups
def test_groups_removed_when_the_command_cannot_start(tmp_path: Path):
    with pytest.raises(OSError):
        ee.run_limited([str(tmp_path / "no-such-program")], mem="64MiB", read_bps="50MB/s",
                       throttle_paths=[str(tmp_path)])
    assert _our_groups() == []


@needs_cgroups
def test_interrupt_stops_child_and_removes_groups(tmp_path: Path):
    # The emulator itself gets SIGTERM mid-run: the child stops and the groups go away.
    marker, code = _sleeper(tmp_path)
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "edge_emulate.py"), "--mem", "64MiB",
                             "--", sys.executable, "-c", code],
                            stderr=subprocess.PIPE, text=True)
    assert _started(marker)
    name = f"edgemoe-emulate-{proc.pid}-"
    assert any(n.startswith(name) for n in os.listdir("/sys/fs/cgroup/memory")) or \
        any(n.startswith(name) for n in os.listdir("/sys/fs/cgroup"))
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    for root in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
        if os.path.isdir(root):
            assert not any(n.startswith(name) for n in os.listdir(root))


def test_interrupted_run_with_a_timeout_exits_at_once(tmp_path: Path):
    # run_limited(timeout=...) arms a Timer thread; an interrupt must not leave it holding the
    # interpreter's exit until the timeout (bench_budget hung 30 minutes after a SIGTERM).
    marker, child = _sleeper(tmp_path)
    code = ("import signal, sys; sys.path.insert(0, sys.argv[1]); import edge_emulate as ee; "
            "signal.signal(signal.SIGTERM, ee._sigterm_as_interrupt); "
            "ee.run_limited([sys.executable, '-c', sys.argv[2]], timeout=600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(SCRIPTS), child],
                            stderr=subprocess.PIPE, text=True)
    assert _started(marker)
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert "KeyboardInterrupt" in err and proc.returncode != 0


@needs_cgroups
def test_killed_emulator_takes_its_command_along_and_leftovers_are_removed(tmp_path: Path):
    # SIGKILL gives the emulator no chance to clean up: its command must still die (no process
    # runs on outside its limits) and the next run removes the empty group it left.
    marker = tmp_path / "pid"
    code = f"import os, time, pathlib; pathlib.Path({str(marker)!r}).write_text(str(os.getpid())); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "edge_emulate.py"), "--mem", "64MiB",
                             "--", sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    for _ in range(200):
        if marker.exists() and marker.read_text():
            break
        subprocess.run(["sleep", "0.05"])
    child = int(marker.read_text())
    proc.kill()
    proc.wait()
    for _ in range(100):
        if not os.path.exists(f"/proc/{child}"):
            break
        subprocess.run(["sleep", "0.05"])
    assert not os.path.exists(f"/proc/{child}"), "the command outlived its emulator"
    stale = f"edgemoe-emulate-{proc.pid}-"
    roots = [r for r in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup") if os.path.isdir(r)]
    assert any(n.startswith(stale) for r in roots for n in os.listdir(r))
    assert ee.run_limited(["true"], mem="64MiB").rc == 0
    assert not any(n.startswith(stale) for r in roots for n in os.listdir(r))
