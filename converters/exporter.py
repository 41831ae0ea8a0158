"""Reassemble a shard set into one stock GGUF that unmodified llama.cpp loads.

The base GGUF's metadata and tensors are copied as they are (edgemoe.* keys dropped) and each
layer's experts are concatenated back into the fused blk.{L}.ffn_{gate,up,down}_exps tensors:
expert e's bytes become the e-th slice along the outermost ggml axis.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from gguf import GGMLQuantizationType, GGUFWriter

from converters.arch.base import tensor_name
from converters.gguf_source import (FUSED_EXPERTS, byte_chunks, copy_metadata, numpy_shape,
                                    open_gguf)
from converters.writer import OutFile, OutTensor, Progress, write_gguf
from edgemoe.errors import ShardSetError
from edgemoe.quant import parse_type
from edgemoe.shardset import ExpertShard, ShardSet



def _expert_bytes(shards: list[ExpertShard], proj: str) -> Iterator[bytes]:
    for shard in shards:
        info = shard.tensors[proj]
        yield from byte_chunks(shard.path, info.offset, info.offset + info.nbytes)


def _fused(ss: ShardSet, layer: int, proj: str) -> OutTensor:
    shards = [ss.expert(layer, e) for e in range(ss.n_expert)]
    infos = [s.tensors[proj] for s in shards]
    kinds = {(i.type, tuple(i.ne)) for i in infos}
    if len(kinds) != 1:
        raise ShardSetError(f"{ss.root}: layer {layer} {proj} differs across experts "
                            f"({sorted(kinds)}); a fused tensor needs one type and shape")
    type_name, ne = kinds.pop()
    name, _, suffix = proj.partition(".")
    return OutTensor(name=tensor_name(FUSED_EXPERTS[name], layer, suffix or "weight"),
                     shape=(ss.n_expert, *reversed(ne)), type=parse_type(type_name),
                     nbytes=sum(i.nbytes for i in infos),
                     chunks=lambda: _expert_bytes(shards, proj))


def export_gguf(shards: Path, out_gguf: Path, progress: bool = False) -> Path:
    ss = ShardSet.open(shards)
    reader = open_gguf(ss.base_path)
    tensors = [OutTensor(name=t.name, shape=numpy_shape(t.shape),
                         type=GGMLQuantizationType(t.tensor_type), nbytes=int(t.n_bytes),
                         chunks=lambda t=t: byte_chunks(ss.base_path, t.data_offset,
                                                        t.data_offset + t.n_bytes))
               for t in reader.tensors]
    tensors += [_fused(ss, layer, proj) for layer in ss.expert_layers
                for proj in ss.expert_tensors]

    def metadata(w: GGUFWriter) -> None:
        copy_metadata(reader, w, skip=lambda k: k.startswith("edgemoe."))

    out = OutFile(rel=out_gguf.name, arch=ss.arch, metadata=metadata, tensors=tuple(tensors))
    bar = Progress(out.data_bytes, enabled=progress)
    try:
        write_gguf(out_gguf, out, bar)
    finally:
        bar.close()
    return out_gguf
