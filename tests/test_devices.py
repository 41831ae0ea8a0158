"""The engine on a ggml device other than the CPU: parity of every architecture against the CPU
backend, the residency policies' lossless runs and a budgeted run, with expert slots in the
device's memory.

One body of tests, run per device kind under its marker (deselected by default, see
pyproject.toml):
- vulkan: after `scripts/build_backend.sh vulkan` (Mesa's llvmpipe here, no GPU needed):
      EDGEMOE_LIB_DIR=<its lib dir> GGML_VK_VISIBLE_DEVICES=0 pytest -m vulkan
  A requested Vulkan run without a Vulkan device fails (it says how to build one); it never skips.
- cuda / metal: after `scripts/build_backend.sh cuda|metal`, `pytest -m cuda` / `-m metal`;
  these skip, saying why, where the libraries in use have no such device.

Tolerance: logits agree with the CPU's to a normalised mean squared error of 5e-4, the bound
ggml's own backend tests (tests/test-backend-ops.cpp) set for MUL_MAT and MUL_MAT_ID against
the CPU (element-wise ops get 1e-7; a whole model is a chain of matmuls).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_models import ARCHS, greedy_tokens, make_tiny_shards

pytest.importorskip("transformers")

from edgemoe import _lib, ggml  # noqa: E402
from edgemoe.engine import Engine  # noqa: E402
from edgemoe.errors import BudgetError  # noqa: E402
from edgemoe.residency.observer import EngineObserver  # noqa: E402
from edgemoe.runtime import (ResidencyConfig, device_fixed_bytes, empty_policy,  # noqa: E402
                             open_engine)

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "edgemoe-tiny-shakespy"
PROMPT = [5, 9, 33, 2, 100, 7, 8, 61, 12, 90, 4, 77, 3, 19]
N_GEN = 16
MAX_NMSE = 5e-4

# marker -> (device name, how to get one, whether its absence fails the run)
KINDS = {
    "vulkan": ("Vulkan0", "scripts/build_backend.sh vulkan, then EDGEMOE_LIB_DIR=<its lib> "
               "GGML_VK_VISIBLE_DEVICES=0 (llvmpipe is a CPU Vulkan device ggml skips otherwise)",
               True),
    "cuda": ("CUDA0", "an NVIDIA GPU and scripts/build_backend.sh cuda", False),
    "metal": ("MTL0", "a Mac and scripts/build_backend.sh metal", False),
}
pytestmark = pytest.mark.parametrize("kind", [pytest.param(k, marks=getattr(pytest.mark, k))
                                              for k in KINDS])


@pytest.fixture
def device(kind) -> str:
    name, how, required = KINDS[kind]
    names = [d["name"] for d in ggml.list_devices()]
    if name not in names:
        msg = (f"no {name} device in the ggml libraries at {_lib.lib_dir()} (devices: "
               f"{', '.join(names)}); needs {how}")
        if required:
            pytest.fail(msg)
        pytest.skip(msg)
    return name


class _Lazy(dict):
    """Shard sets built on first use (a skipped device builds none)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, arch: str) -> Path:
        self[arch] = make_tiny_shards(arch, self.root, "Q8_0", seed=7)
        return self[arch]


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    return _Lazy(tmp_path_factory.mktemp("devices"))


def nmse(want: np.ndarray, got: np.ndarray) -> float:
    """test-backend-ops' error measure: sum (a - b)^2 / sum a^2."""
    want, got = want.astype(np.float64), got.astype(np.float64)
    return float(((want - got) ** 2).sum() / (want ** 2).sum())


class _Routes(EngineObserver):
    """The experts each token ran, per MoE layer, of the last step."""

    def __init__(self):
        self.selected: dict[int, np.ndarray] = {}

    def routed(self, layer, logits, x_norm, selected):
        self.selected[layer] = np.sort(selected, axis=1)

    def last(self) -> np.ndarray:  # (n_tokens, n_moe_layers, k)
        return np.stack([self.selected[l] for l in sorted(self.selected)], 1)


def _logits(engine, follow: list[int] | None = None):
    """Prompt logits, then N_GEN decode steps' logits, the greedy tokens and the routes; the
    steps feed `follow` when given (the inputs of the run compared against), else the greedy
    tokens."""
    watch = _Routes()
    engine.add_observer(watch)
    rows, routes = [engine.eval(PROMPT)], [watch.last()]
    tokens = []
    for i in range(N_GEN):
        tokens.append(int(rows[-1][-1].argmax()))
        rows.append(engine.eval([follow[i] if follow else tokens[-1]]))
        routes.append(watch.last())
    engine.remove_observer(watch)
    return np.concatenate(rows), tokens, np.concatenate(routes)


def _greedy(engine, n=N_GEN) -> list[int]:
    return greedy_tokens(engine, PROMPT, n)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_matches_the_cpu(shard_sets, device, arch):
    """Same inputs on both devices. A router's choices are discrete: where two experts' scores
    nearly tie (or, with phimoe's sparsemixer, a score sits at its threshold) a rounding
    difference flips the choice and that token's logits move far, and so do every later
    token's, whose attention reads the changed cache (seen here on llvmpipe: 1 token of 30 in
    qwen2_moe, 1 of 30 in phimoe). So the positions compared are those before the first
    differing route (routes must agree for 90% of all positions); there the typical (median)
    token's logits must be within ggml's matmul tolerance and the top-1 token must agree."""
    with Engine(shard_sets[arch], n_ctx=64, n_threads=1, device="CPU") as cpu:
        want, want_tokens, want_routes = _logits(cpu)
    with Engine(shard_sets[arch], n_ctx=64, n_threads=1, device=device) as dev:
        assert dev.device == device
        got, _, routes = _logits(dev, follow=want_tokens)
    same = (routes == want_routes).all(axis=(1, 2))
    assert same.mean() >= 0.9, f"{arch} on {device}: routes agree for {same.mean():.0%} of tokens"
    n = int(np.argmin(same)) if not same.all() else len(same)
    assert n >= 1, f"{arch} on {device}: the first token's routes differ"
    rows = [nmse(want[i:i + 1], got[i:i + 1]) for i in range(n)]
    err = float(np.median(rows))
    assert err <= MAX_NMSE, f"{arch} on {device}: median logits NMSE {err:.3g} > {MAX_NMSE}"
    agree = float((want[:n].argmax(-1) == got[:n].argmax(-1)).mean())
    assert agree >= 0.9, f"{arch} on {device}: top-1 agrees on {agree:.0%} of positions"


def test_expert_slots_live_in_device_memory(shard_sets, device):
    with Engine(shard_sets["qwen3_moe"], n_ctx=64, n_threads=1, device=device) as engine:
        backend = engine.backend
        assert engine.pool.buffer.buffer_type == backend.weights_buffer_type
        assert engine.pool.buffer.buffer_type != backend.host_buffer_type, backend.placement
        where = engine.memory_by_place()
        assert where["device"] >= engine.pool.bytes_held() + engine.weights.nbytes
        free, total = backend.memory()
        assert 0 < total and 0 <= free <= total


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_ondemand_on_the_device_is_lossless(shard_sets, device, arch):
    """Exact routing's per-layer graphs with half the experts resident give full's greedy text."""
    with Engine(shard_sets[arch], n_ctx=64, n_threads=1, device=device) as full:
        want = _greedy(full)
    for n_prefetch in (0, 1):
        engine, plan = open_engine(shard_sets[arch], ResidencyConfig(
            memory_budget="50%", policy="ondemand", n_prefetch=n_prefetch), n_ctx=64,
            n_threads=1, device=device)
        with engine:
            assert set(plan.slots.values()) == {2}
            assert _greedy(engine) == want, f"{arch} ondemand prefetch={n_prefetch} on {device}"
            assert engine.policy.telemetry.counters.misses > 0


def test_swap_with_every_expert_resident_is_lossless(shard_sets, device):
    with Engine(shard_sets["qwen3_moe"], n_ctx=64, n_threads=1, device=device) as full:
        want = _greedy(full)
    for policy in ("swap", "static"):
        engine, _ = open_engine(shard_sets["qwen3_moe"], ResidencyConfig(
            memory_budget="100%", policy=policy), n_ctx=64, n_threads=1, device=device)
        with engine:
            assert _greedy(engine) == want, f"{policy} at 100% on {device}"


def test_device_budget_bounds_the_device_memory(shard_sets, device):
    """--device-budget: refused below the device's minimum (saying it); otherwise the slots
    are cut until the device's buffers fit, and ondemand stays lossless."""
    path = shard_sets["qwen3_moe"]
    with Engine(path, n_ctx=64, n_threads=1, device=device) as full:
        want = _greedy(full)
    with pytest.raises(BudgetError, match=f"below the minimum of .* on {device}"):
        open_engine(path, ResidencyConfig(device_budget="64KiB", policy="ondemand"), n_ctx=64,
                    n_threads=1, device=device)
    kw = dict(n_ctx=64, n_threads=1, device=device, n_batch=512, kv_type="f16", n_outputs=1)
    fixed, slot_bytes, sub_bytes, name = device_fixed_bytes(path, 2, empty_policy("ondemand", 2),
                                                            kw)
    assert slot_bytes and sub_bytes is None and name == device
    big, _ = open_engine(path, ResidencyConfig(device_budget="64GiB", policy="ondemand"),
                         n_ctx=64, n_threads=1, device=device)
    with big:
        one = sum(big.pool.expert_bytes(l) for l in big.pool.layers)   # a slot in every layer
        # The probe's measure is what the engine holds there (compute buffers alike).
        assert big.memory_by_place()["device"] - big.pool.bytes_held() <= fixed
    budget = fixed + 3 * one
    engine, plan = open_engine(path, ResidencyConfig(device_budget=str(budget), policy="ondemand"),
                               n_ctx=64, n_threads=1, device=device)
    with engine:
        assert set(plan.slots.values()) == {3}
        assert engine.memory_by_place()["device"] <= budget
        assert _greedy(engine) == want


def test_device_budget_counts_the_substitute_tier(tmp_path, device):
    """swap keeps the low-bit substitutes resident beside its full slots, in the device's
    memory too: --device-budget counts them (and the second expert pass's compute buffers), so
    the device never holds more than the budget; a tight budget keeps fewer substitutes per
    layer, first, before any full slot is cut below what fits."""
    import converters
    from tiny_models import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint("qwen3_moe", tmp_path / "hf", seed=3)
    path = tmp_path / "shards"
    converters.convert(ckpt, path, expert_type="Q8_0", dense_type="Q8_0",
                       substitute_type="Q4_0", progress=False)
    kw = dict(n_ctx=64, n_threads=1, device=device, n_batch=512, kv_type="f16", n_outputs=1)
    fixed, slot_bytes, sub_bytes, _ = device_fixed_bytes(
        path, 2, empty_policy("swap", 2, substitutes=True), kw,
        n_substitutes={0: 1, 1: 1})
    assert sub_bytes and all(sub_bytes[l] < slot_bytes[l] for l in slot_bytes)
    one, one_sub = sum(slot_bytes.values()), sum(sub_bytes.values())
    # What swap keeps with no bound on the device (the experts' bytes split between both tiers).
    unbounded, plan = open_engine(path, ResidencyConfig(device_budget="64GiB", policy="swap"),
                                  **{k: v for k, v in kw.items() if k != "n_outputs"})
    unbounded.close()
    (n_full0,), (n_sub0,) = set(plan.slots.values()), set(plan.substitutes.values())
    assert n_full0 >= 2 and n_sub0 >= 3
    cases = {   # budget -> (full slots per layer, substitutes per layer)
        fixed + n_full0 * one + n_sub0 * one_sub: (n_full0, n_sub0),   # all of it, exactly
        fixed + 2 * one + 2 * one_sub + one_sub // 2: (2, 2),   # two substitutes fit, not three
        fixed + 2 * one + one_sub - 1: (2, None),               # not one substitute: none
    }
    for budget, (n_full, n_subs) in cases.items():
        engine, plan = open_engine(path, ResidencyConfig(device_budget=str(budget), policy="swap"),
                                   **{k: v for k, v in kw.items() if k != "n_outputs"})
        with engine:
            assert set(plan.slots.values()) == {n_full}, budget
            assert plan.substitutes == (dict.fromkeys(plan.slots, n_subs) if n_subs else None)
            held = engine.memory_by_place()["device"]
            assert held <= budget, f"{held} bytes on {device} over the budget of {budget}"
            assert engine.pool.substitutes == bool(n_subs)
            engine.eval(PROMPT)   # runs, substitutes and all


def test_plan_profile_knows_the_device_copy_bandwidth(shard_sets, device):
    from edgemoe.cli_budget import measure_profile

    profile = measure_profile(shard_sets["qwen3_moe"], n_threads=1, n_decode=4, device=device)
    assert profile.copy_bytes_per_s and profile.copy_bytes_per_s > 0
    nbytes = 1 << 20   # a load is its read, then its copy into the device's slot
    assert profile.read_seconds(nbytes) == pytest.approx(
        profile.read_latency_s + nbytes / profile.read_bytes_per_s
        + nbytes / profile.copy_bytes_per_s)


def _edgemoe(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "edgemoe", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_budgeted_runs_of_the_bundled_model(device, tmp_path):
    """`edgemoe run --device D` under a budget: ondemand gives the CPU's greedy text exactly;
    swap runs and reports its residency."""
    if not BUNDLED.exists():
        pytest.fail(f"{BUNDLED} is missing")
    args = [str(BUNDLED), "-p", "ROMEO:", "-n", "24", "--temp", "0", "-t", "1", "-c", "256"]
    cpu = _edgemoe("run", *args, "--device", "CPU")
    assert cpu.returncode == 0, cpu.stderr
    ondemand = _edgemoe("run", *args, "--device", device, "--memory-budget", "50%",
                        "--policy", "ondemand")
    assert ondemand.returncode == 0, ondemand.stderr
    assert ondemand.stdout == cpu.stdout
    swap = _edgemoe("run", *args, "--device", device, "--memory-budget", "50%", "--policy",
                    "swap", "--stats-json", str(tmp_path / "stats.json"))
    assert swap.returncode == 0, swap.stderr
    assert swap.stdout.startswith("ROMEO:") and len(swap.stdout) > len("ROMEO:") + 10
    assert "[swap]" in swap.stderr


def test_devices_command_lists_the_device_with_its_memory(device):
    out = _edgemoe("devices", timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith(device))
    assert "iB" in line  # free and total memory, e.g. 23.5 GiB
