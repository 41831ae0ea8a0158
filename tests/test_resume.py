"""Crash safety. A conversion killed with SIGKILL leaves nothing that passes
verification; `--resume` finishes it and the result equals an uninterrupted conversion."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import converters
from converters.writer import JOURNAL_FILE
from edgemoe.cli import main
from edgemoe.errors import ConvertError, ShardSetError
from edgemoe.shardset import MANIFEST_FILE, ShardSet
from tiny_models import cached_checkpoint


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tiny"


@pytest.fixture(scope="module")
def big_ckpt(tiny_root):
    # 8 layers x 8 experts of 256 x 512: 64 expert shards, enough work to interrupt.
    return cached_checkpoint(tiny_root, "qwen3_moe", tokenizer="bpe", dtype="bfloat16",
                             hidden_size=256, num_hidden_layers=8, num_experts=8,
                             moe_intermediate_size=512)


def convert_cmd(src, out, *extra):
    return [sys.executable, "-m", "edgemoe", "convert", str(src), str(out), "--expert-type",
            "Q4_K", "-q", *extra]


def tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_kill_then_resume_equals_uninterrupted(big_ckpt, tmp_path):
    reference = tmp_path / "reference"
    converters.convert(big_ckpt, reference, expert_type="Q4_K", progress=False)

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(convert_cmd(big_ckpt, out), stderr=subprocess.PIPE)
    experts = out / "experts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if experts.is_dir() and len(list(experts.glob("*.gguf"))) >= 2:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    n_done = len(list(experts.glob("*.gguf")))
    assert 2 <= n_done < 64, "the kill must land mid-run"
    assert not (out / MANIFEST_FILE).exists()
    with pytest.raises(ShardSetError, match="manifest.json: missing; the shard set is incomplete"):
        ShardSet.open(out)
    # every shard with its final name is complete: the same bytes as the uninterrupted run
    for p in experts.glob("*.gguf"):
        assert p.read_bytes() == (reference / "experts" / p.name).read_bytes(), p.name

    rerun = subprocess.run(convert_cmd(big_ckpt, out), capture_output=True, text=True)
    assert rerun.returncode == 1 and "exists and is not empty" in rerun.stderr
    # Finished means journaled: a kill between a shard's rename and its journal line leaves a
    # complete file (checked above) that --resume may write again, identically.
    journaled = {json.loads(line)["rel"]
                 for line in (out / JOURNAL_FILE).read_text().splitlines()[1:]
                 if line.endswith("}")}
    before = {p.name: p.stat().st_mtime_ns for p in experts.glob("*.gguf")
              if f"experts/{p.name}" in journaled}
    assert before, "no shard was journaled before the kill"
    resumed = subprocess.run(convert_cmd(big_ckpt, out, "--resume"), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    # finished shards were kept, not rewritten
    assert all((experts / n).stat().st_mtime_ns == t for n, t in before.items())
    ShardSet.open(out).verify()
    assert tree(out) == tree(reference)


def test_resume_redoes_a_corrupted_shard(tiny_root, tmp_path, capsys):
    ckpt = cached_checkpoint(tiny_root, "olmoe", tokenizer="bpe")
    out = tmp_path / "shards"
    converters.convert(ckpt, out, expert_type="Q8_0", progress=False)
    good = tree(out)
    shard = out / "experts" / "blk.1.2.gguf"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "blk.1.2.gguf: sha256 differs from the manifest" in err
    converters.convert(ckpt, out, expert_type="Q8_0", resume=True, progress=False)
    assert main(["verify", str(out)]) == 0
    assert tree(out) == good


def test_resume_with_other_settings_rewrites_and_force_overwrites(tiny_root, tmp_path):
    ckpt = cached_checkpoint(tiny_root, "olmoe", tokenizer="bpe")
    out, fresh = tmp_path / "shards", tmp_path / "fresh"
    converters.convert(ckpt, out, expert_type="Q8_0", progress=False)
    converters.convert(ckpt, fresh, expert_type="F16", progress=False)
    # a different expert type changes the plan: nothing of the old set may be reused
    converters.convert(ckpt, out, expert_type="F16", resume=True, progress=False)
    assert tree(out) == tree(fresh)
    converters.convert(ckpt, out, expert_type="Q8_0", force=True, progress=False)
    assert json.loads((out / MANIFEST_FILE).read_text())["expert_type"] == "Q8_0"
    ShardSet.open(out).verify()
    with pytest.raises(ConvertError, match="exists and is not empty"):
        converters.convert(ckpt, out, progress=False)


def test_truncated_shard_is_reported_on_open(tiny_root, tmp_path):
    ckpt = cached_checkpoint(tiny_root, "olmoe", tokenizer="bpe")
    out = tmp_path / "shards"
    converters.convert(ckpt, out, expert_type="Q8_0", progress=False)
    shard = out / "experts" / "blk.0.1.gguf"
    size = shard.stat().st_size
    os.truncate(shard, size - 10)
    with pytest.raises(ShardSetError, match=rf"blk.0.1.gguf: {size - 10} bytes, manifest says "
                                            rf"{size}"):
        ShardSet.open(out)
