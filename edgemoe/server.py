"""`edgemoe serve`: an OpenAI-compatible HTTP server over one model, and the web chat at `/`.

This module is HTTP only: it checks requests, queues them and turns them into calls of
`edgemoe.Model` (api.py), which owns tokenization, the chat template and generation.

- One engine thread owns the model and runs requests in turn, as they arrived. At most
  `max_queue` requests wait behind the running one; more get 429 with a Retry-After.
- Streamed replies are server-sent events in OpenAI's shape (`data: {chunk}` ... `data: [DONE]`).
  A client that goes away (closed connection, stop button) cancels its request: the
  generation ends before its next token (Model.interrupt_when), the KV cache consistent for
  the next request; a request still waiting is dropped unrun.
- Nothing resets the KV cache between requests, so the next turn of a conversation, whose
  prompt repeats the previous one, evaluates only what is new (`usage.prompt_tokens_details.
  cached_tokens` says how many prompt tokens were reused).
- Request bodies and max_tokens are bounded; an API key, when set, is required on everything
  but `/` and `/health`.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /status (memory, resident experts, hit rate, bytes read per token, queue), GET /metrics
(Prometheus text), GET / (the web chat, a static page shipped in the package).
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import math
import signal
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

# uvicorn's protocol and loop modules are imported when it starts; importing them now puts
# them in the process before the model is opened, whose memory budget counts the process.
import uvicorn.lifespan.on  # noqa: F401
import uvicorn.loops.auto  # noqa: F401
import uvicorn.protocols.http.auto  # noqa: F401
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from edgemoe.errors import ContextOverflow, EdgeMoeError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    alias: str | None = None            # the model id clients see (default: the model's name)
    max_queue: int = 16                 # requests waiting behind the running one
    max_tokens: int | None = None       # the largest max_tokens a request may ask (None: n_ctx)
    max_body_bytes: int = 1 << 20
    memory_budget: str | None = None    # shown by /status and the web chat
    policy: str | None = None


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def stopping() -> RequestError:
    return RequestError(503, "the server is shutting down", kind="server_error")


# ------------------------------------------------------------------------- the engine thread --

class Job:
    """One request: what to call on the model, and the events the engine thread sends back to
    the event loop: ("start", None), ("chunk", dict) ..., then ("done", stats) or ("error",
    exception)."""

    def __init__(self, method: str, kwargs: dict, loop: asyncio.AbstractEventLoop) -> None:
        self.method, self.kwargs, self.loop = method, kwargs, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self._cancel_lock = threading.Lock()
        self.n_pieces = 0
        self.label = "chat" if method == "create_chat_completion" else "completion"
        self.queued = time.monotonic()
        self.started: float | None = None      # when the engine began it (monotonic)
        self.cancel_time: float | None = None  # when the cancel was asked (monotonic)
        self.tokens_at_cancel: int | None = None  # the model's evaluated tokens then
        self.cancel_seen: float | None = None  # when the engine thread noticed it
        self.counter = None                    # () -> tokens the model has evaluated
        self.finished = False                  # the engine is done with it
        self.shutdown = False                  # cancelled because the server is stopping

    def cancel(self) -> None:
        # The count and the flag change together: the engine thread's check (is_cancelled)
        # waits for both, so no token can start between them and tokens_after_cancel is exact.
        with self._cancel_lock:
            if not self.cancelled.is_set() and not self.finished:
                self.cancel_time = time.monotonic()
                if self.counter is not None and self.started is not None:
                    self.tokens_at_cancel = self.counter()
                self.cancelled.set()

    def is_cancelled(self) -> bool:
        """The engine thread's check before each token."""
        with self._cancel_lock:
            return self.cancelled.is_set()

    def post(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


class EngineThread(threading.Thread):
    """Owns the model; runs queued jobs one at a time."""

    def __init__(self, model, max_queue: int, log=None) -> None:
        super().__init__(name="edgemoe-engine", daemon=True)
        self.model = model
        self.max_queue = max_queue
        self.log = log or (lambda line: None)
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.running: Job | None = None
        self.counts = collections.Counter()  # served, cancelled, failed, rejected
        self.tokens_generated = 0
        self.busy_seconds = 0.0
        self.last: dict | None = None         # figures of the last finished request
        # The last generation cancelled while it ran: seconds from the cancel to the engine
        # being free, and tokens the model evaluated in that time.
        self.last_cancel: dict | None = None

    # -- the event loop's side --

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise stopping()
            if len(self._waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                self.log(f"{job.label} 429: {len(self._waiting)} requests are waiting")
                raise RequestError(
                    429, f"the server is busy: {len(self._waiting)} requests are waiting "
                    f"(the queue holds {self.max_queue}); retry later",
                    kind="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(self.retry_after())})
            self._waiting.append(job)
            self._cv.notify()

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained by one request."""
        served = self.counts["served"] + self.counts["cancelled"]
        mean = self.busy_seconds / served if served else 1.0
        return max(1, math.ceil(mean * (len(self._waiting) + 1)))

    def queue_state(self) -> dict:
        with self._cv:
            return {"running": int(self.running is not None), "waiting": len(self._waiting),
                    "max_waiting": self.max_queue}

    def shut_down(self) -> None:
        """Refuse new requests and end the running and waiting ones at their next token, with
        an error that says why (the server is stopping)."""
        with self._cv:
            self._stopping = True
            for job in [*self._waiting, self.running]:
                if job is not None:
                    job.shutdown = True
                    job.cancel()
            self._cv.notify()

    def stop(self) -> None:
        """shut_down(), then end the thread (waits for the running token)."""
        self.shut_down()
        if self.is_alive():
            self.join()

    # -- the engine thread --

    def run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    self.counts["cancelled"] += 1
                    self.log(f"{job.label}: cancelled before it ran")
                    job.post("error", stopping() if job.shutdown else
                             RequestError(499, "cancelled before it ran"))
                    continue
                self.running = job
            t0 = job.started = time.monotonic()
            try:
                self._serve(job)
            finally:
                job.finished = True
                with self._cv:
                    self.running = None
                    self.busy_seconds += time.monotonic() - t0

    def tokens_evaluated(self) -> int:
        return self.model.status()["tokens_evaluated"]

    def _fail(self, job: Job, error: RequestError) -> None:
        self.counts["failed"] += 1
        self.log(f"{job.label} {error.status}: {error.message}")
        job.post("error", error)

    def _serve(self, job: Job) -> None:
        model = self.model
        job.counter = self.tokens_evaluated
        model.interrupt_when(job.is_cancelled)
        try:
            self._generate(job)
        finally:
            model.interrupt_when(None)

    def _generate(self, job: Job) -> None:
        model = self.model
        try:
            stream = getattr(model, job.method)(**job.kwargs, stream=True)
        except ContextOverflow as exc:
            return self._fail(job, RequestError(
                400, str(exc), param="messages" if "messages" in job.kwargs else "prompt",
                code="context_length_exceeded"))
        except (EdgeMoeError, ValueError) as exc:
            return self._fail(job, RequestError(400, str(exc)))
        except Exception as exc:  # a bug: answer 500 and keep serving
            return self._fail(job, RequestError(500, f"{type(exc).__name__}: {exc}",
                                                kind="server_error"))
        job.post("start")
        try:
            for chunk in stream:
                if job.cancelled.is_set():
                    job.cancel_seen = time.monotonic()
                    break
                usage = chunk.get("usage")
                if usage is not None:
                    # The final chunk: the generation is closed and its stats are the model's
                    # last (only this thread uses the model).
                    stats = model.last_stats
                    usage["prompt_tokens_details"] = {
                        "cached_tokens": stats.n_prompt - stats.n_prompt_evaluated}
                job.n_pieces += 1
                job.post("chunk", chunk)
        except Exception as exc:
            return self._fail(job, RequestError(500, f"{type(exc).__name__}: {exc}",
                                                kind="server_error"))
        finally:
            stream.close()
        stats = model.last_stats
        self.tokens_generated += stats.n_generated
        self.last = {"prompt_tokens": stats.n_prompt,
                     "cached_prompt_tokens": stats.n_prompt - stats.n_prompt_evaluated,
                     "completion_tokens": stats.n_generated,
                     "prefill_tokens_per_second": stats.prefill_tokens_per_second,
                     "decode_tokens_per_second": stats.decode_tokens_per_second}
        line = (f"{job.label}: prompt {stats.n_prompt} tokens "
                f"({stats.n_prompt - stats.n_prompt_evaluated} cached), "
                f"{stats.n_generated} generated at {stats.decode_tokens_per_second:.1f} tok/s, "
                f"waited {job.started - job.queued:.2f} s")
        if job.cancel_seen is not None:
            self.counts["cancelled"] += 1
            self.last_cancel = {
                "seconds": time.monotonic() - job.cancel_time,
                "tokens_after_cancel": None if job.tokens_at_cancel is None
                else self.tokens_evaluated() - job.tokens_at_cancel,
                "pieces_sent": job.n_pieces}
            line += " - cancelled: " + ("the server is stopping" if job.shutdown
                                        else "the client went away")
        else:
            self.counts["served"] += 1
        self.log(line)
        if job.shutdown and job.cancel_seen is not None:
            job.post("error", stopping())  # cut short: the client must not take it for whole
        else:
            job.post("done", stats)


# ------------------------------------------------------------------------- request parsing --

def _number(body: dict, name: str, lo: float | None = None, hi: float | None = None,
            integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or \
            (not integer and not math.isfinite(value)):
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, "
                           f"got {value!r}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise RequestError(400, f"'{name}' must be {span}, got {value}", param=name)
    return value


def sampling_kwargs(body: dict, max_tokens_limit: int, default_max_tokens: int | None) -> dict:
    """The keyword arguments of Model.create_*completion from an OpenAI request body."""
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise RequestError(400, f"'{name}' must be 1: the server generates one choice",
                               param=name)
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(400, f"'{name}' is not supported; use 'repeat_penalty'",
                               param=name)
    if body.get("logprobs") not in (None, False, 0):
        raise RequestError(400, "'logprobs' is not supported", param="logprobs")
    if body.get("tools") or body.get("functions"):
        raise RequestError(400, "tools and functions are not supported", param="tools")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in (None, "text")):
        raise RequestError(400, "only response_format {'type': 'text'} is supported",
                           param="response_format")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens if default_max_tokens is not None else max_tokens_limit
    else:
        max_tokens = _number({param: max_tokens}, param, lo=0, integer=True)
        if max_tokens > max_tokens_limit:
            raise RequestError(400, f"'{param}' is {max_tokens} but this server allows at most "
                               f"{max_tokens_limit}", param=param)
    kwargs: dict[str, Any] = {"max_tokens": min(max_tokens, max_tokens_limit)}
    for name, lo, hi, integer in (("temperature", 0, None, False), ("top_p", 0, 1, False),
                                  ("top_k", None, None, True), ("min_p", 0, 1, False),
                                  ("repeat_penalty", 0, None, False),
                                  ("repeat_last_n", -1, None, True), ("seed", None, None, True)):
        value = _number(body, name, lo, hi, integer)
        if value is not None:
            kwargs[name] = value
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 16 or \
                not all(isinstance(s, str) for s in stop):
            raise RequestError(400, "'stop' must be a string or a list of at most 16 strings",
                               param="stop")
        kwargs["stop"] = stop
    return kwargs


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {'role': ..., "
                           "'content': ...}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a string 'role'",
                               param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or \
                        not isinstance(part.get("text"), str):
                    raise RequestError(400, f"messages[{i}].content: only text parts are "
                                       "supported", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string or a list of "
                               "text parts", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def completion_prompt(body: dict):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and \
            all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise RequestError(400, "'prompt' must be a non-empty string or list of token ids (one "
                       "prompt per request)", param="prompt")


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"'stream' must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", param="stream_options")
    return stream, bool(options.get("include_usage", False))


# ----------------------------------------------------------------------------- the app --

@dataclass
class Server:
    model: Any
    config: ServerConfig
    log: Any = None  # (line) -> None: one line per request
    engine: EngineThread = field(init=False)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.engine = EngineThread(self.model, self.config.max_queue, self.log)
        self.model_id = self.config.alias or self.model.name
        self.max_tokens = self.config.max_tokens or self.model.n_ctx
        self.page = (resources.files("edgemoe") / "web" / "index.html").read_text("utf-8")

    # -- plumbing --

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise RequestError(401, "a valid API key is required (Authorization: Bearer KEY)",
                               kind="authentication_error", code="invalid_api_key")

    async def _body(self, request: Request) -> dict:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(413, f"the request body has {length} bytes; the limit is {limit}")
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > limit:
                    raise RequestError(413, f"the request body exceeds {limit} bytes")
        except ClientDisconnect:
            raise RequestError(400, "the client went away while sending the body") from None
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    async def _watch_disconnect(self, request: Request, job: Job) -> None:
        """Cancel the job when the client goes away (the body is read by now, so the next
        message is the disconnect)."""
        try:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    break
        except Exception:  # the connection is gone in some other way
            pass
        job.cancel()

    async def _run(self, request: Request, method: str, kwargs: dict, stream: bool,
                   include_usage: bool):
        job = Job(method, kwargs, asyncio.get_running_loop())
        self.engine.submit(job)
        watcher = asyncio.create_task(self._watch_disconnect(request, job))
        try:
            kind, payload = await job.events.get()  # waits its turn in the queue
            if kind == "error":
                raise payload
            if stream:
                return StreamingResponse(self._events(job, watcher, include_usage),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache",
                                                  "X-Accel-Buffering": "no"})
            chunks = []
            while True:
                kind, payload = await job.events.get()
                if kind == "chunk":
                    chunks.append(payload)
                elif kind == "error":
                    raise payload
                else:
                    break
            return JSONResponse(self._whole(chunks))
        except BaseException:
            job.cancel()
            watcher.cancel()
            raise
        finally:
            if not stream:
                job.cancel()
                watcher.cancel()

    def _whole(self, chunks: list[dict]) -> dict:
        """A whole completion from the chunks of a streamed one."""
        last = chunks[-1]
        head = {k: last[k] for k in ("id", "created")}
        choice = last["choices"][0]
        if last["object"] == "chat.completion.chunk":
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            return {**head, "object": "chat.completion", "model": self.model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": choice["finish_reason"]}],
                    "usage": last["usage"]}
        text = "".join(c["choices"][0]["text"] for c in chunks)
        return {**head, "object": "text_completion", "model": self.model_id,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": choice["finish_reason"]}],
                "usage": last["usage"]}

    async def _events(self, job: Job, watcher: asyncio.Task, include_usage: bool):
        """Server-sent events of a streamed request; the usage goes in a last chunk of its
        own, as OpenAI sends it, when the client asked for it."""
        try:
            while True:
                kind, payload = await job.events.get()
                if kind == "chunk":
                    usage = payload.pop("usage", None)
                    payload["model"] = self.model_id
                    yield f"data: {json.dumps(payload)}\n\n"
                    if usage is not None and include_usage:
                        yield f"data: {json.dumps({**payload, 'choices': [], 'usage': usage})}\n\n"
                elif kind == "error":
                    yield f"data: {json.dumps(payload.body())}\n\n"
                    return
                else:
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancel()
            watcher.cancel()

    # -- endpoints --

    async def chat_completions(self, request: Request):
        self._authorize(request)
        body = await self._body(request)
        messages = chat_messages(body)
        kwargs = sampling_kwargs(body, self.max_tokens, None)
        stream, include_usage = _stream_flags(body)
        return await self._run(request, "create_chat_completion",
                               {"messages": messages, **kwargs}, stream, include_usage)

    async def completions(self, request: Request):
        self._authorize(request)
        body = await self._body(request)
        if body.get("echo"):
            raise RequestError(400, "'echo' is not supported", param="echo")
        if body.get("suffix"):
            raise RequestError(400, "'suffix' is not supported", param="suffix")
        prompt = completion_prompt(body)
        kwargs = sampling_kwargs(body, self.max_tokens, 16)  # OpenAI's default for completions
        stream, include_usage = _stream_flags(body)
        return await self._run(request, "create_completion", {"prompt": prompt, **kwargs},
                               stream, include_usage)

    async def models(self, request: Request):
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": int(self.started),
             "owned_by": "edgemoe", "meta": {"n_ctx": self.model.n_ctx,
                                             "arch": self.model.shards.arch}}]})

    async def health(self, request: Request):
        return JSONResponse({"status": "ok"})

    def status(self) -> dict:
        s = self.model.status()
        tokens, read = s["tokens_evaluated"], s["bytes_read"]
        running = self.engine.running
        live = None
        if running is not None and running.started is not None:
            elapsed = time.monotonic() - running.started
            live = {"pieces": running.n_pieces, "seconds": elapsed,
                    "pieces_per_second": running.n_pieces / elapsed if elapsed > 0 else 0.0}
        from edgemoe.generate import cgroup_memory_peak_bytes

        return {
            "model": self.model_id, "n_ctx": self.model.n_ctx,
            "memory_budget": self.config.memory_budget, "policy": self.config.policy,
            "memory": s["memory"], "memory_bytes": s["memory_bytes"], "rss_bytes": s["rss_bytes"],
            "cgroup_peak_bytes": cgroup_memory_peak_bytes(),
            "resident_experts": s["resident_experts"], "total_experts": s["total_experts"],
            "hit_rate": s["hit_rate"], "tokens_evaluated": tokens, "bytes_read": read,
            "bytes_read_per_token": read / tokens if tokens else 0.0, "n_past": s["n_past"],
            "queue": self.engine.queue_state(),
            "requests": {k: self.engine.counts[k]
                         for k in ("served", "cancelled", "failed", "rejected")},
            "tokens_generated": self.engine.tokens_generated,
            "generating": live, "last_request": self.engine.last,
            "last_cancel": self.engine.last_cancel,
            "uptime_seconds": time.time() - self.started,
        }

    async def status_endpoint(self, request: Request):
        self._authorize(request)
        return JSONResponse(self.status())

    async def metrics(self, request: Request):
        self._authorize(request)
        s = self.status()
        lines = []

        def metric(name: str, kind: str, help_: str, value, labels: str = "") -> None:
            if value is None:
                return
            if not any(l.startswith(f"# HELP edgemoe_{name} ") for l in lines):
                lines.append(f"# HELP edgemoe_{name} {help_}")
                lines.append(f"# TYPE edgemoe_{name} {kind}")
            lines.append(f"edgemoe_{name}{labels} {value}")

        for part, n in s["memory"].items():
            metric("memory_bytes", "gauge", "backend memory by part", n, f'{{part="{part}"}}')
        metric("rss_bytes", "gauge", "resident set size of the server process", s["rss_bytes"])
        metric("cgroup_peak_bytes", "gauge", "peak memory of the server's cgroup",
               s["cgroup_peak_bytes"])
        metric("resident_experts", "gauge", "experts with a slot", s["resident_experts"])
        metric("experts", "gauge", "experts in the model", s["total_experts"])
        metric("expert_hit_rate", "gauge", "wanted experts that were resident", s["hit_rate"])
        metric("tokens_evaluated_total", "counter", "tokens evaluated", s["tokens_evaluated"])
        metric("expert_bytes_read_total", "counter", "expert bytes read from the shards",
               s["bytes_read"])
        metric("tokens_generated_total", "counter", "tokens generated", s["tokens_generated"])
        for k, n in s["requests"].items():
            metric("requests_total", "counter", "requests by outcome", n, f'{{outcome="{k}"}}')
        metric("requests_running", "gauge", "requests on the engine", s["queue"]["running"])
        metric("requests_waiting", "gauge", "requests in the queue", s["queue"]["waiting"])
        return PlainTextResponse("\n".join(lines) + "\n",
                                 media_type="text/plain; version=0.0.4")

    async def index(self, request: Request):
        return HTMLResponse(self.page)

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app):
            self.engine.start()
            try:
                yield
            finally:
                self.engine.stop()

        async def on_request_error(request: Request, exc: RequestError):
            return exc.response()

        async def on_http_error(request: Request, exc: HTTPException):
            return RequestError(exc.status_code, str(exc.detail)).response()

        routes = [
            Route("/", self.index),
            Route("/health", self.health),
            Route("/status", self.status_endpoint),
            Route("/metrics", self.metrics),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        return Starlette(routes=routes, lifespan=lifespan,
                         exception_handlers={RequestError: on_request_error,
                                             HTTPException: on_http_error})


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        import ipaddress

        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    if is_loopback(host) or api_key is not None:
        return None
    return (f"listening on {host} without --api-key: anyone who can reach this machine can use "
            "the model")


def serve(model, config: ServerConfig, log=None) -> None:
    """Serve until SIGINT/SIGTERM. Binds first, so `port=0` picks a free port; the line
    `edgemoe serve: listening on http://HOST:PORT` (on stderr) says which."""
    import logging

    import uvicorn

    # asyncio warns of every write to a client that already hung up; those are cancels.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    try:
        sock = socket.create_server((config.host, config.port), family=family)
    except OSError as exc:
        raise EdgeMoeError(f"cannot listen on {config.host}:{config.port} ({exc.strerror})") \
            from None
    port = sock.getsockname()[1]
    warning = exposure_warning(config.host, config.api_key)
    if warning:
        log(f"edgemoe serve: warning: {warning}")
    server = Server(model, config, log=lambda line: log(f"edgemoe serve: {line}"))
    host = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    log(f"edgemoe serve: {server.model_id} (context {model.n_ctx}, "
        f"budget {config.memory_budget or 'none'}, policy {config.policy})")
    log(f"edgemoe serve: listening on http://{host}:{port} (web chat at /, OpenAI API at /v1)")
    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Streams end at their next token rather than at the graceful timeout (from a
            # thread: a signal handler must not take the engine's lock).
            threading.Thread(target=server.engine.shut_down).start()
            super().handle_exit(sig, frame)

    uv = Uvicorn(uvicorn.Config(server.app(), log_level="warning",
                                timeout_graceful_shutdown=3, access_log=False))
    # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again for the handlers it
    # found: ours note it, so that the command ends normally (the model is closed, figures
    # printed) instead of dying by the signal.
    seen: list[int] = []
    handled = (signal.SIGINT, signal.SIGTERM)
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda sig, frame: seen.append(sig))
                for sig in handled} if main else {}
    try:
        uv.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log("edgemoe serve: stopped")
