"""The `edgemoe chat` REPL: multi-turn, streamed, with the model's chat template.

After each reply a status line shows memory in use, resident experts, the expert hit rate and
the decode speed. Ctrl-C ends the reply being generated (what was said so far stays in the
conversation), not the program; Ctrl-D or /exit quits. When stdin is not a terminal (a pipe, a
file) each line is one user turn, and the session ends at end of input.

The conversation is re-rendered through the template every turn; the generator reuses the KV
cache for the prefix the new prompt shares with the previous context, so a turn only evaluates
what is new. When the conversation outgrows the context, the oldest turns are dropped.
"""
from __future__ import annotations

import sys
from typing import TextIO

from edgemoe.errors import ContextOverflow, EdgeMoeError
from edgemoe.sampling import SamplingParams

HELP = ("commands: /reset (forget the conversation), /stats (memory and expert details), "
        "/help, /exit (or Ctrl-D). Ctrl-C stops a reply.")


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class ChatSession:
    def __init__(self, model, sampling: SamplingParams, max_tokens: int | None = None,
                 system: str | None = None, stop: list[str] | None = None,
                 out: TextIO | None = None) -> None:
        self.model = model
        self.sampling = sampling
        self.max_tokens = None if max_tokens is None or max_tokens < 0 else max_tokens
        self.system = system
        self.stop = list(stop or [])
        self.out = out or sys.stdout
        self.messages: list[dict] = []
        self.replies = 0   # turns answered
        self.failures = 0  # turns that ended in an error
        self.reset_history()

    # -- output ---------------------------------------------------------------------------

    def say(self, text: str, end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def status_line(self) -> str:
        s = self.model.status()
        parts = [f"mem {_mib(s['memory_bytes'])} (RSS {_mib(s['rss_bytes'])})",
                 f"experts {s['resident_experts']}/{s['total_experts']} resident"]
        if s["hit_rate"] is not None:
            parts.append(f"hit rate {100 * s['hit_rate']:.1f}%")
        stats = self.model.last_stats
        if stats is not None:
            parts.append(f"{stats.decode_tokens_per_second:.1f} tok/s")
        parts.append(f"ctx {s['n_past']}/{self.model.n_ctx}")
        return "[" + " | ".join(parts) + "]"

    def stats_report(self) -> str:
        s = self.model.status()
        lines = ["memory:"]
        for key, value in s["memory"].items():
            lines.append(f"  {key:<16}{_mib(value):>14}")
        lines.append(f"  {'total':<16}{_mib(s['memory_bytes']):>14}")
        lines.append(f"  {'process RSS':<16}{_mib(s['rss_bytes']):>14}")
        hit = "n/a" if s["hit_rate"] is None else f"{100 * s['hit_rate']:.1f}%"
        lines.append(f"experts: {s['resident_experts']}/{s['total_experts']} resident, "
                     f"hit rate {hit}")
        stats = self.model.last_stats
        if stats is not None:
            lines.append("last reply: " + stats.summary())
        lines.append(f"conversation: {len(self.messages)} messages, "
                     f"{s['n_past']}/{self.model.n_ctx} context tokens in the KV cache")
        return "\n".join(lines)

    # -- conversation ---------------------------------------------------------------------

    def reset_history(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str) -> None:
        """Stream the assistant's reply to `user_text`; Ctrl-C at any point cuts it short and
        keeps what was said so far."""
        self.messages.append({"role": "user", "content": user_text})
        pieces: list[str] = []
        chunks = None
        try:
            chunks = self._start()
            if chunks is None:
                self.messages.pop()
                self.failures += 1
                return
            for chunk in chunks:
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    pieces.append(delta)
                    self.out.write(delta)
                    self.out.flush()
            self.say("")
        except KeyboardInterrupt:
            if chunks is not None:
                chunks.close()
            self.say(" [interrupted]")
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.replies += 1
        stats = self.model.last_stats
        if stats is not None and stats.context_full:
            self.say("(the reply stopped at a full context; /reset or raise -c/--ctx-size)")
        self.say(self.status_line())

    def _start(self):
        """Start the streamed reply, dropping the oldest turns while the prompt is too long."""
        while True:
            try:
                return self.model.create_chat_completion(
                    self.messages, max_tokens=self.max_tokens,
                    temperature=self.sampling.temperature, top_k=self.sampling.top_k,
                    top_p=self.sampling.top_p, min_p=self.sampling.min_p,
                    repeat_penalty=self.sampling.repeat_penalty,
                    repeat_last_n=self.sampling.repeat_last_n, seed=self.sampling.seed,
                    stop=self.stop, stream=True)
            except ContextOverflow as exc:
                first = 1 if self.messages[0]["role"] == "system" else 0
                if len(self.messages) - first <= 1:  # only the new message is left
                    self.say(f"error: {exc}")
                    return None
                # drop the oldest user turn and the assistant reply that answered it
                del self.messages[first:first + 2]
                self.say("(the conversation outgrew the context: dropped the oldest turn)")

    # -- the loop -------------------------------------------------------------------------

    def repl(self, stdin: TextIO) -> int:
        interactive = stdin.isatty()
        if interactive:
            self.say(f"edgemoe chat: {self.model.name}. {HELP}")
        while True:
            try:
                line = self._read(stdin, interactive)
            except KeyboardInterrupt:
                self.say("\n(Ctrl-D or /exit to quit)")
                continue
            if line is None:  # end of input
                if interactive:
                    self.say("")
                return self.exit_code()
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                command = text.split()[0].lower()
                if command in ("/exit", "/quit"):
                    return self.exit_code()
                if command == "/reset":
                    self.reset_history()
                    self.model.reset()
                    self.say("(conversation cleared)")
                elif command == "/stats":
                    self.say(self.stats_report())
                elif command == "/help":
                    self.say(HELP)
                else:
                    self.say(f"unknown command {command}; {HELP}")
                continue
            try:
                self.reply(text)
            except EdgeMoeError as exc:
                self.failures += 1
                if self.messages and self.messages[-1].get("role") == "user":
                    self.messages.pop()  # the turn that failed is not part of the conversation
                self.say(f"error: {exc}")

    def exit_code(self) -> int:
        """1 when turns were asked and every one failed (a script sees the failure), else 0."""
        return 1 if self.failures and not self.replies else 0

    def _read(self, stdin: TextIO, interactive: bool) -> str | None:
        if interactive and stdin is sys.stdin:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            try:
                return input("> ")
            except EOFError:
                return None
        if interactive:
            self.say("> ", end="")
        line = stdin.readline()
        return line if line else None
