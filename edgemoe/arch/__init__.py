"""Model graphs, one module per architecture named like its converter (converters/arch/), each
defining `MODEL`, a `Decoder` subclass; looked up by the GGUF `general.architecture` value
llama.cpp uses. A module dropped in here is found without being listed."""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from edgemoe.arch.common import Decoder
from edgemoe.errors import UnsupportedArchitecture


@lru_cache(maxsize=None)
def models() -> dict[str, type[Decoder]]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        model = getattr(module, "MODEL", None)
        if isinstance(model, type) and issubclass(model, Decoder):
            found[model.name] = model
    return found


def get(name: str) -> type[Decoder]:
    """The graph of a GGUF architecture, or UnsupportedArchitecture listing the supported ones."""
    try:
        return models()[name]
    except KeyError:
        supported = ", ".join(f"{n} ({'/'.join(m.hf_names)})" for n, m in sorted(models().items()))
        raise UnsupportedArchitecture(
            f"architecture {name!r} has no edgemoe graph; supported: {supported}") from None
