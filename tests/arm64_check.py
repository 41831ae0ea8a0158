"""Run under an aarch64 Python (tests/test_arm64.py starts it through qemu-user): the engine on
the NEON kernels of cross-built llama.cpp libraries, on shard sets and inputs the x86 side
prepared. Writes what it computed to an .npz for the x86 side to judge.

    python tests/arm64_check.py WORKDIR    # reads WORKDIR/inputs.json, writes WORKDIR/arm64.npz
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgemoe import ggml  # noqa: E402
from edgemoe.engine import Engine  # noqa: E402
from edgemoe.residency.observer import EngineObserver  # noqa: E402
from edgemoe.runtime import ResidencyConfig, open_engine  # noqa: E402


class Routes(EngineObserver):
    def __init__(self):
        self.selected = {}

    def routed(self, layer, logits, x_norm, selected):
        self.selected[layer] = np.sort(selected, axis=1)

    def last(self):
        return np.stack([self.selected[l] for l in sorted(self.selected)], 1)


def teacher_forced(engine, prompt, follow):
    watch = Routes()
    engine.add_observer(watch)
    rows, routes = [engine.eval(prompt)], [watch.last()]
    for token in follow:
        rows.append(engine.eval([token]))
        routes.append(watch.last())
    return np.concatenate(rows), np.concatenate(routes)


def greedy(engine, prompt, n):
    engine.reset()
    row = engine.eval(prompt, all_logits=False)[-1]
    out = []
    for _ in range(n):
        out.append(int(row.argmax()))
        row = engine.eval([out[-1]])[-1]
    return out


def main() -> int:
    work = Path(sys.argv[1])
    spec = json.loads((work / "inputs.json").read_text())
    out = {"machine": np.array(platform.machine()),
           "features": np.array(json.dumps(ggml.backend_features("CPU")))}
    t0 = time.perf_counter()
    for arch, path in spec["shards"].items():
        with Engine(path, n_ctx=64, n_threads=1) as engine:
            logits, routes = teacher_forced(engine, spec["prompt"], spec["follow"][arch])
            out[f"{arch}.logits"], out[f"{arch}.routes"] = logits, routes
            out[f"{arch}.full"] = np.array(greedy(engine, spec["prompt"], spec["n_gen"]))
        engine, _ = open_engine(path, ResidencyConfig(memory_budget="50%", policy="ondemand"),
                                n_ctx=64, n_threads=1)
        with engine:
            out[f"{arch}.ondemand"] = np.array(greedy(engine, spec["prompt"], spec["n_gen"]))
            out[f"{arch}.misses"] = np.array(engine.policy.telemetry.counters.misses)
        print(f"arm64_check: {arch} done", flush=True)
    out["seconds"] = np.array(time.perf_counter() - t0)
    np.savez(work / "arm64.npz", **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
