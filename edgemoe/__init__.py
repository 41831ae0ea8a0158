"""edgemoe: run Mixture-of-Experts GGUF models on machines whose memory is smaller than the model.

    import edgemoe
    with edgemoe.Model("shards/") as model:
        print(model.generate("Hello", max_tokens=16, temperature=0))

`Model` (edgemoe.api) loads the ggml libraries when first used, so importing edgemoe, its
errors or the converter stays cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from edgemoe.errors import (
    BudgetError,
    ContextOverflow,
    ConvertError,
    EdgeMoeError,
    ShardSetError,
    UnsupportedArchitecture,
)

__version__ = "0.1.0"

__all__ = [
    "Model",
    "SamplingParams",
    "EdgeMoeError",
    "ConvertError",
    "ShardSetError",
    "UnsupportedArchitecture",
    "BudgetError",
    "ContextOverflow",
]

if TYPE_CHECKING:
    from edgemoe.api import Model
    from edgemoe.sampling import SamplingParams


def __getattr__(name: str):
    if name == "Model":
        from edgemoe.api import Model

        return Model
    if name == "SamplingParams":
        from edgemoe.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'edgemoe' has no attribute {name!r}")
