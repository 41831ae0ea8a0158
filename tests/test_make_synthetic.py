"""scripts/make_synthetic.py writes what save_pretrained writes, streaming, with numpy only."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import edge_emulate  # noqa: E402
import make_synthetic as ms  # noqa: E402

TINY = dict(n_layer=2, n_expert=4, n_expert_used=2, n_embd=256, n_ff_exp=256, n_vocab=512)


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of one safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}


def _headers(directory: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: v for path in sorted(directory.glob("*.safetensors")) for k, v in _header(path).items()}


@pytest.fixture(scope="module", params=sorted(ms.ARCHS))
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    arch = request.param
    out = tmp_path_factory.mktemp(f"synth_{arch}")
    ms.make_synthetic(out, ms.SynthSpec(arch=arch, **TINY), shard_bytes=1 << 20)
    return arch, out


def test_loads_in_transformers_without_missing_or_unexpected_keys(tiny):
    import torch
    import transformers

    arch, out = tiny
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32)
    assert type(model).__name__ == ms.ARCHS[arch].hf_class
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    with torch.no_grad():
        logits = model(torch.arange(8)[None]).logits  # (1, 8, n_vocab)
    assert torch.isfinite(logits).all() and 0.3 < float(logits.std()) < 3.0


def test_names_and_shapes_equal_save_pretrained(tiny, tmp_path):
    """A model built by transformers from our config.json saves exactly our tensors."""
    import torch
    import transformers

    _, out = tiny
    config = transformers.AutoConfig.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert _headers(out) == _headers(tmp_path)


def test_index_and_shards(tiny):
    _, out = tiny
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    total = 0
    for name in shards:
        for tensor, (dtype, shape) in _header(out / name).items():
            assert index["weight_map"][tensor] == name and dtype == "BF16"
            total += math.prod(shape) * 2
    assert index["metadata"]["total_size"] == total == ms.SynthSpec(arch=tiny[0], **TINY).nbytes()


def test_bf16_is_float32_rounded_to_nearest_even(tmp_path):
    import torch
    from safetensors.torch import load_file

    spec = ms.SynthSpec(**{**TINY, "n_layer": 1})
    ms.make_synthetic(tmp_path / "f32", replace(spec, dtype="f32"))
    ms.make_synthetic(tmp_path / "bf16", spec)
    (f32_file,) = (tmp_path / "f32").glob("*.safetensors")
    (bf16_file,) = (tmp_path / "bf16").glob("*.safetensors")
    f32, bf16 = load_file(f32_file), load_file(bf16_file)
    assert f32.keys() == bf16.keys()
    for name, t in f32.items():
        assert torch.equal(t.to(torch.bfloat16), bf16[name]), name


def test_weight_scales():
    """Projections ~ N(0, 1/fan_in), norms all ones: a forward pass stays in range."""
    spec = ms.SynthSpec(**TINY)
    stds = {name: std for name, _, std in spec.tensors()}
    assert stds["model.layers.0.mlp.experts.3.down_proj.weight"] == pytest.approx(256 ** -0.5)
    assert stds["model.layers.1.post_attention_layernorm.weight"] == 0.0
    pools = ms._Pools(np.random.default_rng(0), "f32")

    class Sink(list):
        write = list.append
    sink = Sink()
    pools.write(sink, (256, 1024), 0.05)
    x = np.frombuffer(b"".join(bytes(m) for m in sink), "<f4")
    assert x.size == 256 * 1024 and abs(x.std() - 0.05) < 0.002 and abs(x.mean()) < 0.002


def test_plan_picks_aligned_dimensions_of_at_least_the_target():
    base = ms.SynthSpec()
    spec = ms.plan(2 * 10**9, base, fixed=set())
    assert spec.nbytes() >= 2 * 10**9
    assert spec.n_embd % 256 == 0 and spec.n_ff_exp % 256 == 0
    assert (spec.n_layer, spec.n_expert, spec.n_expert_used) == (16, 32, 4)
    # The next smaller expert width falls short: the plan is the smallest at that hidden size.
    if spec.n_ff_exp > 256:
        assert replace(spec, n_ff_exp=spec.n_ff_exp - 256).nbytes() < 2 * 10**9
    kept = ms.plan(10**9, replace(base, n_embd=768), fixed={"n_embd"})
    assert kept.n_embd == 768 and kept.nbytes() >= 10**9
    # Sized by quantized expert bytes, as the runtime benchmarks need (>= 1 GB of Q4_K experts).
    q = ms.plan(10**9, base, fixed=set(), measure=lambda s: s.expert_nbytes("q4_k"))
    n_weights = q.n_layer * q.n_expert * 3 * q.n_embd * q.n_ff_exp
    assert q.expert_nbytes("Q4_K") == n_weights // 256 * 144 >= 10**9
    assert q.expert_nbytes() == n_weights * 2
    with pytest.raises(ValueError, match="no dimensions reach"):
        ms.plan(10**12, replace(base, n_embd=512, n_ff_exp=256), fixed={"n_embd", "n_ff_exp"})


def test_streaming_keeps_memory_flat(tmp_path):
    """A 600 MB checkpoint is written with far less RAM than its size."""
    res = edge_emulate.run_limited(
        [sys.executable, str(SCRIPTS / "make_synthetic.py"), str(tmp_path / "big"),
         "--size", "600MB", "--layers", "4", "--experts", "8", "--top-k", "2"],
        capture=True, timeout=300)
    assert res.rc == 0, res.stderr
    written = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    assert written >= 600 * 10**6
    assert res.peak_rss_bytes < 250 * 2**20, f"peak RSS {res.peak_rss_bytes / 2**20:.0f} MiB"


def test_cli_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "make_synthetic.py"), str(tmp_path),
                           "--layers", "1", "--experts", "2", "--top-k", "1", "--hidden", "256",
                           "--ffn", "256", "--vocab", "512"], capture_output=True, text=True)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_bench_reads_the_sizes_the_limit_is_computed_from(tiny):
    """bench_convert_memory's limit (2 x largest tensor + 400 MB) rests on these two figures."""
    import bench_convert_memory

    arch, out = tiny
    total, largest, name = bench_convert_memory.checkpoint_sizes(out)
    spec = ms.SynthSpec(arch=arch, **TINY)
    assert total == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert total > spec.nbytes()  # headers on top of the tensor bytes
    assert largest == spec.largest_tensor_nbytes() == 512 * 256 * 2
    assert name in ("model.embed_tokens.weight", "lm_head.weight")


def _layer0_selection_shares(directory: Path, n_expert: int, top_k: int) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.randint(0, 384, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids, output_router_logits=True).router_logits[0].reshape(-1, n_expert)
    chosen = logits.topk(top_k, dim=-1).indices.numpy()  # (n_tokens, top_k)
    return np.bincount(chosen.ravel(), minlength=n_expert) / chosen.size  # (n_expert,)


def test_routing_skew_gives_lasting_popularity(tmp_path):
    """Random routers pick experts almost uniformly; --routing-skew makes a few experts popular."""
    base = ms.SynthSpec(**{**TINY, "n_expert": 16})
    skewed = replace(base, routing_skew=1.0)
    ms.make_synthetic(tmp_path / "flat", base)
    ms.make_synthetic(tmp_path / "skewed", skewed)
    flat = _layer0_selection_shares(tmp_path / "flat", 16, 2)
    shares = _layer0_selection_shares(tmp_path / "skewed", 16, 2)
    top4 = lambda s: np.sort(s)[::-1][:4].sum()  # noqa: E731
    assert top4(shares) > top4(flat) + 0.2, (top4(flat), top4(shares))
