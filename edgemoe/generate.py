"""The generation loop: prompt -> prefill -> sample/decode -> streamed text.

`Generator` drives one Engine (the model and its KV cache) with one Vocab (tokenizer). It keeps
the list of tokens whose keys and values sit in the KV cache, so that a new prompt sharing a
prefix with the previous context (the next turn of a chat) only evaluates what is new.

A `Generation` is the iterator of one request: it yields text pieces as they become final and,
once exhausted, holds the finish reason, the generated tokens and the timing/memory figures.
Text is streamed so that
- a character split over several tokens (UTF-8) is only yielded once complete;
- a stop string is never yielded, even when it arrives split across tokens: any tail of the text
  that could be the start of a stop string is held back until it is decided;
- an end-of-generation token (EOS/EOT) ends the reply without being yielded.
"""
from __future__ import annotations

import codecs
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from edgemoe.errors import ContextOverflow, EdgeMoeError, ShardSetError
from edgemoe.sampling import Sampler, SamplingParams

# OpenAI's finish reasons: a stop string, EOS/EOT -> "stop"; max_tokens or a full context ->
# "length".
FINISH_STOP = "stop"
FINISH_LENGTH = "length"


# ---------------------------------------------------------------------------------- memory --

def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    if sys.platform == "win32":
        import psutil

        return int(psutil.Process().memory_info().peak_wset)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cgroup_memory_peak_bytes() -> int | None:
    """Peak memory of the memory cgroup this process runs in (RSS plus the page cache it
    caused, what a memory limit counts), or None.

    Only a group made for this run counts: one holding nothing but this process, its children
    and at most its parent (scripts/edge_emulate.py puts the command it runs into a fresh group).
    The group of a whole container or session would report other programs' memory as ours.
    """
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if path in ("", "/"):
            continue
        if controllers == "":  # cgroup v2 unified hierarchy
            group, peak_file = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.peak"
        elif "memory" in controllers.split(","):  # cgroup v1
            group = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            peak_file = "memory.max_usage_in_bytes"
        else:
            continue
        try:
            members = {int(pid) for pid in (group / "cgroup.procs").read_text().split()}
            peak = int((group / peak_file).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if members <= _own_process_tree():
            return peak
    return None


def _own_process_tree() -> set[int]:
    import psutil

    me = psutil.Process()
    return {me.pid, me.ppid(), *(p.pid for p in me.children(recursive=True))}


# ------------------------------------------------------------------------------- results --

@dataclass(frozen=True)
class GenerationStats:
    n_prompt: int             # tokens in the prompt
    n_prompt_evaluated: int   # of which were evaluated (the rest were reused from the KV cache)
    n_generated: int
    n_decode_steps: int       # generated tokens that needed a model step (all but the first)
    prefill_seconds: float
    decode_seconds: float
    peak_rss_bytes: int
    cgroup_peak_bytes: int | None
    context_full: bool = False  # generation stopped because the context window was full
    # Bytes over the links to RPC servers per decode step (None: no RPC device).
    link_bytes_per_token: float | None = None

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.n_prompt_evaluated / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.n_decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        """One line, in the spirit of llama.cpp's timing print."""
        line = (
            f"prefill: {self.n_prompt_evaluated} tokens, {self.prefill_tokens_per_second:.1f} "
            f"tok/s | decode: {self.n_generated} tokens, "
            f"{self.decode_tokens_per_second:.1f} tok/s | peak RSS {_mib(self.peak_rss_bytes)}"
        )
        if self.cgroup_peak_bytes is not None:
            line += f" | cgroup peak {_mib(self.cgroup_peak_bytes)}"
        if self.link_bytes_per_token is not None:
            line += f" | RPC link {self.link_bytes_per_token / 1024:.1f} KiB/token"
        return line


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass
class _StopMatcher:
    """Holds back text that might be the beginning of a stop string."""

    stops: tuple[str, ...]
    pending: str = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text now safe to emit, whether a stop string was found)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for stop in self.stops:
            # longest suffix of pending that is a proper prefix of this stop string
            for n in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Generation:
    """One request in flight. Iterate it for text pieces; afterwards read the results."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)   # generated, including a final EOG token
    text: str = ""                                    # everything yielded so far
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    _pieces: Iterator[str] | None = field(default=None, repr=False)  # set by Generator

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self.text += piece
            yield piece

    def run(self) -> str:
        """Consume the whole generation; return its text."""
        for _ in self:
            pass
        return self.text

    def close(self) -> None:
        """Stop early (e.g. Ctrl-C); the KV cache stays consistent for the next request."""
        self._pieces.close()  # type: ignore[attr-defined]


class Generator:
    """Generation over one Engine and one Vocab. Not thread-safe: the API wraps it in a lock."""

    def __init__(self, engine, vocab, on_eval: Callable[[int], None] | None = None) -> None:
        """`on_eval(n_tokens)` is called after every engine step (e.g. to count expert hits
        from the engine's router logits before the next step replaces them)."""
        if engine.n_vocab != vocab.n_vocab:
            # Sampling an id the tokenizer does not know would fail deep inside detokenization.
            raise ShardSetError(
                f"model has {engine.n_vocab} output logits but the vocabulary has "
                f"{vocab.n_vocab} tokens"
            )
        self.engine = engine
        self.vocab = vocab
        self.on_eval = on_eval
        # () -> True ends the running generation before its next token (finish_reason None, as
        # if closed); a server sets it so that a client that went away frees the engine.
        self.interrupt: Callable[[], bool] | None = None
        # Tokens whose K/V are in the engine's cache, in order (len == engine.n_past).
        self._cached: list[int] = []

    # -- context bookkeeping ---------------------------------------------------------------

    def reset(self) -> None:
        self.engine.reset()
        self._cached = []

    def _reuse_prefix(self, prompt: Sequence[int]) -> int:
        """Keep the cached tokens shared with `prompt`; return how many are reused. At least one
        prompt token is always evaluated, because sampling needs its logits."""
        # An interrupted request may have left the cache and our list out of step: trust the
        # shorter one.
        n_past = int(self.engine.n_past)
        if n_past != len(self._cached):
            self._cached = self._cached[: min(n_past, len(self._cached))]
        n_common = 0
        for a, b in zip(self._cached, prompt[:-1]):
            if a != b:
                break
            n_common += 1
        if n_common != n_past:
            self.engine.truncate(n_common)
        self._cached = self._cached[:n_common]
        return n_common

    def _link_bytes(self) -> int | None:
        """Bytes over the engine's RPC links so far (None: none, or an engine without them)."""
        link_bytes = getattr(self.engine, "link_bytes", None)
        return link_bytes() if link_bytes is not None else None

    def _eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate tokens (appending to the KV cache); return the last position's logits."""
        batch = int(self.engine.n_batch)
        logits = None
        for start in range(0, len(tokens), batch):
            chunk = list(tokens[start : start + batch])
            last = start + batch >= len(tokens)
            # Only the last token is sampled: no other row goes through the output projection.
            out = self.engine.eval(chunk, logits_from=-1 if last else len(chunk))
            self._cached.extend(chunk)
            if self.on_eval is not None:
                self.on_eval(len(chunk))
            if last:
                logits = out[-1]
        assert logits is not None
        return logits

    # -- generation ------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | Sequence[int], *, special: bool = False) -> list[int]:
        """Raw text gets BOS as the model's metadata asks; `special=True` parses special-token
        text such as <|im_start|> (chat templates)."""
        if isinstance(prompt, str):
            tokens = list(self.vocab.tokenize(prompt, add_special=True, parse_special=special))
            bos = self.vocab.bos
            # A chat template that writes the BOS text itself, plus the BOS added above.
            if len(tokens) >= 2 and bos is not None and bos >= 0 and tokens[0] == tokens[1] == bos:
                tokens = tokens[1:]
            return tokens
        return [int(t) for t in prompt]

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = 128,
        sampling: SamplingParams = SamplingParams(),
        stop: str | Sequence[str] | None = None,
        *,
        special: bool = False,
    ) -> Generation:
        """Start a request. `max_tokens` None or < 0: until EOS or the context is full.

        Raises ContextOverflow at once when the prompt does not fit the context window.
        """
        prompt_tokens = self.tokenize_prompt(prompt, special=special)
        n_ctx = int(self.engine.n_ctx)
        if not prompt_tokens:
            raise EdgeMoeError("the prompt is empty and the model adds no BOS token")
        if len(prompt_tokens) >= n_ctx:
            raise ContextOverflow(
                f"the prompt has {len(prompt_tokens)} tokens but the context holds {n_ctx} "
                f"(room is needed for at least one generated token); raise n_ctx (-c) or "
                f"shorten the prompt"
            )
        bad = [t for t in prompt_tokens if not 0 <= t < self.vocab.n_vocab]
        if bad:
            raise EdgeMoeError(f"prompt token id {bad[0]} is outside the vocabulary "
                               f"(0..{self.vocab.n_vocab - 1})")
        stops = (stop,) if isinstance(stop, str) else tuple(s for s in (stop or ()) if s)
        generation = Generation(prompt_tokens=prompt_tokens)
        generation._pieces = self._run(generation, max_tokens, sampling, stops)
        return generation

    def _run(
        self,
        gen: Generation,
        max_tokens: int | None,
        sampling: SamplingParams,
        stops: tuple[str, ...],
    ) -> Iterator[str]:
        vocab = self.vocab
        n_ctx = int(self.engine.n_ctx)
        limit = n_ctx if max_tokens is None or max_tokens < 0 else max_tokens
        sampler = Sampler(sampling)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        matcher = _StopMatcher(stops)
        history = list(gen.prompt_tokens)
        n_evaluated = 0  # prompt tokens evaluated (the rest came from the KV cache)
        # Timers count our work only, not the time the consumer spends between pieces.
        # prefill = the prompt's evaluation plus sampling the first token;
        # decode = each later step: evaluating the previous token plus sampling the next one.
        t_prefill = t_decode = 0.0
        n_decode = 0
        link_start = link_bytes = None  # bytes over RPC links when decode began, and since
        finish: str | None = None  # stays None when the consumer stops us early
        stopped = False
        context_full = False

        try:
            if limit <= 0:
                finish = FINISH_LENGTH
            else:
                t0 = time.perf_counter()
                n_reused = self._reuse_prefix(gen.prompt_tokens)
                logits = self._eval(gen.prompt_tokens[n_reused:])
                n_evaluated = len(gen.prompt_tokens) - n_reused
                token = sampler.sample(logits, history)
                t_prefill = time.perf_counter() - t0
                link_start = self._link_bytes()
                while True:
                    gen.tokens.append(token)
                    history.append(token)
                    if vocab.is_eog(token):
                        finish = FINISH_STOP
                        break
                    text, stopped = matcher.feed(decoder.decode(vocab.token_to_piece(token)))
                    if text:
                        yield text
                    if stopped:
                        finish = FINISH_STOP
                        break
                    if len(gen.tokens) >= limit or len(self._cached) >= n_ctx:
                        finish = FINISH_LENGTH  # max_tokens reached or the context is full
                        context_full = len(gen.tokens) < limit
                        break
                    if self.interrupt is not None and self.interrupt():
                        break
                    t0 = time.perf_counter()
                    logits = self._eval([token])
                    token = sampler.sample(logits, history)
                    t_decode += time.perf_counter() - t0
                    n_decode += 1
            if not stopped:
                # An incomplete UTF-8 sequence at the very end becomes U+FFFD (what a terminal
                # shows for the raw bytes llama.cpp prints); held-back text is released.
                text, stopped = matcher.feed(decoder.decode(b"", final=True))
                if stopped:
                    finish = FINISH_STOP
                text += matcher.flush()
                if text:
                    yield text
        finally:
            gen.finish_reason = finish
            if link_start is not None and n_decode:
                link_bytes = (self._link_bytes() - link_start) / n_decode
            gen.stats = GenerationStats(
                n_prompt=len(gen.prompt_tokens),
                n_prompt_evaluated=n_evaluated,
                n_generated=len(gen.tokens),
                n_decode_steps=n_decode,
                prefill_seconds=t_prefill,
                decode_seconds=t_decode,
                peak_rss_bytes=peak_rss_bytes(),
                cgroup_peak_bytes=cgroup_memory_peak_bytes(),
                context_full=context_full,
                link_bytes_per_token=link_bytes,
            )
