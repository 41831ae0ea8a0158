"""Hyper-parameters as GGUF metadata: one table per architecture, for the converter and runtime.

A `Param` names a GGUF key (a gguf.Keys template; `{arch}` becomes general.architecture), the
config.json field it comes from, and the `HParams` field it fills. An architecture's graph module
(edgemoe/arch/<model>.py) owns its table (`Decoder.params()`); the converter writes base.gguf's
metadata from config.json through it (`from_config`), and every reader, the runtime on base.gguf
and the converter on a stock GGUF or on its own translation of config.json, reads the same keys
back through it (`read`). So each key is spelled once, by gguf-py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from gguf import GGUFValueType

from edgemoe.errors import ConvertError

REQUIRED = object()

# Where a key's value comes from in config.json: a field name, alternatives (the first one set
# wins: HF renamed fields over time), a function of the whole config (None: not written), or
# None: llama.cpp's converter never writes it from config.json (it is only read).
Source = str | tuple[str, ...] | Callable[[dict], Any] | None

VALUE_TYPES = {int: GGUFValueType.UINT32, float: GGUFValueType.FLOAT32,
               bool: GGUFValueType.BOOL, str: GGUFValueType.STRING}


@dataclass(frozen=True)
class Param:
    key: str                       # gguf.Keys template, e.g. Keys.LLM.EXPERT_COUNT
    field: str | None = None       # HParams field it fills; None: written for llama.cpp only
    hf: Source = None
    kind: type = int
    # When the GGUF (or config.json) lacks it: a value, a function of the fields read before it,
    # or REQUIRED (an error naming the key or the config fields).
    default: Any = REQUIRED

    def from_config(self, config: dict) -> Any:
        if self.hf is None:
            return None
        if callable(self.hf):
            value = self.hf(config)
        else:
            names = (self.hf,) if isinstance(self.hf, str) else self.hf
            value = next((config[n] for n in names if config.get(n) is not None), None)
            if value is None and self.default is REQUIRED:
                raise ConvertError(f"config.json: none of {', '.join(names)} is set "
                                   f"(GGUF {self.key.format(arch='<arch>')})")
        return None if value is None else self.kind(value)


def table(*params: Param) -> dict[str, Param]:
    """Params keyed by their GGUF key, so that a model's table can replace or drop entries."""
    return {p.key: p for p in params}


def from_config(params: dict[str, Param], arch: str, config: dict) -> dict[str, Any]:
    """The GGUF metadata (full key -> value) a config.json gives through `params`."""
    out = {}
    for p in params.values():
        value = p.from_config(config)
        if value is not None:
            out[p.key.format(arch=arch)] = value
    return out


def value_type(value: Any) -> GGUFValueType:
    return VALUE_TYPES[type(value)]


def read(params: dict[str, Param], get: Callable[[str, Any, type], Any]) -> dict[str, Any]:
    """The fields of `params`, each from `get(key template, default or None if required, kind)`."""
    values: dict[str, Any] = {}
    for p in params.values():
        if p.field is None:
            continue
        default = (None if p.default is REQUIRED
                   else p.default(values) if callable(p.default) else p.default)
        values[p.field] = get(p.key, default, p.kind)
    return values


def dict_getter(kv: dict[str, Any], arch: str, where: str) -> Callable[[str, Any, type], Any]:
    """`get` over metadata already in a dict (a stock GGUF's fields, or from_config's output)."""
    def get(key: str, default: Any = None, kind: type | None = None) -> Any:
        name = key.format(arch=arch)
        if name not in kv:
            if default is None:
                raise ConvertError(f"{where}: metadata key {name} missing")
            return default
        try:
            return kind(kv[name]) if kind is not None else kv[name]
        except (TypeError, ValueError):
            raise ConvertError(f"{where}: metadata key {name} = {kv[name]!r} is not "
                               f"{getattr(kind, '__name__', kind)}") from None
    return get


# ---- config.json's RoPE scaling, which several keys read ---------------------------------------

def rope_scaling(config: dict) -> dict:
    """config.json's RoPE scaling (rope_parameters, or the older rope_scaling), with its kind
    under rope_type ("default" when there is none)."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    return {**scaling, "rope_type": scaling.get("rope_type", scaling.get("type")) or "default"}


def rope_theta(config: dict) -> float:
    return (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta",
                                                                              10000.0))


def rope_scaled(kind: str, field: str) -> Callable[[dict], Any]:
    """A field of config.json's RoPE scaling, when its kind is `kind` ("" for any but default)."""
    def value(config: dict) -> Any:
        scaling = rope_scaling(config)
        if scaling["rope_type"] == "default" or kind and scaling["rope_type"] != kind:
            return None
        return scaling.get(field)
    return value


# edgemoe's own key: the layers that have routed experts (a DeepSeek dense lead has none).
EXPERT_LAYERS_KEY = "edgemoe.expert_layers"
