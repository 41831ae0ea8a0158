"""The engine on llama.cpp's RPC backend: a local ggml-rpc-server (from the same build, started
and killed here) serves as the device over loopback.

    scripts/build_backend.sh rpc            # or: vulkan rpc
    EDGEMOE_LIB_DIR=<its lib dir> pytest -m rpc

The server binary is found beside that lib dir (../bin/ggml-rpc-server) or at
$EDGEMOE_RPC_SERVER. A requested RPC run without one fails, saying how to build it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tiny_models import make_tiny_shards

pytestmark = pytest.mark.rpc
pytest.importorskip("transformers")

from edgemoe import _lib, ggml  # noqa: E402
from edgemoe.engine import Engine  # noqa: E402
from edgemoe.errors import EdgeMoeError  # noqa: E402
from edgemoe.runtime import ResidencyConfig, open_engine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "edgemoe-tiny-shakespy"
PROMPT = [5, 9, 33, 2, 100, 7, 8, 61, 12, 90, 4, 77, 3, 19]
N_GEN = 16


def _server_binary() -> Path:
    env = os.environ.get("EDGEMOE_RPC_SERVER")
    path = Path(env) if env else _lib.lib_dir().parent / "bin" / "ggml-rpc-server"
    if not path.is_file():
        pytest.fail(f"no ggml-rpc-server at {path}: build one with `scripts/build_backend.sh rpc` "
                    "and set EDGEMOE_LIB_DIR to its lib dir (or EDGEMOE_RPC_SERVER)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RpcServer:
    """ggml-rpc-server on 127.0.0.1:<free port>, on the CPU with one thread."""

    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        # The server's CPU, not llvmpipe; the libraries beside it are the ones it was built with.
        env = {**os.environ, "GGML_VK_VISIBLE_DEVICES": "",
               "LD_LIBRARY_PATH": str(_lib.lib_dir())}
        self.proc = subprocess.Popen([str(_server_binary()), "-H", "127.0.0.1", "-p",
                                      str(self.port), "-t", "1", "-d", "CPU"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ggml-rpc-server exited: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError("ggml-rpc-server did not listen within 30 s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def server():
    srv = RpcServer()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def rpc_device(server) -> str:
    names = ggml.add_rpc_server(server.endpoint)
    assert names and all(n.startswith("RPC") for n in names)
    return names[0]


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rpc")
    return {arch: make_tiny_shards(arch, root, "Q8_0", seed=9) for arch in ("qwen3_moe", "qwen2_moe")}


def _logits(engine, follow: list[int] | None = None) -> tuple[np.ndarray, list[int]]:
    """Prompt logits, then N_GEN decode steps' (feeding `follow`, else the greedy tokens)."""
    rows = [engine.eval(PROMPT)]
    tokens = []
    for i in range(N_GEN):
        tokens.append(int(rows[-1][-1].argmax()))
        rows.append(engine.eval([follow[i] if follow else tokens[-1]]))
    return np.concatenate(rows), tokens


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_rpc_device_matches_local(shard_sets, rpc_device, arch):
    with Engine(shard_sets[arch], n_ctx=64, n_threads=1, device="CPU") as local:
        want, want_tokens = _logits(local)
    with Engine(shard_sets[arch], n_ctx=64, n_threads=1, device=rpc_device) as remote:
        assert remote.device == rpc_device
        start = remote.link_bytes()
        got, tokens = _logits(remote, follow=want_tokens)
        assert remote.link_bytes() > start   # the work went over the link
        assert remote.memory_by_place()["device"] >= remote.pool.bytes_held()
    # The server computes with the same CPU kernels: the same numbers up to float rounding.
    err = float(((want - got) ** 2).sum() / (want ** 2).sum())
    assert err <= 1e-7, f"{arch}: NMSE {err:.3g}"
    assert tokens == want_tokens


def test_ondemand_over_rpc_is_lossless(shard_sets, rpc_device):
    """Experts loaded on demand are written into slots on the server."""
    with Engine(shard_sets["qwen3_moe"], n_ctx=64, n_threads=1, device="CPU") as local:
        _, want = _logits(local)
    engine, _ = open_engine(shard_sets["qwen3_moe"], ResidencyConfig(
        memory_budget="50%", policy="ondemand"), n_ctx=64, n_threads=1, device=rpc_device)
    with engine:
        _, got = _logits(engine)
        assert engine.policy.telemetry.counters.misses > 0
    assert got == want


def _edgemoe(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GGML_VK_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "edgemoe", *args], capture_output=True,
                          text=True, env=env, **kw)


RUN = [str(BUNDLED), "-p", "ROMEO:", "-n", "24", "--temp", "0", "-t", "1", "-c", "256"]


def test_run_with_rpc_matches_local_and_reports_link_bytes(server):
    local = _edgemoe("run", *RUN, "--device", "CPU", timeout=300)
    assert local.returncode == 0, local.stderr
    remote = _edgemoe("run", *RUN, "--rpc", server.endpoint, timeout=300)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout
    line = next(l for l in remote.stderr.splitlines() if "RPC link" in l)
    per_token = float(line.split("RPC link")[1].split("KiB/token")[0])
    assert per_token > 0, line


def test_refusing_peer_is_a_clear_error_at_once(shard_sets):
    port = _free_port()   # nothing listens there
    t = time.monotonic()
    with pytest.raises(EdgeMoeError, match=f"RPC server 127.0.0.1:{port}: cannot connect"):
        ggml.add_rpc_server(f"127.0.0.1:{port}")
    out = _edgemoe("run", *RUN, "--rpc", f"127.0.0.1:{port}", timeout=60)
    assert out.returncode == 1
    assert f"RPC server 127.0.0.1:{port}: cannot connect" in out.stderr
    assert time.monotonic() - t < 30


def _break_server_mid_run(srv: RpcServer, sig: int, *extra: str, wait: float = 60):
    """Start a long `edgemoe run --rpc`, send the server `sig` once generated text streams;
    returns (exit status, stderr, seconds from the signal to the run's end)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GGML_VK_VISIBLE_DEVICES": ""}
    args = [str(BUNDLED), "-p", "ROMEO:", "-n", "-1", "--temp", "0", "-t", "1", "-c", "2048"]
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "run", *args, "--rpc",
                             srv.endpoint, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        # Wait until text streams (the prompt is echoed first, then generated text).
        got = b""
        deadline = time.monotonic() + 120
        while len(got) < 40 and time.monotonic() < deadline and proc.poll() is None:
            got += os.read(proc.stdout.fileno(), 64)
        assert proc.poll() is None, proc.stderr.read().decode()
        srv.proc.send_signal(sig)
        t = time.monotonic()
        try:
            _, err = proc.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            pytest.fail(f"edgemoe run hung for {wait} s after the RPC server got signal {sig}")
        return proc.returncode, err.decode(), time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_server_mid_run_is_a_clear_error_within_seconds():
    """The server dies while tokens stream: the run ends with an error naming the peer within
    seconds (ggml's RPC client would abort the process; edgemoe turns that into exit 1)."""
    srv = RpcServer()
    try:
        status, err, elapsed = _break_server_mid_run(srv, signal.SIGKILL, wait=30)
        assert status == 1, err
        assert f"lost the RPC server at {srv.endpoint}" in err
        assert elapsed < 10, f"took {elapsed:.1f} s"
    finally:
        srv.kill()


def test_stopped_server_mid_run_times_out_naming_it():
    """The server stops answering but keeps its socket open (SIGSTOP: its kernel still
    acknowledges what is sent, so TCP alone never notices): ggml's client would wait forever;
    with --rpc-timeout the run ends with an error naming the peer within the timeout plus a few
    seconds."""
    srv = RpcServer()
    timeout = 4
    try:
        status, err, elapsed = _break_server_mid_run(srv, signal.SIGSTOP, "--rpc-timeout",
                                                     str(timeout), wait=60)
        assert status == 1, err
        assert f"{srv.endpoint} did not answer within {timeout} s" in err, err
        assert elapsed < timeout + 5, f"took {elapsed:.1f} s"
    finally:
        srv.proc.send_signal(signal.SIGCONT)
        srv.kill()


def test_server_stopped_before_the_run_times_out_in_the_handshake():
    """A stopped server's kernel still accepts connections: the run's first exchange (ggml's
    handshake, waiting before the connection could be given a timeout) must end too."""
    srv = RpcServer()
    timeout = 3
    try:
        srv.proc.send_signal(signal.SIGSTOP)
        t = time.monotonic()
        out = _edgemoe("run", *RUN, "--rpc", srv.endpoint, "--rpc-timeout", str(timeout),
                       timeout=120)
        elapsed = time.monotonic() - t
        assert out.returncode == 1, out.stderr
        assert f"{srv.endpoint} did not answer within {timeout} s" in out.stderr, out.stderr
        assert elapsed < timeout + 20, f"took {elapsed:.1f} s (python's start included)"
    finally:
        srv.proc.send_signal(signal.SIGCONT)
        srv.kill()


def test_reply_timeout_bounds_a_wait_not_an_idle_connection(server, shard_sets):
    """The timeout bounds a wait for a reply, not the connection's life: an engine left idle
    three times longer than its timeout between tokens decodes on (in a child process: a
    timeout that fired would end it)."""
    script = f"""
import sys, time
from edgemoe import ggml
from edgemoe.engine import Engine
ggml.add_rpc_server({server.endpoint!r}, reply_timeout=0.5)
with Engine({str(shard_sets["qwen3_moe"])!r}, n_ctx=64, n_threads=1, device="RPC0") as e:
    assert ggml.arm_rpc_sockets() == 0   # the backend's connection was armed when it opened
    tokens = [int(e.eval({PROMPT!r})[-1].argmax())]
    for _ in range(3):
        time.sleep(1.5)
        tokens.append(int(e.eval([tokens[-1]])[-1].argmax()))
print(tokens)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GGML_VK_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    with Engine(shard_sets["qwen3_moe"], n_ctx=64, n_threads=1, device="CPU") as local:
        _, want = _logits(local)
    assert out.stdout.strip() == str(want[:4])
