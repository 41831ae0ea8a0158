#!/usr/bin/env python3
"""Soak `edgemoe serve` under a memory budget on an emulated edge board.

    sudo .venv/bin/python scripts/soak_server.py --budget 64MiB --minutes 10

The server runs inside scripts/edge_emulate.py: a memory cgroup whose limit is the budget (RSS
plus the page cache it causes, as a board with that much memory sees it) and, with --profile,
the board's storage read speed; `--memory-budget` is the same figure. Clients outside the group
hold conversations at the same time: chat turns that alternate between Shakespeare and Python
(the bundled model routes the two to different experts, so the residency policy must follow),
streamed and whole, raw completions, and now and then a client that hangs up mid-stream. Each
request must be answered (200, a finish reason, an OpenAI-shaped body); a hang-up must be
counted as a cancel by the server.

Prints the requests by kind and outcome, tokens, the server's own status over time (memory,
RSS, resident experts, hit rate, expert bytes read per token) and edge_emulate's figures: the
cgroup's peak against the limit, limit hits and OOM kills. Exit status 0 when every request was
answered and the peak stayed below the budget. Stdlib only (urllib), so it needs no client
package; root for the cgroups.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "edgemoe-tiny-shakespy"

OPENINGS = {
    "verse": ["Good morrow, what news from Verona?", "Speak, what dost thou see?",
              "My lord, the king is come.", "What say you to the queen?",
              "Wherefore art thou sad?", "Tell me of the battle."],
    "python": ["def parse_args(argv):", "How do I read a file line by line?",
               "class Queue:", "import os\nimport sys\n", "Write a function to sort a list.",
               "raise ValueError("],
}


def post(url: str, body: dict, timeout: float = 300.0):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def read_sse(resp) -> list[dict]:
    """The chunks of a streamed reply, up to [DONE] (which must come)."""
    chunks = []
    for raw in resp:
        line = raw.decode().rstrip("\n")
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return chunks
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        chunks.append(chunk)
    raise RuntimeError("the stream ended without [DONE]")


class Client(threading.Thread):
    """One user: a conversation in one domain, requests of every kind in turn."""

    def __init__(self, url: str, domain: str, seed: int, until: float, tally: Counter,
                 lock: threading.Lock, failures: list) -> None:
        super().__init__(daemon=True)
        self.url, self.domain, self.until = url, domain, until
        self.rng = random.Random(seed)
        self.tally, self.lock, self.failures = tally, lock, failures
        self.messages: list[dict] = []

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.tally[key] += n

    def run(self) -> None:
        i = 0
        while time.monotonic() < self.until:
            kind = ("chat-stream", "chat-whole", "completion", "chat-stream", "hang-up")[i % 5]
            i += 1
            try:
                getattr(self, kind.replace("-", "_"))()
                self.count(f"{kind} answered")
            except Exception as exc:  # every request must be answered: record and go on
                self.count(f"{kind} FAILED")
                with self.lock:
                    self.failures.append(f"{self.domain} {kind}: {type(exc).__name__}: {exc}")

    def _turn(self) -> dict:
        if len(self.messages) >= 6:  # keep the conversation within the context
            self.messages = self.messages[-4:]
        self.messages.append({"role": "user", "content": self.rng.choice(OPENINGS[self.domain])})
        return {"messages": self.messages, "max_tokens": 64, "temperature": 0.8,
                "seed": self.rng.randrange(1 << 30), "repeat_penalty": 1.1}

    def _answered(self, content: str, finish: str | None, usage: dict) -> None:
        if finish not in ("stop", "length"):
            raise RuntimeError(f"finish_reason {finish!r}")
        self.messages.append({"role": "assistant", "content": content})
        self.count("tokens", usage["completion_tokens"])
        self.count("prompt tokens", usage["prompt_tokens"])
        self.count("prompt tokens reused", usage["prompt_tokens_details"]["cached_tokens"])

    def chat_stream(self) -> None:
        body = {**self._turn(), "stream": True, "stream_options": {"include_usage": True}}
        with post(self.url + "/v1/chat/completions", body) as resp:
            chunks = read_sse(resp)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
        self._answered(text, finish, chunks[-1]["usage"])

    def chat_whole(self) -> None:
        with post(self.url + "/v1/chat/completions", self._turn()) as resp:
            out = json.loads(resp.read())
        choice = out["choices"][0]
        self._answered(choice["message"]["content"], choice["finish_reason"], out["usage"])

    def completion(self) -> None:
        prompt = self.rng.choice(OPENINGS[self.domain])
        body = {"prompt": prompt, "max_tokens": 48, "temperature": 0.8,
                "seed": self.rng.randrange(1 << 30)}
        with post(self.url + "/v1/completions", body) as resp:
            out = json.loads(resp.read())
        finish = out["choices"][0]["finish_reason"]
        if finish not in ("stop", "length"):
            raise RuntimeError(f"finish_reason {finish!r}")
        self.count("tokens", out["usage"]["completion_tokens"])

    def hang_up(self) -> None:
        """A streamed completion the client abandons after a few pieces."""
        host, port = self.url.removeprefix("http://").split(":")
        data = json.dumps({"prompt": self.rng.choice(OPENINGS[self.domain]), "max_tokens": 400,
                           "temperature": 0.8, "stream": True}).encode()
        with socket.create_connection((host, int(port)), timeout=300) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            seen = b""
            while seen.count(b"data: ") < 3 and b"[DONE]" not in seen:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                seen += chunk
            if not seen.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"hang-up request answered {seen[:60]!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", required=True,
                    help="memory budget, also the cgroup's limit (e.g. 64MiB)")
    ap.add_argument("--policy", default=None, help="residency policy (default: swap)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4,
                    help="concurrent clients, alternating between the two domains")
    ap.add_argument("--profile", default=None, help="edge_emulate profile for the read speed")
    ap.add_argument("--shards", type=Path, default=None,
                    help="shard set (default: the bundled model, converted into a temp dir)")
    ap.add_argument("-c", "--ctx-size", type=int, default=1024)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgemoe-soak-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    shards = args.shards
    if shards is None:
        shards = work / "shards"
        subprocess.run([sys.executable, "-m", "edgemoe", "convert", str(BUNDLED), str(shards)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    emulate = [sys.executable, str(ROOT / "scripts" / "edge_emulate.py"), "--mem", args.budget,
               "--drop", str(shards), "--json", str(work / "emulate.json")]
    if args.profile:
        emulate += ["--profile", args.profile]
    serve = [sys.executable, "-m", "edgemoe", "serve", str(shards), "--port", "0", "-t", "1",
             "-c", str(args.ctx_size), "--memory-budget", args.budget, "--queue", "64"]
    if args.policy:
        serve += ["--policy", args.policy]
    log_path = work / "server.log"
    log = open(log_path, "wb")
    emu = subprocess.Popen(emulate + ["--"] + serve, stdout=log, stderr=subprocess.STDOUT,
                           env=env)
    deadline = time.monotonic() + 180
    while True:
        m = re.search(rb"listening on (http://127\.0\.0\.1:\d+)", log_path.read_bytes())
        if m:
            url = m.group(1).decode()
            break
        if emu.poll() is not None or time.monotonic() > deadline:
            print(log_path.read_text(errors="replace"), file=sys.stderr)
            emu.kill()
            return 1
        time.sleep(0.1)
    print(f"soak: server at {url} under a {args.budget} cgroup limit and budget; "
          f"{args.clients} clients for {args.minutes:g} min (log {log_path})", flush=True)

    tally: Counter = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    until = time.monotonic() + 60 * args.minutes
    domains = ("verse", "python")
    clients = [Client(url, domains[i % 2], seed=i, until=until, tally=tally, lock=lock,
                      failures=failures) for i in range(args.clients)]
    for c in clients:
        c.start()
    samples = []
    t0 = time.monotonic()
    while any(c.is_alive() for c in clients):
        time.sleep(5)
        try:
            with urllib.request.urlopen(url + "/status", timeout=30) as r:
                s = json.loads(r.read())
        except OSError as exc:
            failures.append(f"/status: {exc}")
            continue
        samples.append(s)
        with lock:
            done = sum(n for k, n in tally.items() if k.endswith("answered"))
        print(f"  {time.monotonic() - t0:6.0f} s  requests {done:5d}  RSS "
              f"{s['rss_bytes'] / 2**20:6.1f} MiB  backend {s['memory_bytes'] / 2**20:5.1f} MiB  "
              f"experts {s['resident_experts']}/{s['total_experts']}  hit "
              f"{100 * (s['hit_rate'] or 0):5.1f}%  read "
              f"{s['bytes_read_per_token'] / 1024:6.1f} KiB/token  queue "
              f"{s['queue']['running'] + s['queue']['waiting']}", flush=True)
    for c in clients:
        c.join()
    with urllib.request.urlopen(url + "/status", timeout=30) as r:
        final = json.loads(r.read())

    # Stop the server (edge_emulate's child) gracefully; edge_emulate then writes its figures.
    import psutil  # a dependency of edgemoe itself

    for child in psutil.Process(emu.pid).children():
        child.send_signal(signal.SIGTERM)
    emu.wait(timeout=120)
    log.close()
    figures = json.loads((work / "emulate.json").read_text())
    if args.shards is None:
        shutil.rmtree(shards, ignore_errors=True)  # the logs stay in `work`

    answered = sum(n for k, n in tally.items() if k.endswith("answered"))
    failed = sum(n for k, n in tally.items() if k.endswith("FAILED"))
    limit, peak = figures["mem_limit"], figures["peak_bytes"]
    print("\nrequests:")
    for key in sorted(tally):
        print(f"  {key:<28}{tally[key]:>10}")
    print(f"server counts: {final['requests']}  tokens generated {final['tokens_generated']}")
    print(f"expert hit rate {100 * (final['hit_rate'] or 0):.1f}%, "
          f"{final['bytes_read_per_token'] / 1024:.1f} KiB of experts read per token, "
          f"resident {final['resident_experts']}/{final['total_experts']}")
    if samples:
        print(f"server RSS max {max(s['rss_bytes'] for s in samples) / 2**20:.1f} MiB over "
              f"{len(samples)} samples")
    print(f"cgroup: peak {peak / 2**20:.2f} MiB of the {limit / 2**20:.2f} MiB limit "
          f"({'held' if peak is not None and peak < limit else 'EXCEEDED'}), limit hits "
          f"{figures['limit_hits']}, OOM kills {figures['oom_kills']}, server exit {figures['rc']}")
    for line in failures[:20]:
        print("  failure:", line)
    ok = failed == 0 and answered > 0 and peak is not None and peak < limit \
        and not figures["oom_kills"] and figures["rc"] == 0
    print("soak " + ("passed" if ok else "FAILED"))
    if args.json:
        args.json.write_text(json.dumps({"tally": tally, "final_status": final,
                                         "emulate": figures, "failures": failures,
                                         "samples": samples}, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
