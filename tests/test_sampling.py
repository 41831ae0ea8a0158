"""Sampling: llama.cpp's own sampler chain (libllama, bound here with ctypes) is the oracle for
the penalty and the top_k/top_p/min_p filters; the final draw is checked statistically."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from edgemoe import _lib
from edgemoe.sampling import (
    GREEDY,
    Sampler,
    SamplingParams,
    apply_repeat_penalty,
    min_p,
    top_k,
    top_p,
)


# --------------------------------------------------------------- llama.cpp as the oracle --

class _TokenData(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int32), ("logit", ctypes.c_float), ("p", ctypes.c_float)]


class _TokenDataArray(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.POINTER(_TokenData)),
        ("size", ctypes.c_size_t),
        ("selected", ctypes.c_int64),
        ("sorted", ctypes.c_bool),
    ]


@pytest.fixture(scope="module")
def llama_chain():
    lib = _lib.llama()
    lib.llama_sampler_chain_init.restype = ctypes.c_void_p
    # by value: struct llama_sampler_chain_params { bool no_perf; }, passed like a lone bool
    lib.llama_sampler_chain_init.argtypes = [ctypes.c_bool]
    lib.llama_sampler_chain_add.restype = None
    lib.llama_sampler_chain_add.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.llama_sampler_init_top_k.restype = ctypes.c_void_p
    lib.llama_sampler_init_top_k.argtypes = [ctypes.c_int32]
    lib.llama_sampler_init_top_p.restype = ctypes.c_void_p
    lib.llama_sampler_init_top_p.argtypes = [ctypes.c_float, ctypes.c_size_t]
    lib.llama_sampler_init_min_p.restype = ctypes.c_void_p
    lib.llama_sampler_init_min_p.argtypes = [ctypes.c_float, ctypes.c_size_t]
    lib.llama_sampler_init_penalties.restype = ctypes.c_void_p
    # (n_vocab, penalty_last_n, penalty_repeat, penalty_freq, penalty_present)
    lib.llama_sampler_init_penalties.argtypes = [
        ctypes.c_int32, ctypes.c_int32, ctypes.c_float, ctypes.c_float, ctypes.c_float]
    lib.llama_sampler_accept.restype = None
    lib.llama_sampler_accept.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.llama_sampler_apply.restype = None
    lib.llama_sampler_apply.argtypes = [ctypes.c_void_p, ctypes.POINTER(_TokenDataArray)]
    lib.llama_sampler_free.restype = None
    lib.llama_sampler_free.argtypes = [ctypes.c_void_p]

    def run(params: SamplingParams, logits: np.ndarray, history: list[int]):
        """Candidates (ids, logits) after llama.cpp's penalties -> top_k -> top_p -> min_p."""
        chain = lib.llama_sampler_chain_init(True)
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(
            logits.size, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(params.top_k))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(params.min_p, 1))
        for token in history:
            lib.llama_sampler_accept(chain, token)
        data = (_TokenData * logits.size)(*[(i, float(x), 0.0) for i, x in enumerate(logits)])
        cur = _TokenDataArray(data, logits.size, -1, False)
        lib.llama_sampler_apply(chain, ctypes.byref(cur))
        out = [(cur.data[i].id, cur.data[i].logit) for i in range(cur.size)]
        lib.llama_sampler_free(chain)
        return out

    return run


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),  # llama.cpp's defaults: top_k 40, top_p 0.95, min_p 0.05
        SamplingParams(top_k=0, top_p=0.9, min_p=0.0),
        SamplingParams(top_k=0, top_p=1.0, min_p=0.1),
        SamplingParams(top_k=7, top_p=1.0, min_p=0.0, repeat_penalty=1.3, repeat_last_n=16),
        SamplingParams(top_k=50, top_p=0.5, min_p=0.02, repeat_penalty=1.8, repeat_last_n=64),
    ],
)
def test_filters_match_llama_cpp(llama_chain, params):
    rng = np.random.default_rng(7)
    logits = (rng.normal(size=500) * 3).astype(np.float32)
    history = [int(t) for t in rng.integers(0, 500, size=80)]
    # Make the penalty matter: several top tokens are in the recent history.
    history[-5:] = [int(t) for t in np.argsort(-logits)[:5]]
    expected = llama_chain(params, logits, history)
    ids, got_logits = Sampler(params).candidates(logits, history)
    assert sorted(ids.tolist()) == sorted(i for i, _ in expected)
    ours = dict(zip(ids.tolist(), got_logits.tolist()))
    for token, logit in expected:
        assert ours[token] == pytest.approx(logit, rel=1e-6)


# ------------------------------------------------------------------------ the pieces --

def test_repeat_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -2.0, 1.0, 0.0], dtype=np.float32)
    apply_repeat_penalty(logits, [0, 1, 1, 1], 2.0)  # repeats count once
    assert logits.tolist() == [1.0, -4.0, 1.0, 0.0]


def test_repeat_penalty_only_covers_last_n():
    logits = np.zeros(4, dtype=np.float32)
    logits[0] = logits[1] = 5.0
    params = SamplingParams(temperature=0.0, repeat_penalty=10.0, repeat_last_n=2)
    # token 0 is older than the window, token 1 is inside: 1 drops to 0.5, 0 stays at 5.
    assert Sampler(params).sample(logits, history=[0, 2, 1]) == 0
    assert Sampler(params).sample(logits, history=[1, 2, 0]) == 1


def test_filters_on_a_known_distribution():
    ids = np.arange(5)
    logits = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05])).astype(np.float32)
    assert top_k(ids, logits, 2)[0].tolist() == [0, 1]
    assert top_k(ids, logits, 0)[0].tolist() == [0, 1, 2, 3, 4]
    assert top_p(ids, logits, 0.7)[0].tolist() == [0, 1]     # 0.4 + 0.3 reaches 0.7
    assert top_p(ids, logits, 0.71)[0].tolist() == [0, 1, 2]
    assert sorted(min_p(ids, logits, 0.3)[0].tolist()) == [0, 1, 2]  # p >= 0.12


def test_temperature_zero_is_greedy_and_ignores_seed():
    logits = np.random.default_rng(3).normal(size=1000).astype(np.float32)
    picks = {Sampler(SamplingParams(temperature=0.0, seed=s)).sample(logits) for s in range(5)}
    assert picks == {int(np.argmax(logits))}
    assert Sampler(GREEDY).sample(logits) == int(np.argmax(logits))


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = np.random.default_rng(4).normal(size=300).astype(np.float32)
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    a = Sampler(params)
    b = Sampler(params)
    run_a = [a.sample(logits) for _ in range(50)]
    run_b = [b.sample(logits) for _ in range(50)]
    assert run_a == run_b
    c = Sampler(SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=99))
    assert [c.sample(logits) for _ in range(50)] != run_a


def test_draw_follows_the_tempered_softmax():
    logits = np.array([1.0, 0.5, 0.0, -1.0], dtype=np.float32)
    temp = 0.7
    params = SamplingParams(temperature=temp, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    sampler = Sampler(params)
    n = 20000
    counts = np.bincount([sampler.sample(logits) for _ in range(n)], minlength=4)
    expected = np.exp(logits / temp) / np.exp(logits / temp).sum()
    # 5 standard deviations of a binomial count: fails only if the draw is biased.
    sigma = np.sqrt(n * expected * (1 - expected))
    assert np.all(np.abs(counts - n * expected) < 5 * sigma), (counts, n * expected)


def test_top_k_one_is_greedy_even_when_hot():
    logits = np.random.default_rng(5).normal(size=100).astype(np.float32)
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=1, seed=1))
    assert {sampler.sample(logits) for _ in range(20)} == {int(np.argmax(logits))}


@pytest.mark.parametrize(
    "kwargs",
    [dict(top_p=1.5), dict(min_p=-0.1), dict(repeat_penalty=0.0), dict(repeat_last_n=-2),
     dict(seed=-1), dict(temperature=float("nan"))],
)
def test_invalid_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampling_leaves_the_callers_logits_alone():
    logits = np.random.default_rng(6).normal(size=64).astype(np.float32)
    before = logits.copy()
    sampler = Sampler(SamplingParams(repeat_penalty=1.5, seed=0))
    sampler.sample(logits, history=list(range(64)))
    Sampler(SamplingParams(seed=0)).sample(logits)
    assert np.array_equal(logits, before)
