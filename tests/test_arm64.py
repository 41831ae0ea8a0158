"""The engine on aarch64 (NEON kernels) under qemu-user emulation: parity with the x86 run and
ondemand's lossless decode, for two architectures. Run it with scripts/test_arm64.sh, which
builds the arm64 root and the cross-compiled libraries and sets EDGEMOE_ARM64_ROOT (a Debian
arm64 root with python3, numpy, gguf, psutil) and EDGEMOE_ARM64_LIB (llama.cpp's libraries
built for aarch64). Under emulation timings are not speeds: none is asserted or reported as one.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tiny_models import make_tiny_shards

pytestmark = pytest.mark.arm64
pytest.importorskip("transformers")

from edgemoe.engine import Engine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("qwen3_moe", "mixtral")
PROMPT = [5, 9, 33, 2, 100, 7, 8, 61, 12, 90, 4, 77, 3, 19]
N_GEN = 12
MAX_NMSE = 5e-4   # ggml's MUL_MAT tolerance between backends (tests/test-backend-ops.cpp)


def _arm64_env() -> dict[str, str]:
    root, libs = os.environ.get("EDGEMOE_ARM64_ROOT"), os.environ.get("EDGEMOE_ARM64_LIB")
    if not (root and libs and Path(root, "usr/bin/python3").exists() and Path(libs).is_dir()):
        pytest.fail("run through scripts/test_arm64.sh (it sets EDGEMOE_ARM64_ROOT and "
                    "EDGEMOE_ARM64_LIB after building the arm64 root and libraries)")
    multiarch = Path(root, "usr/lib/aarch64-linux-gnu")
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
            "QEMU_LD_PREFIX": root, "EDGEMOE_LIB_DIR": libs,
            # Debian's BLAS/LAPACK are reached through absolute /etc/alternatives symlinks,
            # which resolve on the host under QEMU_LD_PREFIX: name their directories.
            "LD_LIBRARY_PATH": f"{multiarch / 'blas'}:{multiarch / 'lapack'}"}


def _elf_machine(path: Path) -> int:
    with open(path, "rb") as f:
        header = f.read(20)
    return int.from_bytes(header[18:20], "little")   # e_machine: 183 = EM_AARCH64


def _x86_reference(path: Path):
    """Logits and routes on this (x86) CPU; the decode steps feed the greedy tokens."""
    from test_devices import _Routes

    with Engine(path, n_ctx=64, n_threads=1) as engine:
        watch = _Routes()
        engine.add_observer(watch)
        rows, routes, tokens = [engine.eval(PROMPT)], [watch.last()], []
        for _ in range(N_GEN):
            tokens.append(int(rows[-1][-1].argmax()))
            rows.append(engine.eval([tokens[-1]]))
            routes.append(watch.last())
    return np.concatenate(rows), np.concatenate(routes), tokens


def test_neon_kernels_match_x86_and_ondemand_is_lossless(tmp_path):
    env = _arm64_env()
    assert _elf_machine(Path(env["EDGEMOE_LIB_DIR"]) / "libggml-cpu.so") == 183
    shards = {arch: make_tiny_shards(arch, tmp_path, "Q8_0", seed=11) for arch in ARCHS}
    ref = {arch: _x86_reference(p) for arch, p in shards.items()}
    (tmp_path / "inputs.json").write_text(json.dumps({
        "shards": {a: str(p) for a, p in shards.items()}, "prompt": PROMPT, "n_gen": N_GEN,
        "follow": {a: ref[a][2] for a in ARCHS}}))
    python = Path(env["QEMU_LD_PREFIX"], "usr/bin/python3")
    t = time.monotonic()
    run = subprocess.run([str(python), str(ROOT / "tests" / "arm64_check.py"), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=3600)
    elapsed = time.monotonic() - t
    assert run.returncode == 0, run.stderr[-4000:]
    got = np.load(tmp_path / "arm64.npz")
    assert str(got["machine"]) == "aarch64"
    features = json.loads(str(got["features"]))
    assert features.get("NEON") == "1", features
    print(f"\naarch64 under qemu: {elapsed:.0f} s wall for both architectures (emulated; not a "
          f"speed); CPU features {' '.join(k for k, v in features.items() if v == '1')}")
    for arch in ARCHS:
        want, want_routes, _ = ref[arch]
        logits, routes = got[f"{arch}.logits"], got[f"{arch}.routes"]
        same = (routes == want_routes).all(axis=(1, 2))
        assert same.mean() >= 0.9, f"{arch}: routes agree for {same.mean():.0%} of tokens"
        err = float(((want[same] - logits[same]) ** 2).sum() / (want[same] ** 2).sum())
        print(f"{arch}: NMSE vs x86 {err:.2e} over {same.sum()}/{same.size} positions routed "
              "alike")
        assert err <= MAX_NMSE, f"{arch}: NEON vs x86 logits NMSE {err:.3g}"
        assert (want[same].argmax(-1) == logits[same].argmax(-1)).mean() >= 0.9
        # Lossless: ondemand with half the experts resident decodes full's greedy text exactly.
        assert got[f"{arch}.misses"] > 0
        assert list(got[f"{arch}.ondemand"]) == list(got[f"{arch}.full"]), arch
