"""edgemoe.quant: ggml's own quantization through ctypes, checked against independent numpy math."""
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES

from edgemoe import quant
from edgemoe.errors import EdgeMoeError
from edgemoe.quant import GGMLType


@pytest.fixture(scope="module")
def x():
    # (rows, n_per_row): 256-element rows fit every block size.
    return np.random.default_rng(0).standard_normal((96, 512)).astype(np.float32)


def test_type_names_are_case_insensitive_and_errors_list_supported():
    assert quant.parse_type("q4_k") is GGMLType.Q4_K
    assert quant.parse_type(" Q8_0 ") is GGMLType.Q8_0
    assert quant.parse_type("bf16") is GGMLType.BF16
    with pytest.raises(EdgeMoeError, match=r"unsupported tensor type 'Q9_X'.*Q4_K"):
        quant.parse_type("Q9_X")
    with pytest.raises(EdgeMoeError, match="iq2_xxs"):  # needs an importance matrix
        quant.parse_type("iq2_xxs")


@pytest.mark.parametrize("t", quant.SUPPORTED, ids=lambda t: t.name)
def test_round_trip_size_and_error(x, t):
    q = quant.quantize(x, t)
    block, size = GGML_QUANT_SIZES[t]
    assert q.dtype == np.uint8 and q.size == x.size // block * size
    assert q.size == quant.nbytes(t, x.shape)
    y = quant.dequantize(q, t, x.shape)
    assert y.shape == x.shape and y.dtype == np.float32
    # Relative RMS error of each family on Gaussian data (generous bounds; Q2_K is ~2 bits).
    bound = {"F32": 0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 1e-2, "Q6_K": 3e-2, "Q5_K": 6e-2,
             "Q5_0": 8e-2, "Q5_1": 8e-2, "Q4_K": 0.12, "Q4_0": 0.15, "Q4_1": 0.15, "Q3_K": 0.25,
             "Q2_K": 0.5, "MXFP4": 0.15}[t.name]
    rel = np.sqrt(np.mean((x - y) ** 2) / np.mean(x ** 2))
    assert rel <= bound, f"{t.name}: relative RMS error {rel}"


def test_f16_and_bf16_match_numpy_rounding(x):
    f16 = quant.quantize(x, GGMLType.F16).view(np.float16).reshape(x.shape)
    np.testing.assert_array_equal(f16, x.astype(np.float16))
    # bfloat16 by round-to-nearest-even on the high 16 bits of the float32 pattern.
    u = x.view(np.uint32)
    expected = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(quant.quantize(x, GGMLType.BF16).view(np.uint16),
                                  expected.reshape(-1))


def test_q8_0_matches_reference_formula(x):
    # Q8_0: blocks of 32, scale d = max|x| / 127 stored as fp16, q = round(x / d).
    q = quant.quantize(x, GGMLType.Q8_0).reshape(-1, 34)
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / 127
    np.testing.assert_array_equal(q[:, :2].copy().view(np.float16)[:, 0], d.astype(np.float16))
    inv = np.where(d > 0, 1 / d, 0)
    ref_q = np.round(blocks * inv[:, None]).astype(np.int8)
    got_q = q[:, 2:].view(np.int8)
    # ggml rounds halves away from zero, numpy to even: allow a one-step difference on ties only.
    assert np.abs(got_q.astype(int) - ref_q).max() <= 1
    assert np.mean(got_q != ref_q) < 1e-3


def test_threaded_chunks_equal_whole_rows():
    big = np.random.default_rng(1).standard_normal((1024, 256)).astype(np.float32)
    whole = quant.quantize(big, GGMLType.Q4_K)
    per_row = np.concatenate([quant.quantize(big[i:i + 1], GGMLType.Q4_K) for i in range(0, 1024)])
    np.testing.assert_array_equal(whole, per_row)


def test_fallback_rule():
    assert quant.choose_type(GGMLType.Q4_K, 512) == (GGMLType.Q4_K, None)
    used, why = quant.choose_type(GGMLType.Q4_K, 64)
    assert used is GGMLType.Q5_0 and "64" in why and "256" in why
    assert quant.choose_type(GGMLType.Q6_K, 96)[0] is GGMLType.Q8_0
    assert quant.choose_type(GGMLType.Q8_0, 48)[0] is GGMLType.F16
    assert quant.choose_type(GGMLType.Q4_K, 48)[0] is GGMLType.F16


def test_size_errors_are_clear():
    with pytest.raises(EdgeMoeError, match="needs 34 bytes, got 33"):
        quant.dequantize(np.zeros(33, np.uint8), GGMLType.Q8_0, (32,))
    with pytest.raises(EdgeMoeError, match="row of 48 elements is not a multiple of the Q8_0"):
        quant.quantize(np.zeros((2, 48), np.float32), GGMLType.Q8_0)
