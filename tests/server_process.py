"""Start `edgemoe serve` as a real process on a free loopback port, for the server tests."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "edgemoe-tiny-shakespy"

_CONVERTED: dict[str, Path] = {}


def converted_bundled(tmp_path_factory) -> Path:
    """The bundled model converted once per test session (Q4_K experts, Q8_0 dense: the
    converter's defaults, as a user gets them)."""
    if "bundled" not in _CONVERTED:
        import converters

        out = tmp_path_factory.mktemp("bundled") / "shards"
        converters.convert(BUNDLED, out, progress=False)
        _CONVERTED["bundled"] = out
    return _CONVERTED["bundled"]


class ServerProcess:
    """`python -m edgemoe serve SHARDS --port 0 ...`; the port comes from its log line."""

    def __init__(self, shards: Path, *args: str, log: Path, timeout: float = 120.0,
                 env: dict | None = None) -> None:
        self.log_path = log
        self.log = open(log, "wb")
        env = {**os.environ, **(env or {}),
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgemoe", "serve", str(shards), "--host", "127.0.0.1",
             "--port", "0", "-t", "1", *args],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(rb"listening on (http://127\.0\.0\.1:\d+)", log.read_bytes())
            if match:
                self.url = match.group(1).decode()
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start: {self.output()}")
            time.sleep(0.05)
        while True:  # bound; uvicorn answers once its startup is done
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"the server does not answer: {self.output()}")
                time.sleep(0.05)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, headers: dict | None = None) -> dict:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes | dict, headers: dict | None = None):
        """(status, headers, parsed JSON or raw bytes) without raising on 4xx/5xx."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, hdrs, raw = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            status, hdrs, raw = exc.code, dict(exc.headers), exc.read()
        try:
            return status, hdrs, json.loads(raw)
        except ValueError:
            return status, hdrs, raw

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: uvicorn shuts down gracefully
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
