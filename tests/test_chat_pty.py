"""`edgemoe chat` driven through a pseudo-terminal, as a person at a keyboard would: a prompt,
a streamed reply with its status line, /stats, Ctrl-C during a reply and at the prompt, /reset,
and /exit."""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from test_generate import converted_tiny

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")

STATUS = re.compile(rb"\[mem [\d.]+ MiB \(RSS [\d.]+ MiB\) \| experts \d+/\d+ resident \| hit rate [\d.]+% \| "
                    rb"[\d.]+ tok/s \| ctx \d+/\d+\]")


class Terminal:
    """A child process on a pty; `expect` reads until a pattern shows up."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            try:
                # A person's terminal delivers Ctrl-C; a test run started in the background
                # of a non-interactive shell would have the child inherit SIGINT ignored.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.seen = b""

    def expect(self, pattern: bytes | re.Pattern, timeout: float = 180.0) -> re.Match:
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.seen)
            if match:
                self.seen = self.seen[match.end():]
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {regex.pattern!r}; got {self.seen!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed waiting for {regex.pattern!r}; "
                                         f"got {self.seen!r}")
                self.seen += chunk

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += os.read(self.fd, 4096)
            except OSError:
                time.sleep(0.05)
        os.kill(self.pid, 9)
        raise AssertionError("edgemoe chat did not exit")

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture(params=["tiny", "bundled"])
def chat_model(request, tmp_path_factory) -> tuple[Path, list[str]]:
    """A converted tiny random model (greedy), and the bundled model's checkpoint directory,
    which `edgemoe chat` converts on first use as a new user would run it (seeded sampling: a
    small model's greedy reply to a chat prompt can be nothing but newlines)."""
    if request.param == "tiny":
        return converted_tiny(tmp_path_factory), ["--temp", "0"]
    bundled = sorted(p.parent for p in (ROOT / "models").glob("*/config.json"))
    if not bundled:
        pytest.skip("no bundled model under models/")
    return bundled[0], ["--temp", "0.8", "--seed", "7", "--repeat-penalty", "1.2"]


def test_chat_session_through_a_pty(chat_model, tmp_path):
    model, sampling = chat_model
    env = {**os.environ, "EDGEMOE_CACHE": str(tmp_path / "cache")}
    term = Terminal([sys.executable, "-m", "edgemoe", "chat", str(model), *sampling,
                     "-n", "400", "-c", "1024", "-t", "1"], env)
    try:
        term.expect(b"/reset")  # the banner lists the commands
        term.expect(b"> ")

        term.send(b"Hello, who are you?\r")
        term.expect(b"Hello, who are you?")  # the terminal's echo
        reply = term.expect(re.compile(rb"(.+?)\r?\n(?=\[mem)", re.S))
        assert reply.group(1).strip(), "empty reply"
        first_status = term.expect(STATUS)
        assert b"hit rate 100.0%" in first_status.group(0)
        term.expect(b"> ")

        term.send(b"/stats\r")
        term.expect(b"memory:")
        term.expect(b"expert_slots")
        term.expect(re.compile(rb"conversation: 2 messages"))  # the user's and the reply
        term.expect(b"> ")

        # Ctrl-C while the reply streams: the reply ends, the program goes on
        term.send(b"Tell me a long story.\r")
        term.expect(b"Tell me a long story.")
        term.expect(re.compile(rb"\n."))  # the first piece of the reply has arrived
        term.send(b"\x03")
        term.expect(b"[interrupted]")
        term.expect(STATUS)
        term.expect(b"> ")

        # Ctrl-C at the prompt does not quit either. A person does not press it within
        # microseconds of the prompt appearing; a SIGINT that lands before CPython's readline
        # enters its select() is only noticed at the next key, so pause as a person would.
        time.sleep(0.5)
        term.send(b"\x03")
        term.expect(b"/exit to quit")
        term.expect(b"> ")

        term.send(b"/reset\r")
        term.expect(b"(conversation cleared)")
        term.expect(b"> ")
        term.send(b"/stats\r")
        term.expect(re.compile(rb"conversation: 0 messages, 0/1024"))
        term.expect(b"> ")

        term.send(b"/exit\r")
        assert term.wait() == 0
    finally:
        term.close()
