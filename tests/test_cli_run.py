"""`edgemoe run`, `edgemoe info` and `edgemoe chat` (stdin not a terminal), as a user types
them: through the installed `edgemoe` command, in a subprocess."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import edgemoe
from edgemoe.cli_run import tensor_class
from test_generate import converted_tiny

EDGEMOE = [sys.executable, "-m", "edgemoe"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return converted_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(shards):
    """Greedy continuations from the Python API, the oracle for the CLI's output."""
    with edgemoe.Model(shards, n_ctx=128) as m:
        yield m


def edgemoe_cmd(*args, input=None, timeout=120):
    return subprocess.run([*EDGEMOE, *map(str, args)], input=input, capture_output=True,
                          timeout=timeout)


def test_run_streams_prompt_and_continuation(shards, reference):
    proc = edgemoe_cmd("run", shards, "-p", "The sea", "-n", 12, "--temp", 0, "-c", 128,
                       "-t", 1)
    assert proc.returncode == 0, proc.stderr.decode()
    expected = "The sea" + reference.generate("The sea", max_tokens=12, temperature=0) + "\n"
    assert proc.stdout.decode("utf-8") == expected
    summary = proc.stderr.decode().strip().splitlines()[-1]
    assert re.search(r"prefill: \d+ tokens, [\d.]+ tok/s \| decode: 12 tokens, [\d.]+ tok/s "
                     r"\| peak RSS [\d.]+ MiB", summary), summary
    assert "seed" not in summary  # greedy: no seed to report


def test_run_from_file_sampled_with_seed(shards, reference, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Tell me", encoding="utf-8")
    args = ("run", shards, "-f", prompt, "-n", 10, "--seed", 5, "--temp", 0.9, "--top-k", 20,
            "--top-p", 0.9, "--min-p", 0.02, "--repeat-penalty", 1.1, "--no-display-prompt")
    first, second = edgemoe_cmd(*args), edgemoe_cmd(*args)
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout == second.stdout
    expected = reference.generate("Tell me", max_tokens=10, temperature=0.9, top_k=20,
                                  top_p=0.9, min_p=0.02, repeat_penalty=1.1, seed=5)
    assert first.stdout.decode("utf-8") == expected + "\n"
    assert "seed 5" in first.stderr.decode()


def test_run_errors_are_one_line(shards, tmp_path):
    missing = edgemoe_cmd("run", tmp_path / "nowhere", "-p", "x")
    too_long = edgemoe_cmd("run", shards, "-p", "word " * 100, "-c", 32)
    not_a_model = tmp_path / "photos"
    not_a_model.mkdir()
    (not_a_model / "cat.jpg").write_bytes(b"\xff\xd8")
    not_a_set = edgemoe_cmd("run", not_a_model, "-p", "x")
    for proc, words in ((missing, "nowhere"), (too_long, "context"),
                        (not_a_set, "photos: not a shard set (no manifest.json; expected a "
                                    "directory written by `edgemoe convert`")):
        err = proc.stderr.decode().strip()
        assert proc.returncode == 1, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert err.startswith("edgemoe run: error:") and words in err, err


@pytest.mark.parametrize("flag,value,allowed", [
    ("-n", -5, ">= -1"), ("--temp", -1, ">= 0.0"), ("-t", 0, "1..1024"), ("-c", 0, ">= 1"),
    ("--top-p", 2, "0.0..1.0"), ("--min-p", "nan", "0.0..1.0"), ("--top-k", -1, ">= 0"),
    ("--repeat-penalty", 0, "> 0.0"), ("--repeat-last-n", -2, ">= -1"),
    ("--n-prefetch", -1, ">= 0"),
])
def test_out_of_range_arguments_name_the_allowed_range(shards, flag, value, allowed):
    proc = edgemoe_cmd("run", shards, "-p", "x", flag, value)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"{value} is out of range (allowed: {allowed})" in err and flag in err, err


def test_version_names_the_llama_cpp_build():
    proc = edgemoe_cmd("--version")
    assert proc.returncode == 0
    assert re.match(rf"edgemoe {re.escape(edgemoe.__version__)} \(llama.cpp from "
                    r"llama-cpp-python [\d.]+; libraries in /", proc.stdout.decode())


def test_a_full_context_is_noted(shards):
    proc = edgemoe_cmd("run", shards, "-p", "The sea", "-n", -1, "--temp", 0, "-c", 16, "-t", 1)
    assert proc.returncode == 0, proc.stderr.decode()
    assert ("edgemoe run: note: generation stopped at a full context (16 tokens)"
            in proc.stderr.decode())
    short = edgemoe_cmd("run", shards, "-p", "The sea", "-n", 3, "--temp", 0, "-c", 16, "-t", 1)
    assert "full context" not in short.stderr.decode()


def test_info_describes_the_shard_set(shards):
    proc = edgemoe_cmd("info", shards)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    assert "architecture  qwen3moe" in out
    assert "experts 4, used per token 2" in out
    assert "quant types   experts Q8_0, dense Q8_0" in out
    # the three per-expert classes: 8 tensors each, bytes summed from the manifest
    for proj in ("ffn_gate", "ffn_up", "ffn_down"):
        nbytes = sum(e["tensors"][proj]["nbytes"] for e in manifest["experts"])
        assert re.search(rf"^{proj}\s+8\s+{nbytes / 1024:.2f} KiB\s+Q8_0$", out, re.M), proj
    assert re.search(r"^ffn_gate_inp\s+2\s+.*F32$", out, re.M)  # the router stays F32
    assert "experts       8 (2 layers x 4)" in out


@pytest.mark.parametrize("name,cls", [
    ("blk.3.attn_q.weight", "attn_q"), ("blk.0.ffn_down.7.weight", "ffn_down"),
    ("output.weight", "output"), ("blk.1.attn_q.bias", "attn_q.bias"),
    ("blk.0.ffn_gate_inp_shexp.weight", "ffn_gate_inp_shexp"), ("rope_freqs.weight", "rope_freqs"),
])
def test_tensor_class(name, cls):
    assert tensor_class(name) == cls


def test_chat_from_a_pipe(shards, reference):
    script = "Hello there\n/stats\n/reset\nHello there\n/bogus\n"
    proc = edgemoe_cmd("chat", shards, "--temp", 0, "-n", 8, "-c", 256, input=script.encode())
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode("utf-8")
    reply = reference.create_chat_completion([{"role": "user", "content": "Hello there"}],
                                             max_tokens=8, temperature=0)
    text = reply["choices"][0]["message"]["content"]
    # the same first reply before and after /reset, each followed by its status line
    status = r"\[mem [\d.]+ MiB \(RSS [\d.]+ MiB\) \| experts 8/8 resident \| hit rate 100\.0% \| [\d.]+ tok/s"
    assert len(re.findall(re.escape(text) + r"\n" + status, out)) == 2, out
    assert "memory:" in out and "expert_slots" in out
    assert "(conversation cleared)" in out
    assert "unknown command /bogus" in out


def test_chat_exits_non_zero_when_every_turn_failed(shards):
    proc = edgemoe_cmd("chat", shards, "-c", 8, "-n", 4, "-t", 1, input=b"hello\nthere\n")
    assert proc.returncode == 1
    assert proc.stdout.decode().count("error: the prompt has") == 2


def test_chat_drops_the_oldest_turns_when_the_context_is_full(shards):
    turns = "".join(f"message number {i} with a few more words\n" for i in range(6))
    proc = edgemoe_cmd("chat", shards, "--temp", 0, "-n", 12, "-c", 96, "--system", "Be brief.",
                       input=(turns + "/stats\n").encode())
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode("utf-8")
    assert "dropped the oldest turn" in out
    assert len(re.findall(r"\[mem ", out)) == 6  # every turn was answered
    # whole exchanges were dropped and the system message kept: 1 + 2 * (exchanges left)
    n_messages = int(re.search(r"conversation: (\d+) messages", out).group(1))
    assert n_messages % 2 == 1 and 3 <= n_messages < 13


def test_run_converts_a_checkpoint_once_and_reuses_it(shards, tmp_path):
    checkpoint = Path(shards).parent / "ckpt"  # the HF checkpoint the shard set came from
    env = {**os.environ, "EDGEMOE_CACHE": str(tmp_path / "cache")}
    args = [*EDGEMOE, "run", str(checkpoint), "-p", "Hello", "-n", "6", "--temp", "0"]
    first = subprocess.run(args, capture_output=True, env=env, timeout=300)
    second = subprocess.run(args, capture_output=True, env=env, timeout=300)
    assert first.returncode == 0 and second.returncode == 0, first.stderr.decode()
    assert "converting" in first.stderr.decode()
    assert "converting" not in second.stderr.decode()
    assert first.stdout == second.stdout and first.stdout.startswith(b"Hello")
    (cached,) = (tmp_path / "cache" / "shards").iterdir()
    assert cached.name.startswith("ckpt-") and (cached / "manifest.json").is_file()
