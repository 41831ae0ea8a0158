"""The ctypes bindings (edgemoe.ggml) on small graphs, against numpy.

The oracle for quantized weights is ggml's own round trip: numpy multiplies by the dequantized
weights (edgemoe.quant), and the graph by the quantized ones."""
from __future__ import annotations

import numpy as np
import pytest

from edgemoe import ggml, quant
from edgemoe.errors import EdgeMoeError
from edgemoe.ggml import GGMLType


@pytest.fixture(scope="module")
def backend():
    b = ggml.Backend(n_threads=1)
    yield b
    b.close()


def _weights(backend, tensors: dict[str, tuple[int, tuple, np.ndarray]]):
    """Backend tensors named like tensors' keys: (ggml type, ne, bytes)."""
    ctx = ggml.Context(len(tensors))
    ptrs = {name: ctx.new_tensor(t, ne, name) for name, (t, ne, _) in tensors.items()}
    buf = ggml.Buffer(ctx, backend.weights_buffer_type, "test weights")
    for name, (_, _, data) in tensors.items():
        ggml.tensor_set(ptrs[name], data)
    return ctx, buf, ptrs


def test_devices_and_backend(backend):
    kinds = {d["kind"] for d in ggml.list_devices()}
    assert "cpu" in kinds
    assert backend.device_name
    with pytest.raises(EdgeMoeError, match="not found"):
        ggml.Backend("no-such-device")


@pytest.mark.parametrize("qtype", [GGMLType.F32, GGMLType.Q8_0, GGMLType.Q4_K])
def test_mul_mat_id_selects_experts(backend, qtype):
    """out[:, j, t] = W[ids[j, t]] @ x[:, t] for 3-D expert weights, as the MoE FFN uses it."""
    rng = np.random.default_rng(0)
    n_embd, n_ff, n_slots, k, n_tokens = 256, 64, 6, 2, 5
    w = rng.standard_normal((n_slots, n_ff, n_embd)).astype(np.float32)  # numpy order of ne
    raw = quant.quantize(w, qtype)
    w_ref = quant.dequantize(raw, qtype, w.shape)
    x = rng.standard_normal((n_tokens, n_embd)).astype(np.float32)
    ids = rng.integers(0, n_slots, (n_tokens, k)).astype(np.int32)

    wctx, wbuf, ptrs = _weights(backend, {"exps": (qtype, (n_embd, n_ff, n_slots), raw)})
    ctx = ggml.Context(16, graph_size=16)
    o = ggml.Ops(ctx)
    xt = o.input(GGMLType.F32, (n_embd, 1, n_tokens), "x")
    it = o.input(GGMLType.I32, (k, n_tokens), "ids")
    out = o.output(o.mul_mat_id(ptrs["exps"], xt, it))  # (n_ff, k, n_tokens)
    gf = ctx.new_graph()
    ggml.lib.ggml_build_forward_expand(gf, out)
    sched = ggml.Scheduler(backend, 64)
    sched.alloc(gf)
    ggml.tensor_set(xt, x)
    ggml.tensor_set(it, ids)
    sched.compute(gf)
    got = ggml.tensor_get(out, np.empty((n_tokens, k, n_ff), np.float32))
    want = np.einsum("tjfe,te->tjf", w_ref[ids], x)
    # ggml quantizes the activations too for Q8_0/Q4_K (to Q8_0/Q8_K): allow that rounding.
    tol = 1e-5 if qtype == GGMLType.F32 else 2e-2
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    sched.close()
    wbuf.close()
    wctx.close()
    ctx.close()


def test_scheduler_reuses_its_buffers_across_graphs(backend):
    """Two graphs of different sizes, computed alternately on one scheduler, stay correct."""
    sched = ggml.Scheduler(backend, 64)
    rng = np.random.default_rng(1)
    graphs = []
    for n in (3, 17):
        ctx = ggml.Context(16, graph_size=16)
        o = ggml.Ops(ctx)
        a = o.input(GGMLType.F32, (8, n), "a")
        y = o.output(o.scale(o.soft_max(a), 2.0))
        gf = ctx.new_graph()
        ggml.lib.ggml_build_forward_expand(gf, y)
        graphs.append((ctx, gf, a, y, n))
    sched.reserve(graphs[1][1])
    before = sched.buffer_bytes()
    for _ in range(2):
        for ctx, gf, a, y, n in graphs:
            x = rng.standard_normal((n, 8)).astype(np.float32)
            sched.alloc(gf)
            ggml.tensor_set(a, x)
            sched.compute(gf)
            e = np.exp(x - x.max(1, keepdims=True))
            want = 2 * e / e.sum(1, keepdims=True)
            assert np.allclose(ggml.tensor_get(y, np.empty((n, 8), np.float32)), want, atol=1e-6)
    assert sched.buffer_bytes() == before  # reserved for the larger graph, never grown
    sched.close()
    for ctx, *_ in graphs:
        ctx.close()


def test_profile_callback_sees_every_node(backend):
    sched = ggml.Scheduler(backend, 64)
    ctx = ggml.Context(16, graph_size=16)
    o = ggml.Ops(ctx)
    a = o.input(GGMLType.F32, (4, 2), "a")
    y = o.output(o.sqrt(o.sum_rows(o.sqr(a))))  # row norms
    gf = ctx.new_graph()
    ggml.lib.ggml_build_forward_expand(gf, y)
    seen = []
    sched.profile(seen.append)
    sched.alloc(gf)
    ggml.tensor_set(a, np.array([[3, 4, 0, 0], [1, 0, 0, 0]], np.float32))
    sched.compute(gf)
    sched.profile(None)
    assert seen == ["SQR", "SUM_ROWS", "SQRT"]
    assert np.allclose(ggml.tensor_get(y, np.empty(2, np.float32)), [5.0, 1.0])
    sched.close()
    ctx.close()
