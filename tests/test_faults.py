"""Faults from real kernels, not monkeypatches (root only; each test says why it skips):

- an expert shard that starts failing with EIO in the middle of a run: the shard set lies on an
  ext4 filesystem on a loop device, its expert files laid out after a filler; shrinking the
  loop device under the mounted filesystem (`losetup --set-capacity`) makes the block layer
  refuse every read of those blocks with EIO, exactly what a failing flash device does.
  (device-mapper's error/flakey targets are the textbook tool; this kernel has no device-mapper
  driver: /dev/mapper/control is missing.) swap carries on with what is resident and warns
  once; ondemand fails the request with an error naming the shard.
- a conversion onto a small loop-mounted filesystem that fills up mid-run: a clean "disk full"
  error, nothing half-written under a final name, the rest of the filesystem untouched, and
  `--resume` finishes once space is freed, byte-identical to an uninterrupted conversion.
- SIGKILL during `edgemoe plan` (during conversion: tests/test_resume.py): plan.json is the old
  one or a whole new one, never part of one, and the shard set still runs.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

import converters
import edgemoe
from edgemoe.errors import ShardSetError
from edgemoe.shardset import ShardSet
from test_resume import convert_cmd, tree
from tiny_models import cached_checkpoint

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "edgemoe-tiny-shakespy"
KiB, MiB = 1 << 10, 1 << 20


def _need_root_and_loop():
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices and mount)")
    for tool in ("losetup", "mount", "umount", "mkfs.ext4"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop device support (/dev/loop-control)")


def _run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


@contextmanager
def loop_fs(image: Path, size: int, *mkfs_args):
    """An ext4 filesystem of `size` bytes in `image`, on a loop device, mounted; yields
    (mount point, loop device)."""
    _need_root_and_loop()
    with open(image, "wb") as f:
        f.truncate(size)
    _run("mkfs.ext4", "-q", "-F", *mkfs_args, str(image))
    try:
        dev = _run("losetup", "--find", "--show", str(image))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"losetup failed: {exc.stderr.strip()}")
    mnt = image.with_suffix(".mnt")
    mnt.mkdir()
    try:
        try:
            _run("mount", dev, str(mnt))
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot mount a loop device here: {exc.stderr.strip()}")
        try:
            yield mnt, dev
        finally:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        image.unlink(missing_ok=True)


def _physical_extents(path: Path) -> list[tuple[int, int]]:
    """(first, last) byte of each extent of `path` on its device (filefrag -v)."""
    out = _run("filefrag", "-v", "-b1", str(path))
    spans = []
    for line in out.splitlines():
        parts = line.replace(":", " ").replace("..", " ").split()
        if len(parts) >= 5 and parts[0].isdigit():
            spans.append((int(parts[3]), int(parts[4])))
    return spans


@pytest.fixture(scope="module")
def bundled_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "shards"
    converters.convert(BUNDLED, out, progress=False)
    return out


@contextmanager
def failing_experts(tmp_path: Path, good: Path):
    """The shard set with its experts/ directory a mounted ext4 on a loop device (a mount point
    inside the set, not a link); yields (shard set path, cut()) where cut() shrinks the device
    to end before the first expert's data, so that every expert read fails with EIO."""
    if shutil.which("filefrag") is None:
        pytest.skip("filefrag is not installed")
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("manifest.json", "base.gguf"):
        shutil.copyfile(good / name, shards / name)
    image = tmp_path / "experts.img"
    with loop_fs(image, 16 * MiB, "-b", "4096", "-O", "^has_journal") as (mnt, dev):
        for p in sorted((good / "experts").iterdir()):
            shutil.copyfile(p, mnt / p.name)
        os.sync()
        first = min(s for p in mnt.iterdir() for s, _ in _physical_extents(p))
        cut_at = first // 4096 * 4096
        # the shard set sees the mounted filesystem as its experts/ directory
        (shards / "experts").mkdir()
        _run("mount", "--bind", str(mnt), str(shards / "experts"))
        try:
            def cut():
                os.truncate(image, cut_at)
                _run("losetup", "--set-capacity", dev)
                probe = os.open(shards / "experts" / "blk.3.7.gguf", os.O_RDONLY | os.O_DIRECT)
                try:
                    with pytest.raises(OSError) as info:
                        os.preadv(probe, [mmap.mmap(-1, 4096)], 4096)
                    assert info.value.errno == errno.EIO  # from the block layer
                finally:
                    os.close(probe)

            yield shards, cut
        finally:
            subprocess.run(["umount", "-l", str(shards / "experts")], capture_output=True)


def test_swap_carries_on_when_expert_reads_start_failing(tmp_path, bundled_set):
    with failing_experts(tmp_path, bundled_set) as (shards, cut):
        with edgemoe.Model(shards, n_ctx=256, n_threads=1, memory_budget="50%",
                           policy="swap") as m:
            before = m.generate("ROMEO: what light", max_tokens=4, temperature=0)
            cut()   # the device fails mid-run: every expert not resident is unreadable now
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                text = m.generate("ROMEO: what light through yonder window breaks? It is",
                                  max_tokens=96, temperature=0)
            failed = sum(len(f) for f in m.engine.policy._failed.values())
        swap_warnings = [str(w.message) for w in caught if "swap:" in str(w.message)]
        assert before and text, "generation must carry on"
        assert failed >= 1, "no swap was tried after the device failed"
        assert len(swap_warnings) == 1, swap_warnings
        assert "Input/output error" in swap_warnings[0] and "experts/blk." in swap_warnings[0]


def test_ondemand_fails_the_request_when_an_expert_read_fails(tmp_path, bundled_set):
    with failing_experts(tmp_path, bundled_set) as (shards, cut):
        with edgemoe.Model(shards, n_ctx=256, n_threads=1, memory_budget="50%",
                           policy="ondemand") as m:
            assert m.generate("ROMEO:", max_tokens=2, temperature=0)
            cut()
            with pytest.raises(ShardSetError, match=r"experts/blk\.\d\.\d\.gguf: cannot read "
                                                    r"expert shard \(Input/output error\)"):
                m.generate("ROMEO: what light through yonder window breaks? It is the east",
                           max_tokens=64, temperature=0)


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    # 8 layers x 8 experts of 256 x 512 (as tests/test_resume.py): 64 shards, ~15 MB as Q4_K
    return cached_checkpoint(tmp_path_factory.getbasetemp() / "tiny", "qwen3_moe",
                             tokenizer="bpe", dtype="bfloat16", hidden_size=256,
                             num_hidden_layers=8, num_experts=8, moe_intermediate_size=512)


def test_conversion_onto_a_filesystem_that_fills_up(tmp_path, big_ckpt, bundled_set):
    reference = tmp_path / "reference"
    converters.convert(big_ckpt, reference, expert_type="Q4_K", progress=False)
    with loop_fs(tmp_path / "small.img", 40 * MiB) as (mnt, _):
        # an earlier shard set on the same filesystem must come through untouched
        earlier = mnt / "earlier"
        shutil.copytree(bundled_set, earlier)
        earlier_tree = tree(earlier)
        out = mnt / "out"
        proc = subprocess.Popen(convert_cmd(big_ckpt, out), stderr=subprocess.PIPE, text=True)
        experts = out / "experts"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if experts.is_dir() and len(list(experts.glob("*.gguf"))) >= 2:
                break
            time.sleep(0.002)
        # the disk fills up under the running conversion
        filler = mnt / "filler"
        with open(filler, "wb") as f:
            free = shutil.disk_usage(mnt).free
            try:
                os.posix_fallocate(f.fileno(), 0, free)
            except OSError:
                pass
            chunk = b"\0" * (64 * KiB)
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError:
                pass
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            pytest.skip("the conversion finished before the filesystem filled up")
        assert proc.returncode == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "disk full while writing" in lines[0] and "No space left on device" in lines[0]
        assert "--resume" in lines[0]
        # nothing half-written under a final name, no manifest, the earlier set untouched
        assert not (out / "manifest.json").exists()
        done = list(experts.glob("*.gguf"))
        assert 2 <= len(done) < 64
        for p in done:
            assert p.read_bytes() == (reference / "experts" / p.name).read_bytes(), p.name
        assert tree(earlier) == earlier_tree
        ShardSet.open(earlier).verify()
        # space again: --resume completes it, identical to an uninterrupted conversion
        filler.unlink()
        resumed = subprocess.run(convert_cmd(big_ckpt, out, "--resume"), capture_output=True,
                                 text=True)
        assert resumed.returncode == 0, resumed.stderr
        assert tree(out) == tree(reference)
        ShardSet.open(out).verify()


def test_sigkill_during_plan_leaves_a_whole_plan_or_none(tmp_path, bundled_set):
    shards = tmp_path / "shards"
    shutil.copytree(bundled_set, shards)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    calibrate = subprocess.run([sys.executable, "-m", "edgemoe", "calibrate", str(shards),
                                "--tokens", "64", "--samples", "2", "-t", "1"],
                               capture_output=True, text=True, env=env)
    assert calibrate.returncode == 0, calibrate.stderr
    plan_cmd = [sys.executable, "-m", "edgemoe", "plan", str(shards), "--budget", "50%", "-t", "1",
                "-n", "32"]
    t0 = time.monotonic()
    full = subprocess.run(plan_cmd, capture_output=True, text=True, env=env)
    duration = time.monotonic() - t0
    assert full.returncode == 0, full.stderr
    good = json.loads((shards / "plan.json").read_text())
    killed = 0
    for frac in (0.3, 0.6, 0.9, 0.97):
        (shards / "plan.json").unlink(missing_ok=True)
        proc = subprocess.Popen(plan_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env)
        time.sleep(duration * frac)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed += proc.returncode == -signal.SIGKILL
        plan = shards / "plan.json"
        if plan.exists():   # written whole before the kill
            assert json.loads(plan.read_text()).keys() == good.keys()
        assert not list(shards.glob("*.tmp.*")), "a temporary file was left to be read"
        run = subprocess.run([sys.executable, "-m", "edgemoe", "run", str(shards), "-p", "ROMEO:",
                              "-n", "4", "--temp", "0", "-t", "1", "--memory-budget", "50%"],
                             capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
    assert killed >= 2, "the kills must land while plan runs"
    again = subprocess.run(plan_cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads((shards / "plan.json").read_text()).keys() == good.keys()
