"""`edgemoe perplexity`: the protocol against an independent computation (transformers on the
same tiny model, teacher-forced windows), and the command as a user runs it."""
from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest

from edgemoe.engine import Engine
from edgemoe.perplexity import evaluate
from test_generate import converted_tiny
from tiny_models import load_reference, make_tiny_shards

torch = pytest.importorskip("torch")

EDGEMOE = [sys.executable, "-m", "edgemoe"]
FINAL = re.compile(r"^Final estimate: PPL = (\d+\.\d{4}) \+/- (\d+\.\d{5})$")


def reference_ppl(model, tokens: np.ndarray, n_ctx: int, bos: int | None) -> tuple[float, float]:
    """llama-perplexity's figures computed with transformers: per window (first token -> bos),
    logits of positions n_ctx/2 .. n_ctx-2 score the next tokens."""
    first = n_ctx // 2
    nll = []
    for i in range(tokens.size // n_ctx):
        window = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if bos is not None:
            window[0] = bos
        with torch.no_grad():
            logits = model(torch.tensor(window[None, :])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1).numpy()
        nll += [-logp[p, window[p + 1]] for p in range(first, n_ctx - 1)]
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    return ppl, ppl * math.sqrt(nll.var() / (nll.size - 1))


@pytest.mark.parametrize("bos", [None, 1])
def test_ppl_matches_transformers(tmp_path, bos):
    shards = make_tiny_shards("qwen3_moe", tmp_path, "F32", seed=3)
    model = load_reference(tmp_path / "qwen3_moe_hf")
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, model.config.vocab_size, 3 * 32 + 7)
    want, want_err = reference_ppl(model, tokens, 32, bos)
    with Engine(shards, n_ctx=32, n_threads=1, n_batch=8, kv_type="f32") as engine:
        res = evaluate(engine, tokens, 32, bos=bos)
    assert res.n_chunk == 3 and res.n_scored == 3 * 15
    assert res.ppl == pytest.approx(want, rel=1e-4)
    assert res.ppl_err == pytest.approx(want_err, rel=1e-3)
    assert len(res.chunk_ppl) == 3 and res.chunk_ppl[-1] == res.ppl
    assert res.experts_per_token == 2.0


def _run(*args, check=True):
    proc = subprocess.run([*EDGEMOE, "perplexity", *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _final(proc) -> float:
    last = proc.stdout.strip().splitlines()[-1]
    m = FINAL.match(last)
    assert m, last
    return float(m[1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    shards = converted_tiny(tmp_path_factory)
    root = tmp_path_factory.mktemp("ppl")
    text = root / "text.txt"
    text.write_text(" ".join(f"The {w} of the sea is {n} and the sky." for n, w in
                             enumerate(["colour", "sound", "smell", "shape"] * 40)))
    full = _run(shards, "-f", text, "-c", 64, "-t", 1, "--chunks", 4,
                "--save-logits", root / "full.logits", "--json", root / "full.json")
    return shards, root, text, full


def test_cli_reports_like_llama_perplexity(setup):
    shards, root, text, full = setup
    progress = full.stdout.splitlines()[0]
    assert re.fullmatch(r"(\[\d\]\d+\.\d{4},){4}", progress), progress
    assert "calculating perplexity over 4 chunks, n_ctx=64" in full.stderr
    ppl = _final(full)
    import json
    doc = json.loads((root / "full.json").read_text())
    assert round(doc["ppl"], 4) == ppl and doc["n_scored"] == 4 * 31


def test_kl_against_itself_and_exact_policy_is_zero(setup):
    shards, root, text, full = setup
    for extra in ([], ["--memory-budget", "50%", "--policy", "ondemand"]):
        proc = _run(shards, "-f", text, "-c", 64, "-t", 1, "--chunks", 4,
                    "--kl-base", root / "full.logits", *extra)
        assert _final(proc) == _final(full)
        assert "Same top p: 100.000" in proc.stdout
        kld = float(re.search(r"Mean    KLD:\s+(\S+)", proc.stdout)[1])
        assert kld < 1e-6
        assert "PPL ratio:  1.0000" in proc.stdout


def test_lossy_policy_shows_its_loss(setup):
    shards, root, text, full = setup
    proc = _run(shards, "-f", text, "-c", 64, "-t", 1, "--chunks", 4,
                "--kl-base", root / "full.logits", "--memory-budget", "50%", "--policy", "static")
    kld = float(re.search(r"Mean    KLD:\s+(\S+)", proc.stdout)[1])
    agree = float(re.search(r"Same top p:\s+(\S+)", proc.stdout)[1])
    assert kld > 1e-4 and agree < 100.0
    assert "residency:" in proc.stderr


def test_errors_name_the_problem(setup, tmp_path):
    shards, root, text, full = setup
    short = tmp_path / "short.txt"
    short.write_text("too short")
    proc = _run(shards, "-f", short, "-c", 64, check=False)
    assert proc.returncode == 1 and "needs at least 64" in proc.stderr
    proc = _run(shards, "-f", text, "-c", 32, "--kl-base", root / "full.logits", check=False)
    assert proc.returncode == 1 and "context of 64 tokens" in proc.stderr
    proc = _run(shards, "-f", text, "-c", 64, "--kl-base", text, check=False)
    assert proc.returncode == 1 and "logits file" in proc.stderr
    proc = _run(shards, "-f", tmp_path / "missing.txt", check=False)
    assert proc.returncode == 1 and "missing.txt" in proc.stderr
    assert "Traceback" not in proc.stderr
