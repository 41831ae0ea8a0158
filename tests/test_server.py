"""`edgemoe serve` as a real process on a loopback port, driven by the official `openai` client
and by raw HTTP: whole and streamed completions, eight clients at once, bad bodies, a prompt
longer than the context, a client that goes away mid-stream, the queue bound, the API key."""
from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from server_process import ROOT, ServerProcess, converted_bundled  # noqa: E402

N_CTX = 4096


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return converted_bundled(tmp_path_factory)


@pytest.fixture(scope="module")
def server(shards, tmp_path_factory):
    s = ServerProcess(shards, "-c", str(N_CTX), "--alias", "shakespy",
                      log=tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    assert s.stop() == 0, s.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def chat(client, content: str, **kw):
    kw = {"max_tokens": 40, "temperature": 0, **kw}
    return client.chat.completions.create(
        model="shakespy", messages=[{"role": "user", "content": content}], **kw)


def test_models_health_status(server, client):
    assert [m.id for m in client.models.list()] == ["shakespy"]
    assert server.get("/health") == {"status": "ok"}
    s = server.get("/status")
    assert s["model"] == "shakespy" and s["n_ctx"] == N_CTX
    assert s["resident_experts"] == s["total_experts"] == 4 * 8
    assert s["memory_bytes"] == sum(s["memory"].values()) > 0
    assert s["queue"]["max_waiting"] == 16


def test_openai_chat_completion_whole_and_streamed(client):
    whole = chat(client, "Who art thou?")
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == "shakespy"
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0

    stream = chat(client, "Who art thou?", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and
              c.choices[0].delta.content]
    assert len(deltas) > 1  # streamed piece by piece, not in one go
    assert "".join(deltas) == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == choice.finish_reason and set(finish[:-1]) == {None}
    usage = chunks[-1].usage  # include_usage: a last chunk with no choices
    assert not chunks[-1].choices and usage.completion_tokens == whole.usage.completion_tokens
    # the same prompt again: all of it but the last token came from the KV cache
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_openai_completion_whole_and_streamed(client):
    whole = client.completions.create(model="shakespy", prompt="ROMEO:", max_tokens=24,
                                      temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24
    pieces = [c.choices[0].text for c in client.completions.create(
        model="shakespy", prompt="ROMEO:", max_tokens=24, temperature=0, stream=True)]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].text


def test_next_turn_reuses_the_cached_prefix(client):
    first = [{"role": "user", "content": "Tell me of the king."}]
    a = client.chat.completions.create(model="shakespy", messages=first, max_tokens=30,
                                       temperature=0)
    second = first + [{"role": "assistant", "content": a.choices[0].message.content},
                      {"role": "user", "content": "And the queen?"}]
    b = client.chat.completions.create(model="shakespy", messages=second, max_tokens=10,
                                       temperature=0)
    assert b.usage.prompt_tokens > a.usage.prompt_tokens
    assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens


def test_eight_concurrent_clients_are_all_answered_correctly(server, client):
    questions = [f"{who}, what news?" for who in
                 ("Romeo", "Juliet", "Hamlet", "Ophelia", "Macbeth", "Banquo", "Lear", "Puck")]
    expected = {q: chat(client, q, max_tokens=24).choices[0].message.content
                for q in questions}
    got: dict[str, str] = {}
    ids: set[str] = set()
    errors: list[BaseException] = []

    def ask(i: int, q: str) -> None:
        try:
            own = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                timeout=120)
            if i % 2:
                chunks = list(chat(own, q, max_tokens=24, stream=True))
                got[q] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                ids.add(chunks[0].id)
            else:
                reply = chat(own, q, max_tokens=24)
                got[q] = reply.choices[0].message.content
                ids.add(reply.id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i, q)) for i, q in enumerate(questions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert got == expected
    assert len(ids) == 8


def test_malformed_bodies_get_4xx_and_the_server_keeps_serving(server, client):
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"messages": "hi"}, 400, "messages"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"content": "no role"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": {"x": 1}}]}, 400, "content"),
        ({"messages": msgs, "temperature": "hot"}, 400, "temperature"),
        ({"messages": msgs, "top_p": 3}, 400, "top_p"),
        ({"messages": msgs, "max_tokens": 10**9}, 400, f"at most {N_CTX}"),
        ({"messages": msgs, "max_tokens": True}, 400, "max_tokens"),
        ({"messages": msgs, "n": 3}, 400, "'n'"),
        ({"messages": msgs, "stream": "yes"}, 400, "stream"),
        ({"messages": msgs, "stop": [1, 2]}, 400, "stop"),
    ]
    for body, status, words in cases:
        code, _, answer = server.post("/v1/chat/completions", body)
        assert code == status, (body[:60], answer)
        assert words in answer["error"]["message"], answer
        assert answer["error"]["type"] == "invalid_request_error"
    # a body over the limit is refused from its Content-Length, before it is read
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n{" % (2 << 20))
        head = b""
        while not head.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, head
            head += chunk
    assert head.startswith(b"HTTP/1.1 413 ") and b"the limit is" in head, head
    for body in ({}, {"prompt": ""}, {"prompt": ["a", "b"]}, {"prompt": [1, "x"]}):
        code, _, answer = server.post("/v1/completions", body)
        assert code == 400 and "prompt" in answer["error"]["message"]
    code, _, _ = server.post("/v1/nothing", {})
    assert code == 404
    # still serving
    assert chat(client, "Still there?", max_tokens=4).choices[0].message.content is not None


def test_over_long_prompt_is_a_clear_400_naming_the_context(client):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "word " * (N_CTX + 100))
    assert info.value.status_code == 400
    message = info.value.body["message"]
    assert f"the context holds {N_CTX}" in message
    assert info.value.body["code"] == "context_length_exceeded"
    assert chat(client, "Short again.", max_tokens=4).choices[0].message.content is not None


def _open_stream(url: str, body: dict, n_events: int) -> tuple[socket.socket, bytes]:
    """POST a streamed completion over a raw socket; return it once `n_events` server-sent
    events have arrived, with what was read."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    seen = b""
    while seen.count(b"data: ") < n_events:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the stream early: {seen!r}"
        seen += chunk
    assert b"200 OK" in seen.split(b"\r\n", 1)[0]
    return sock, seen


def test_disconnect_mid_stream_frees_the_engine(server, client):
    before = server.get("/status")
    asked = 3000
    sock, _ = _open_stream(server.url, {"prompt": "ROMEO:", "max_tokens": asked,
                                        "temperature": 0, "stream": True}, n_events=5)
    sock.close()  # the client hangs up mid-stream
    t0 = time.monotonic()
    nxt = client.completions.create(model="shakespy", prompt="JULIET:", max_tokens=1,
                                    temperature=0)
    waited = time.monotonic() - t0
    assert nxt.usage.completion_tokens == 1
    after = server.get("/status")
    assert after["requests"]["cancelled"] == before["requests"]["cancelled"] + 1
    generated = after["tokens_generated"] - before["tokens_generated"] - 1
    cancel = after["last_cancel"]
    # The engine stopped at the next token: the one being evaluated when the client went away.
    assert cancel["tokens_after_cancel"] is not None and cancel["tokens_after_cancel"] <= 1, cancel
    assert generated < asked // 4, (generated, cancel)
    print(f"\ncancelled after {generated} of {asked} tokens; engine free {1e3 * cancel['seconds']:.2f}"
          f" ms after the hang-up was seen, {cancel['tokens_after_cancel']} token(s) evaluated in "
          f"between; next request answered in {1e3 * waited:.1f} ms")


@pytest.fixture(scope="module")
def guarded(shards, tmp_path_factory):
    """A second server: an API key, a queue of one, half the experts resident (swap)."""
    s = ServerProcess(shards, "-c", str(N_CTX), "--queue", "1", "--api-key", "sekret",
                      "--memory-budget", "50%", "--policy", "swap",
                      log=tmp_path_factory.mktemp("guarded") / "server.log")
    yield s
    assert s.stop() == 0, s.output()


def test_api_key_is_required_but_not_for_health(guarded):
    assert guarded.get("/health") == {"status": "ok"}
    bad = openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sekret", max_retries=0)
    reply = chat(good, "Speak.", max_tokens=8)
    assert reply.usage.completion_tokens > 0
    s = guarded.get("/status", headers={"Authorization": "Bearer sekret"})
    assert (s["memory_budget"], s["policy"]) == ("50%", "swap")
    # Half the slots; a swap in flight has retired its victim before the new expert's read
    # completes (at most one read per expert layer at a time), so up to that many are loading.
    n_layer = json.loads((ROOT / "models/edgemoe-tiny-shakespy/config.json").read_text())[
        "num_hidden_layers"]
    half, loading = s["total_experts"] // 2, n_layer
    assert half - loading <= s["resident_experts"] <= half, s
    assert 0 < s["hit_rate"] <= 1
    assert s["bytes_read"] > 0 and s["bytes_read_per_token"] > 0  # the experts read into slots


def test_queue_bound_answers_429_with_retry_after(guarded):
    key = {"Authorization": "Bearer sekret"}
    body = {"prompt": "ROMEO:", "max_tokens": 2000, "temperature": 0, "stream": True}
    results: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def one() -> None:
        import http.client

        host, port = guarded.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json", **key})
        r = conn.getresponse()
        with lock:
            results.append((r.status, {k.lower(): v for k, v in r.getheaders()}))
        conn.close()  # a streamed 200 is cut short: its generation is cancelled

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    statuses = sorted(s for s, _ in results)
    assert len(statuses) == 5 and statuses.count(429) >= 2 and 200 in statuses, statuses
    for status, headers in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
    time.sleep(0.5)
    s = guarded.get("/status", headers=key)
    assert s["requests"]["rejected"] >= 2


def test_metrics_are_prometheus_text(server):
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE edgemoe_expert_hit_rate gauge" in text
    assert "edgemoe_expert_hit_rate 1.0" in text
    assert 'edgemoe_requests_total{outcome="served"}' in text


def test_web_page_is_served_from_the_package(server):
    import urllib.request

    with urllib.request.urlopen(server.url + "/", timeout=10) as r:
        page = r.read().decode()
    assert "<title>edgemoe chat</title>" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


def test_exposure_warning_off_loopback_without_a_key():
    from edgemoe.server import exposure_warning

    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("::1", None) is None
    assert exposure_warning("0.0.0.0", "k") is None
    assert "without --api-key" in exposure_warning("0.0.0.0", None)
    assert "without --api-key" in exposure_warning("192.0.2.7", None)


def test_serve_without_the_extra_says_how_to_install(monkeypatch, capsys):
    from edgemoe import cli

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # find_spec then reports it missing
    assert cli.main(["serve", "nowhere"]) == 1
    assert "pip install 'edgemoe[server]'" in capsys.readouterr().err


def test_readme_serve_example_runs(tmp_path):
    """The README's two commands and its client snippet, as written (on a free port)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"<!-- serve:begin -->(.*?)<!-- serve:end -->", text, re.S).group(1)
    install, command = re.search(r"```sh\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert install.startswith("pip install 'edgemoe[server]'")
    argv = shlex.split(command)
    assert argv[:2] == ["edgemoe", "serve"]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "http://127.0.0.1:8080/v1" in code
    s = ServerProcess(ROOT / argv[2], *argv[3:], log=tmp_path / "server.log",
                      env={"EDGEMOE_CACHE": str(tmp_path / "cache")})
    try:
        (tmp_path / "example.py").write_text(code.replace("http://127.0.0.1:8080", s.url))
        proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
        assert re.search(r"[A-Za-z]{2,}", proc.stdout.decode()), proc.stdout
    finally:
        assert s.stop() == 0, s.output()


def test_sigterm_ends_running_streams_and_exits_cleanly(shards, tmp_path):
    s = ServerProcess(shards, "-c", str(N_CTX), log=tmp_path / "server.log")
    try:
        sock, seen = _open_stream(s.url, {"prompt": "ROMEO:", "max_tokens": 4000,
                                          "temperature": 0, "stream": True}, n_events=3)
        s.proc.terminate()
        while chunk := sock.recv(65536):
            seen += chunk
        sock.close()
        # the stream says it was cut short, rather than ending as if it were whole
        assert b'"the server is shutting down"' in seen
        assert b"[DONE]" not in seen
        assert s.proc.wait(timeout=30) == 0
        assert "cancelled: the server is stopping" in s.output()
    finally:
        s.stop()
