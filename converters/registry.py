"""Architecture converters, keyed by HF architecture name and by GGUF general.architecture.

Every module in converters/arch/ that defines `ARCH` is registered, so supporting a new model
family means adding one file there.
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from converters import arch as arch_pkg
from converters.arch.base import MoeArchitecture
from edgemoe.errors import UnsupportedArchitecture


@lru_cache(maxsize=None)
def architectures() -> tuple[MoeArchitecture, ...]:
    found = []
    for info in sorted(pkgutil.iter_modules(arch_pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{arch_pkg.__name__}.{info.name}")
        if isinstance(getattr(module, "ARCH", None), MoeArchitecture):
            found.append(module.ARCH)
    return tuple(found)


def supported() -> str:
    return ", ".join(f"{a.hf_architectures[0]} (GGUF {a.name})" for a in architectures())


def for_hf(hf_architectures: list[str] | str | None) -> MoeArchitecture:
    names = [hf_architectures] if isinstance(hf_architectures, str) else list(hf_architectures or [])
    for a in architectures():
        if any(n in a.hf_architectures for n in names):
            return a
    raise UnsupportedArchitecture(f"config.json: architecture {names or 'unset'} is not supported; "
                                  f"supported: {supported()}")


def for_gguf(general_architecture: str) -> MoeArchitecture:
    for a in architectures():
        if a.name == general_architecture:
            return a
    raise UnsupportedArchitecture(f"GGUF general.architecture '{general_architecture}' is not "
                                  f"supported; supported: {supported()}")
