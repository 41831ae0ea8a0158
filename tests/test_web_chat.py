"""The web chat at `/` in headless Chromium (Debian's chromium and chromium-driver packages,
driven over WebDriver's HTTP protocol): a person types a message, the reply streams in, the
status line updates."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from server_process import ServerProcess, converted_bundled  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # W3C WebDriver's element reference key

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):  # .ci/run installs them: their absence there is a failure
        raise RuntimeError("chromium and chromedriver are missing (apt-get install chromium "
                           "chromium-driver)")
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)


class Browser:
    """A minimal WebDriver client (the W3C protocol is JSON over HTTP)."""

    def __init__(self, profile_dir) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.driver.kill()
                raise AssertionError("chromedriver did not start")
            time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run", f"--user-data-dir={profile_dir}", "--window-size=1000,700"]
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"WebDriver {method} {path}: {exc.read()[:500]!r}") from None

    def cmd(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css: str, text: str) -> None:
        element = self.find(css)
        self.cmd("POST", f"/element/{element}/clear", {})
        self.cmd("POST", f"/element/{element}/value", {"text": text})

    def click(self, css: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def js(self, script: str):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": []})

    def wait_for(self, script: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for: {script}")
            time.sleep(0.1)

    def screenshot(self, path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))

    def close(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.driver.terminate()
            try:
                self.driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.driver.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    shards = converted_bundled(tmp_path_factory)
    # static: a fixed resident set, so the same request gets the same reply (swap would adapt)
    s = ServerProcess(shards, "-c", "1024", "--memory-budget", "75%", "--policy", "static",
                      "--alias", "shakespy",
                      log=tmp_path_factory.mktemp("webserve") / "server.log")
    yield s
    assert s.stop() == 0, s.output()


def test_web_chat_streams_a_reply_and_updates_the_status_line(server, tmp_path):
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(server.url + "/")
        # the budget and policy the server runs with, and a first status line
        config = browser.wait_for("const t = document.getElementById('config').textContent;"
                                  "return t.includes('policy') ? t : null;")
        assert "budget 75%" in config and "policy static" in config, config
        first = browser.wait_for("const s = document.getElementById('status');"
                                 "return s.dataset.updates ? [s.dataset.updates, s.textContent]"
                                 " : null;")
        assert "experts 24/32 resident" in first[1], first

        browser.type("#temperature", "0")
        browser.type("#input", "Good morrow, who goes there?")
        browser.click("#send")
        reply = browser.wait_for(
            "const b = document.querySelector('.msg.assistant');"
            "return b && b.dataset.done ? {pieces: b.dataset.pieces || '0',"
            " text: b.firstChild ? b.firstChild.textContent : '',"
            " error: b.classList.contains('error')} : null;")
        assert not reply["error"], reply
        assert reply["text"].strip(), reply
        assert int(reply["pieces"]) > 1, reply  # it arrived piece by piece
        # the page said what the API says to the same conversation
        _, _, whole = server.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Good morrow, who goes there?"}],
            "temperature": 0, "max_tokens": 256})
        assert reply["text"] == whole["choices"][0]["message"]["content"]

        # the status line moved on after the reply: a speed and the hit rate of real tokens
        status = browser.wait_for(
            f"const s = document.getElementById('status');"
            f"return Number(s.dataset.updates) > {int(first[0])} && /[0-9.]+ tok\\/s/"
            f".test(s.textContent) ? s.textContent : null;")
        assert "hit rate" in status and "n/a" not in status, status
        assert "ctx " in status and "mem " in status
        browser.screenshot(tmp_path / "chat.png")
    finally:
        browser.close()


def test_web_chat_asks_for_the_api_key(tmp_path, tmp_path_factory):
    shards = converted_bundled(tmp_path_factory)
    s = ServerProcess(shards, "-c", "512", "--api-key", "sekret", log=tmp_path / "server.log")
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(s.url + "/")
        browser.wait_for("return document.getElementById('status').textContent"
                         ".includes('API key needed');")
        assert browser.js("return getComputedStyle(document.getElementById('keybox')).display") \
            == "flex"
        browser.type("#key", "sekret")
        browser.click("#savekey")
        status = browser.wait_for("const t = document.getElementById('status').textContent;"
                                  "return t.includes('resident') ? t : null;")
        assert "experts 32/32 resident" in status
        browser.type("#input", "Hail!")
        browser.click("#send")
        reply = browser.wait_for("const b = document.querySelector('.msg.assistant');"
                                 "return b && b.dataset.done ? b.textContent : null;")
        assert "error" not in browser.js(
            "return document.querySelector('.msg.assistant').className"), reply
    finally:
        browser.close()
        assert s.stop() == 0, s.output()
