"""llama-cpp-python's `Llama`, the reference runner of the parity tests.

On this CPU (AMX_INT8, AVX512) llama.cpp 0.3.36 segfaults in decode when its extra weight buffer
types (AMX / repack) hold Q8_0 or Q4_0 matrices of our tiny shapes; a GGUF written by llama.cpp's
own quantizer crashes the same way. `Llama` does not expose `use_extra_bufts`, so the default
model parameters are patched while the model loads.
"""
from __future__ import annotations

import llama_cpp
import llama_cpp.llama_cpp as llama_capi
import pytest


def open_llama(path, **kwargs) -> llama_cpp.Llama:
    default = llama_capi.llama_model_default_params

    def without_extra_bufts():
        params = default()
        params.use_extra_bufts = False
        return params

    kwargs.setdefault("verbose", False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama_capi, "llama_model_default_params", without_extra_bufts)
        return llama_cpp.Llama(str(path), **kwargs)
