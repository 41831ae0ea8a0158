"""A stock llama.cpp GGUF (single file or split -0000k-of-0000N) as a conversion source.

Its routed experts are fused 3-D tensors blk.{L}.ffn_{gate,up,down}_exps with ggml shape
(n_embd or n_ff, rows, n_expert): expert e is the e-th contiguous 1/n_expert of the bytes, so we
slice them into shards byte for byte, whatever the quantization type, and copy every other
tensor and every metadata key (tokenizer included) into the base GGUF unchanged.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterator

from gguf import (GGUFReader, GGUFValueType, GGUFWriter, Keys, MODEL_TENSOR,
                  GGMLQuantizationType)

from converters import registry
from converters.arch.base import tensor_name
from converters.plan import Plan, fingerprint
from converters.writer import (OutFile, OutTensor, add_edgemoe_base_keys,
                               expert_out_file)
from edgemoe.errors import ConvertError
from edgemoe.shardset import (BASE_FILE, EXPERT_BIASES, EXPERT_TENSORS, expert_file,
                              expert_tensor_name)

_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$")
# Bytes copied per write when streaming tensor data out of the memory map.
COPY_BLOCK = 32 << 20
# Keys that describe a file rather than the model; the writer sets its own.
_FILE_KEYS = (Keys.General.ARCHITECTURE, Keys.General.ALIGNMENT)
# The fused tensor holding all experts of a layer, per expert projection.
FUSED_EXPERTS = {"ffn_gate": MODEL_TENSOR.FFN_GATE_EXP, "ffn_up": MODEL_TENSOR.FFN_UP_EXP,
          "ffn_down": MODEL_TENSOR.FFN_DOWN_EXP}


def split_parts(path: Path) -> list[Path]:
    """All files of a (possibly split) GGUF, in order."""
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    parts = [path.with_name(f"{m['stem']}-{k:05d}-of-{n:05d}.gguf") for k in range(1, n + 1)]
    missing = [p for p in parts if not p.is_file()]
    if missing:
        raise ConvertError(f"{missing[0]}: missing part {parts.index(missing[0]) + 1} of {n} "
                           f"of split GGUF {path.name}")
    return parts


def open_gguf(path: Path) -> GGUFReader:
    """GGUFReader with every failure (bad magic, truncation, bad offsets) as a ConvertError."""
    from edgemoe.gguf_header import gguf_reader

    reader = gguf_reader(path, ConvertError)  # the header bounded before gguf-py reads it
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ConvertError(f"{path}: truncated: tensor {t.name} needs bytes "
                               f"[{t.data_offset}, {t.data_offset + t.n_bytes}) of a "
                               f"{size}-byte file")
    return reader


def scalar_fields(reader: GGUFReader) -> dict:
    """Scalar and string metadata as Python values (arrays such as the vocabulary are skipped:
    hyper-parameters are scalars, and decoding 100k tokens here would be wasted time)."""
    return {name: f.contents() for name, f in reader.fields.items()
            if not name.startswith("GGUF.") and f.types and f.types[0] != GGUFValueType.ARRAY}


def copy_metadata(reader: GGUFReader, w: GGUFWriter, skip: Callable[[str], bool]) -> None:
    """Every key of `reader` not skipped, with its GGUF value type, into `w`."""
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in _FILE_KEYS or skip(name):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        if vtype == GGUFValueType.ARRAY and len(f.types) > 2:
            raise ConvertError(f"{reader.data.filename}: key {name} is a nested array, "
                               "which this converter does not copy")
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)


def byte_chunks(path: Path, start: int, stop: int) -> Iterator[bytes]:
    """Bytes [start, stop) of a file in COPY_BLOCK pieces. Read with pread rather than through
    GGUFReader's memory map, whose touched pages would stay in our resident set."""
    with open(path, "rb") as f:
        for first in range(start, stop, COPY_BLOCK):
            n = min(COPY_BLOCK, stop - first)
            block = os.pread(f.fileno(), n, first)
            if len(block) != n:
                raise ConvertError(f"{path}: truncated at byte {first + len(block)}")
            yield block


def numpy_shape(ne) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(list(ne)))


def plan_gguf(path: Path) -> Plan:
    parts = split_parts(Path(path))
    readers = [open_gguf(p) for p in parts]
    kv = scalar_fields(readers[0])
    general_arch = kv.get(Keys.General.ARCHITECTURE)
    if general_arch is None:
        raise ConvertError(f"{parts[0]}: GGUF metadata key {Keys.General.ARCHITECTURE} missing")
    arch = registry.for_gguf(general_arch)
    tensors = {}
    for r in readers:
        for t in r.tensors:
            if t.name in tensors:
                raise ConvertError(f"{r.data.filename}: tensor {t.name} appears twice in the split")
            tensors[t.name] = (r, t)
    shapes = {name: numpy_shape(t.shape) for name, (_, t) in tensors.items()}
    n_layer = int(kv.get(Keys.LLM.BLOCK_COUNT.format(arch=arch.name), 0))
    gate_up = [n for n in (tensor_name(MODEL_TENSOR.FFN_GATE_UP_EXP, l) for l in range(n_layer))
               if n in tensors]
    if gate_up:
        raise ConvertError(f"{parts[0]}: tensor {gate_up[0]} (gate and up fused together) is not "
                           "supported; convert from the HF checkpoint instead")
    hp = arch.hparams_from_gguf(kv, shapes, str(parts[0]))

    expert_names = set()
    experts: list[OutFile] = []
    expert_types = set()
    # Expert biases (gpt-oss) travel with their experts.
    biased = tensor_name(FUSED_EXPERTS["ffn_gate"], hp.expert_layers[0], "bias") in tensors
    keys = EXPERT_TENSORS + EXPERT_BIASES if biased else EXPERT_TENSORS
    for layer in hp.expert_layers:
        fused = {}
        for proj in keys:
            kind, _, suffix = proj.partition(".")
            name = tensor_name(FUSED_EXPERTS[kind], layer, suffix or "weight")
            if name not in tensors:
                raise ConvertError(f"{parts[0]}: tensor {name} missing (layer {layer} has "
                                   f"{tensor_name(FUSED_EXPERTS['ffn_gate'], layer)})")
            r, t = tensors[name]
            shape = shapes[name]
            dims = 2 if suffix else 3
            if len(shape) != dims or shape[0] != hp.n_expert or t.n_bytes % hp.n_expert:
                raise ConvertError(f"{r.data.filename}: tensor {name} has shape {list(shape)}, "
                                   f"expected {hp.n_expert} experts on its outer axis")
            fused[proj] = (r, t, shape)
            expert_names.add(name)
        for e in range(hp.n_expert):
            outs = []
            for proj in keys:
                r, t, shape = fused[proj]
                per = t.n_bytes // hp.n_expert
                start = t.data_offset + e * per
                outs.append(OutTensor(
                    name=expert_tensor_name(layer, e, proj), shape=shape[1:],
                    type=GGMLQuantizationType(t.tensor_type), nbytes=per,
                    chunks=lambda r=r, s=start, n=per: byte_chunks(Path(r.data.filename), s,
                                                                   s + n)))
                if proj in EXPERT_TENSORS:
                    expert_types.add(GGMLQuantizationType(t.tensor_type).name)
            experts.append(expert_out_file(expert_file(layer, e), layer, e, outs))

    base_tensors = []
    dense_types: dict[str, int] = {}
    for name, (r, t) in tensors.items():
        if name in expert_names:
            continue
        ttype = GGMLQuantizationType(t.tensor_type)
        if len(shapes[name]) > 1:
            dense_types[ttype.name] = dense_types.get(ttype.name, 0) + 1
        base_tensors.append(OutTensor(
            name=name, shape=shapes[name], type=ttype, nbytes=int(t.n_bytes),
            chunks=lambda r=r, t=t: byte_chunks(Path(r.data.filename), t.data_offset,
                                                t.data_offset + t.n_bytes)))
    # Types are kept, not chosen: report what the source uses.
    expert_type = "/".join(sorted(expert_types))
    dense_type = max(dense_types, key=dense_types.get) if dense_types else "F32"

    def base_metadata(w: GGUFWriter) -> None:
        copy_metadata(readers[0], w, skip=lambda k: k.startswith(("split.", "edgemoe.")))
        add_edgemoe_base_keys(w, expert_type, dense_type, hp.expert_layers)

    base = OutFile(rel=BASE_FILE, arch=arch.name, metadata=base_metadata,
                   tensors=tuple(base_tensors))
    return Plan(
        source={"kind": "gguf", "path": str(parts[0].resolve()), "hf_architecture": None},
        arch=arch.name, hp=hp, expert_type=expert_type, dense_type=dense_type, base=base,
        experts=tuple(experts), fallbacks=(),
        fingerprint=fingerprint(parts, {"kind": "gguf"}))
