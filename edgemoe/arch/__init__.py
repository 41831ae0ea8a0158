"""Model graphs, keyed by the GGUF `general.architecture` value llama.cpp uses.

Each module declares an `ArchSpec` (what differs from the shared pieces in arch.common) as SPEC.
"""
from __future__ import annotations

from edgemoe.arch import granitemoe, llama, olmoe, qwen2moe, qwen3moe
from edgemoe.arch.common import ArchSpec
from edgemoe.errors import UnsupportedArchitecture

REGISTRY: dict[str, ArchSpec] = {m.SPEC.name: m.SPEC for m in (llama, qwen2moe, qwen3moe, olmoe,
                                                     granitemoe)}


def get(name: str) -> ArchSpec:
    """The spec of a GGUF architecture, or UnsupportedArchitecture listing the supported ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        supported = ", ".join(f"{n} ({'/'.join(s.hf_names)})" for n, s in sorted(REGISTRY.items()))
        raise UnsupportedArchitecture(
            f"architecture {name!r} has no edgemoe graph; supported: {supported}") from None
