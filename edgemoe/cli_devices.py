"""`edgemoe devices`: the ggml devices the installed build (or EDGEMOE_LIB_DIR's) registered,
with their memory, and the `--rpc` flag that adds an rpc-server's devices."""
from __future__ import annotations

import argparse
import json

from edgemoe.errors import EdgeMoeError


def add_rpc_arg(p: argparse.ArgumentParser) -> None:
    from edgemoe.cli import ranged

    p.add_argument("--rpc", default=None, metavar="HOST:PORT[,...]",
                   help="use the devices of llama.cpp's rpc-server(s) at these endpoints "
                   "(ggml-rpc-server from a build with `scripts/build_backend.sh rpc`); they "
                   "become RPC0, RPC1, ... and, unless --device says otherwise, the device")
    p.add_argument("--rpc-timeout", type=ranged(float, 0.0), default=None, metavar="SECONDS",
                   help="end the run with an error when an RPC server leaves a request "
                   "unanswered this long (stopped, overloaded or unreachable); it must exceed "
                   "the longest graph the server computes, e.g. a whole prompt batch on a slow "
                   "peer; 0 waits forever (default: 120)")


def register_rpc(endpoints: str | None, timeout: float | None = None) -> list[str]:
    """Register the rpc-servers named by --rpc (each request's reply awaited at most
    `timeout` seconds; None: the default); returns their device names."""
    if not endpoints:
        return []
    from edgemoe import ggml

    names = []
    for endpoint in (e.strip() for e in endpoints.split(",")):
        if not endpoint:
            raise EdgeMoeError(f"--rpc {endpoints!r}: an empty endpoint")
        names += ggml.add_rpc_server(
            endpoint, reply_timeout=ggml.RPC_TIMEOUT if timeout is None else timeout)
    return names


def _size(n: int) -> str:
    from edgemoe.residency.budget import format_bytes

    return format_bytes(n) if n else "-"


def cmd_devices(args: argparse.Namespace) -> int:
    from edgemoe import _lib, ggml

    register_rpc(args.rpc, args.rpc_timeout)
    devices = ggml.list_devices()
    if args.json:
        print(json.dumps({"lib_dir": str(_lib.lib_dir()), "cpu_features": ggml.backend_features(),
                          "devices": [{k: v for k, v in d.items() if k != "handle"}
                                      for d in devices]}, indent=1))
        return 0
    print(f"ggml libraries: {_lib.lib_dir()}")
    features = ggml.backend_features("CPU")
    print("CPU features:   " + (" ".join(k for k, v in features.items() if v == "1") or "-"))
    print(f"{'device':<12}{'kind':<7}{'free':>12}{'total':>12}  description")
    for d in devices:
        print(f"{d['name']:<12}{d['kind']:<7}{_size(d['memory_free']):>12}"
              f"{_size(d['memory_total']):>12}  {d['description']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "devices", help="list the ggml devices (CPU, Vulkan0, CUDA0, RPC0, ...) with memory",
        description="The devices the ggml libraries in use registered (llama-cpp-python's, or "
        "EDGEMOE_LIB_DIR's: scripts/build_backend.sh builds Vulkan, CUDA, Metal and RPC "
        "variants), with free and total memory as each backend reports it. `run --device NAME` "
        "selects one. A CPU Vulkan device (Mesa's llvmpipe) is listed only with "
        "GGML_VK_VISIBLE_DEVICES set.")
    add_rpc_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_devices)
