"""The Python API for applications, in the spirit of llama-cpp-python's `Llama`.

    import edgemoe
    with edgemoe.Model("qwen3moe-shards") as model:
        print(model.generate("Once upon a time", max_tokens=32, temperature=0))
        for piece in model.generate("ROMEO:", max_tokens=64, stream=True):
            print(piece, end="", flush=True)
        reply = model.create_chat_completion([{"role": "user", "content": "Hi!"}])
        print(reply["choices"][0]["message"]["content"])

One Model owns one engine and its KV cache, so requests run one at a time: a lock serialises
them, and a model can be shared between threads. A streamed request holds the lock until its
iterator is exhausted or closed.
"""
from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import psutil

from edgemoe.errors import EdgeMoeError
from edgemoe.generate import Generation, GenerationStats, Generator
from edgemoe.residency.telemetry import record
from edgemoe.sampling import SamplingParams
from edgemoe.gguf_header import GGUFHeader
from edgemoe.shardset import ShardSet
from edgemoe.tokenizer import Vocab

_DEFAULTS = SamplingParams()


class Model:
    """A shard set opened for generation.

    shards_path: a directory written by `edgemoe convert`.
    n_ctx: context window in tokens (KV cache size); n_batch: prompt tokens per engine step.
    n_threads: CPU threads (None: the engine's choice); device: ggml backend device name
    (None: the best available).
    memory_budget: "2GiB" (the whole process) or "50%" (of the experts' bytes); policy: full,
    swap (the default with a budget), ondemand or static; adaptive_gating: ondemand's threshold
    T; n_prefetch: ondemand's prefetched experts per layer (None: what `edgemoe plan` chose for
    this budget, else 1); swap_interval, swap_decay: swap's tokens per importance window and
    the previous windows' weight (None: what `edgemoe plan` chose for this budget, else the best
    on the calibration trace); stats: keep a telemetry record per engine step (`write_stats`);
    substitutes: with static or swap under a budget, keep the shard set's low-bit expert
    substitutes resident (when it has them: `edgemoe convert --substitute-type`).
    device_budget: "4GiB" bounds the device's own memory (not the CPU's); repack: expert
    slots in host memory in ggml's repacked CPU layouts where it has one for their type;
    quality: ondemand's per-miss decisions, "exact", "balanced" or "fast" (`--quality`;
    implies ondemand). A budget below the minimum raises BudgetError before loading.
    """

    def __init__(
        self,
        shards_path: str | Path,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        device: str | None = None,
        n_batch: int = 512,
        memory_budget: str | None = None,
        policy: str | None = None,
        adaptive_gating: float | None = None,
        n_prefetch: int | None = None,
        swap_interval: int | None = None,
        swap_decay: float | None = None,
        stats: bool = False,
        substitutes: bool = True,
        device_budget: str | None = None,
        repack: bool = False,
        quality: str | None = None,
    ) -> None:
        from edgemoe.runtime import ResidencyConfig, StepLog, open_engine, refuse_early

        self.shards_path = Path(shards_path)
        self.name = self.shards_path.resolve().name
        self.residency = ResidencyConfig(memory_budget=memory_budget, policy=policy,
                                         adaptive_gating=adaptive_gating, n_prefetch=n_prefetch,
                                         swap_interval=swap_interval, swap_decay=swap_decay,
                                         substitutes=substitutes, device_budget=device_budget,
                                         quality=quality)
        # The vocabulary first: a budget's measure of the process (open_engine) includes it.
        shards = ShardSet.open(self.shards_path)
        # base.gguf's header bounded and checked before libllama parses it
        shards.check_base_header(GGUFHeader(shards.base_path))
        refuse_early(shards, self.residency, n_ctx)   # a budget far too small, before the vocab
        self.vocab = Vocab(shards.base_path)
        try:
            self.engine, self.slot_plan = open_engine(
                self.shards_path, self.residency, n_ctx=n_ctx, n_threads=n_threads,
                device=device, n_batch=n_batch, telemetry=StepLog() if stats else None,
                repack=repack)
        except BaseException:
            self.vocab.close()
            raise
        self.shards: ShardSet = self.engine.shards
        try:
            self._generator = Generator(self.engine, self.vocab)
        except BaseException:
            self.vocab.close()
            self.engine.close()
            raise
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()  # status() against close(), not against requests
        self._owner: int | None = None  # thread that holds _lock, to catch self-deadlock
        self._closed = False
        self.last_stats: GenerationStats | None = None

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Free the engine (waits for a request running in another thread). Idempotent."""
        if self._closed:
            return
        with self._exclusive(), self._close_lock:
            self._closed = True
            self.engine.close()
            self.vocab.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _exclusive(self):
        if self._owner == threading.get_ident():
            raise EdgeMoeError("a streamed generation from this model is still open in this "
                               "thread; exhaust or close() it before starting another request")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    def _check_open(self) -> None:
        if self._closed:
            raise EdgeMoeError(f"model {self.name} is closed")

    # -- tokens ---------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return list(self.vocab.tokenize(text, add_special=add_special,
                                        parse_special=parse_special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.vocab.detokenize(list(tokens))

    @property
    def n_ctx(self) -> int:
        return int(self.engine.n_ctx)

    def status(self) -> dict:
        """What the chat status line shows: backend memory by part and in all, the process's
        resident set (bytes; it adds Python and the libraries), resident experts, the expert hit
        rate, tokens evaluated and expert bytes read since the model was opened, tokens in the KV
        cache. It only reads figures, so another thread may call it while a request runs (the
        server's status page does)."""
        with self._close_lock:
            self._check_open()
            memory = self.engine.memory()
            pool, policy = self.engine.pool, self.engine.policy
            run = record(policy.telemetry.counters, 0)
            return {
                "memory": memory,
                "memory_bytes": sum(memory.values()),
                "rss_bytes": psutil.Process().memory_info().rss,
                "resident_experts": sum(len(policy.resident(l)) for l in policy.layers),
                "total_experts": len(pool.layers) * pool.n_expert,
                "hit_rate": run["hit_rate"],
                "tokens_evaluated": run["tokens"],
                "bytes_read": run["bytes_read"],
                "n_past": int(self.engine.n_past),
            }

    def residency_summary(self) -> str:
        """The residency policy's one-line summary since the model was opened."""
        from edgemoe.runtime import residency_summary

        return residency_summary(self.engine)

    def write_stats(self, path) -> None:
        """Residency telemetry as JSON: per run, and per engine step when opened with stats."""
        from edgemoe.runtime import write_stats_json

        write_stats_json(self.engine, path)

    def interrupt_when(self, check: Callable[[], bool] | None) -> None:
        """Requests end before their next token once `check()` is true, as if closed (None:
        never). Set by the thread that runs the requests (a server, for a client that went
        away); `check` is called from it, once per token."""
        self._generator.interrupt = check

    def reset(self) -> None:
        """Empty the KV cache (the next request evaluates its whole prompt)."""
        with self._exclusive():
            self._check_open()
            self._generator.reset()

    # -- generation -----------------------------------------------------------------------

    def _start(self, prompt, max_tokens, sampling, stop, special) -> Generation:
        """Tokenize and check the request now, so a prompt that does not fit raises here and
        not at the first piece of a stream."""
        with self._exclusive():
            self._check_open()
            return self._generator.generate(prompt, max_tokens, sampling, stop, special=special)

    def _drive(self, generation: Generation) -> Iterator[str]:
        """Yield the pieces of `generation` while holding the model."""
        with self._exclusive():
            self._check_open()
            try:
                yield from generation
            finally:
                generation.close()
                self.last_stats = generation.stats

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = 128,
        temperature: float = _DEFAULTS.temperature,
        top_k: int = _DEFAULTS.top_k,
        top_p: float = _DEFAULTS.top_p,
        min_p: float = _DEFAULTS.min_p,
        repeat_penalty: float = _DEFAULTS.repeat_penalty,
        repeat_last_n: int = _DEFAULTS.repeat_last_n,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """Continue `prompt` (raw text, BOS added as the model asks, or token ids).

        Returns the generated text, or with stream=True an iterator of text pieces.
        max_tokens None: until end of generation or a full context. temperature 0: greedy.
        """
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_p=min_p, repeat_penalty=repeat_penalty,
                                  repeat_last_n=repeat_last_n, seed=seed)
        generation = self._start(prompt, max_tokens, sampling, stop, special=False)
        pieces = self._drive(generation)
        return pieces if stream else "".join(pieces)

    # -- OpenAI-shaped results ------------------------------------------------------------

    def create_completion(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = 16,
        temperature: float = _DEFAULTS.temperature,
        top_k: int = _DEFAULTS.top_k,
        top_p: float = _DEFAULTS.top_p,
        min_p: float = _DEFAULTS.min_p,
        repeat_penalty: float = _DEFAULTS.repeat_penalty,
        repeat_last_n: int = _DEFAULTS.repeat_last_n,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> dict | Iterator[dict]:
        """A `text_completion` dict (or, streaming, an iterator of its chunks)."""
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_p=min_p, repeat_penalty=repeat_penalty,
                                  repeat_last_n=repeat_last_n, seed=seed)
        generation = self._start(prompt, max_tokens, sampling, stop, special=False)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.name}
        chunks = self._completion_chunks(head, generation)
        if stream:
            return chunks
        text = "".join(c["choices"][0]["text"] for c in chunks)
        return {**head,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": generation.finish_reason}],
                "usage": _usage(generation)}

    def _completion_chunks(self, head: dict, generation: Generation) -> Iterator[dict]:
        for piece in self._drive(generation):
            yield {**head, "choices": [{"index": 0, "text": piece, "logprobs": None,
                                        "finish_reason": None}]}
        yield {**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                    "finish_reason": generation.finish_reason}],
               "usage": _usage(generation)}

    def create_chat_completion(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int | None = None,
        temperature: float = _DEFAULTS.temperature,
        top_k: int = _DEFAULTS.top_k,
        top_p: float = _DEFAULTS.top_p,
        min_p: float = _DEFAULTS.min_p,
        repeat_penalty: float = _DEFAULTS.repeat_penalty,
        repeat_last_n: int = _DEFAULTS.repeat_last_n,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> dict | Iterator[dict]:
        """Reply to OpenAI-style messages ([{"role": "user", "content": "..."}, ...]) using the
        model's chat template. Returns a `chat.completion` dict, or with stream=True an iterator
        of `chat.completion.chunk` dicts (the first carries the role, the last the
        finish_reason and usage). max_tokens None: until end of turn or a full context."""
        prompt = self.chat_prompt(messages)
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_p=min_p, repeat_penalty=repeat_penalty,
                                  repeat_last_n=repeat_last_n, seed=seed)
        generation = self._start(prompt, max_tokens, sampling, stop, special=True)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.name}
        chunks = self._chat_chunks(head, generation)
        if stream:
            return chunks
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": generation.finish_reason}],
                "usage": _usage(generation)}

    def _chat_chunks(self, head: dict, generation: Generation) -> Iterator[dict]:
        pieces = self._drive(generation)
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                    "logprobs": None, "finish_reason": None}]}
        for piece in pieces:
            yield {**head, "choices": [{"index": 0, "delta": {"content": piece},
                                        "logprobs": None, "finish_reason": None}]}
        yield {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                    "finish_reason": generation.finish_reason}],
               "usage": _usage(generation)}

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text the chat template makes of `messages`, ready for the reply."""
        if isinstance(messages, (str, bytes)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be a dict with string 'role' and "
                                 f"'content', got {m!r}")
            clean.append({"role": m["role"], "content": m["content"]})
        return self.vocab.apply_chat_template(clean, add_generation_prompt=True)


def _usage(generation: Generation) -> dict:
    n_prompt = len(generation.prompt_tokens)
    n_completion = len(generation.tokens)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
            "total_tokens": n_prompt + n_completion}
