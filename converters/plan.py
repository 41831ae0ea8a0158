"""A conversion plan: every output file and tensor, its type and size, before anything is written.

`plan_hf` builds one from a Hugging Face checkpoint directory, checking every tensor against
config.json first (missing, extra, shape, dtype) so bad input fails before any output exists.
converters.gguf_source builds the same structure from a stock GGUF. `Plan.table()` is what
`--dry-run` prints.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFWriter

from converters import registry
from converters.arch.base import (DENSE, EXPERT, EXPERT_F32, F32, HParams, MoeArchitecture,
                                  TensorSpec)
from converters.safetensors import SafetensorsCheckpoint, read_config
from converters.tokenizer import add_tokenizer
from converters.writer import (OutFile, OutTensor, add_edgemoe_base_keys,
                               expert_out_file)
from edgemoe import quant
from edgemoe.errors import ConvertError
from edgemoe.quant import GGMLType
from edgemoe.shardset import BASE_FILE, FORMAT_VERSION, expert_file, substitute_file

# Non-weight buffers some older checkpoints save (RoPE frequencies are recomputed by llama.cpp).
BUFFERS = (".rotary_emb.inv_freq",)

# float32 elements converted and quantized per step: bounds memory whatever the tensor size.
CHUNK_ELEMENTS = 8 << 20


@dataclass(frozen=True)
class Plan:
    source: dict                      # kind, path, hf_architecture
    arch: str                         # GGUF general.architecture
    hp: HParams
    expert_type: str
    dense_type: str
    base: OutFile
    experts: tuple[OutFile, ...]
    fallbacks: tuple[dict, ...]
    fingerprint: str                  # identifies source + settings, for --resume
    # Every expert again at a low-bit type (substitutes/), when asked for; see docs/FORMAT.md.
    substitute_type: str | None = None
    substitutes: tuple[OutFile, ...] = ()

    @property
    def total_bytes(self) -> int:
        return (self.base.data_bytes + sum(f.data_bytes for f in self.experts)
                + sum(f.data_bytes for f in self.substitutes))

    def table(self) -> str:
        """The plan as text: one row per base tensor, one per expert tensor kind, and totals."""
        rows = [("tensor", "shape", "type", "MB", "note")]
        notes = {f["tensor"]: f"fallback from {f['requested']}: {f['why']}" for f in self.fallbacks}
        for t in self.base.tensors:
            rows.append((t.name, "x".join(map(str, t.shape)), t.type.name, f"{t.nbytes / 1e6:.3f}",
                         notes.get(t.name, "")))
        if self.experts:
            n = len(self.experts)
            for i, proj_tensor in enumerate(self.experts[0].tensors):
                kinds = {f.tensors[i].type.name for f in self.experts}
                total = sum(f.tensors[i].nbytes for f in self.experts)
                proj = proj_tensor.name.split(".")[2]
                note = next((notes[f.tensors[i].name] for f in self.experts
                             if f.tensors[i].name in notes), "")
                rows.append((f"blk.*.{proj}.* ({n} experts)",
                             "x".join(map(str, proj_tensor.shape)), "/".join(sorted(kinds)),
                             f"{total / 1e6:.3f}", note))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = ["  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4] for r in rows]
        expert_bytes = sum(f.data_bytes for f in self.experts)
        lines += [
            "",
            f"source: {self.source['kind']} {self.source['path']} -> {self.arch}, "
            f"{self.hp.n_layer} layers, {self.hp.n_expert} experts (top-{self.hp.n_expert_used})",
            f"{BASE_FILE}: {self.base.data_bytes / 1e6:.2f} MB of tensors; "
            f"{len(self.experts)} expert shards: {expert_bytes / 1e6:.2f} MB "
            f"({expert_bytes / max(len(self.experts), 1) / 1e6:.3f} MB each); "
            f"total {self.total_bytes / 1e6:.2f} MB",
            f"{len(self.fallbacks)} tensor(s) use a fallback type",
        ]
        if self.substitutes:
            lines.insert(-1, f"{len(self.substitutes)} {self.substitute_type} substitute shards: "
                             f"{sum(f.data_bytes for f in self.substitutes) / 1e6:.2f} MB")
        return "\n".join(lines)


def fingerprint(source_files: list[Path], settings: dict) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **settings}, sort_keys=True).encode())
    for p in source_files:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _quantized_chunks(ckpt: SafetensorsCheckpoint, spec: TensorSpec,
                      t: GGMLType) -> Iterator[np.ndarray]:
    """The spec's rows as type `t`, a bounded block of rows at a time."""
    first, rows = spec.row_offset, spec.n_rows
    if spec.transform is not None:
        # Transforms reorder rows across the tensor, so they need it whole (attention only).
        if spec.source_rows is not None:
            x = ckpt.read_rows(spec.hf_name, first, first + spec.source_rows)
        else:
            x = ckpt.read_rows(spec.hf_name, first, first + rows).reshape(spec.written_shape)
        yield quant.quantize(spec.transform(x), t)
        return
    step = max(1, CHUNK_ELEMENTS // spec.written_shape[-1])
    for r in range(first, first + rows, step):
        yield quant.quantize(ckpt.read_rows(spec.hf_name, r, min(r + step, first + rows)), t)


def _check_tensors(ckpt: SafetensorsCheckpoint, specs: list[TensorSpec], arch: MoeArchitecture,
                   src: Path) -> None:
    wanted = {s.hf_name: s for s in specs}
    missing = [name for name in wanted if name not in ckpt]
    if missing:
        s = wanted[missing[0]]
        raise ConvertError(f"{src}: tensor {s.hf_name} (shape {list(s.shape)}) is missing"
                           + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(n for n in set(ckpt.tensors) - set(wanted) if not n.endswith(BUFFERS))
    if extra:
        t = ckpt.tensors[extra[0]]
        raise ConvertError(f"{t.file}: unexpected tensor {t.name} (not part of a "
                           f"{arch.hf_architectures[0]} with this config.json)"
                           + (f", and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for s in specs:
        t = ckpt.tensors[s.hf_name]
        if t.shape != s.shape:
            raise ConvertError(f"{t.file}: tensor {t.name} has shape {list(t.shape)}, config.json "
                               f"implies {list(s.shape)}")
        ckpt.check_dtype(s.hf_name)


def plan_hf(src: Path, expert_type: str, dense_type: str,
            substitute_type: str | None = None) -> Plan:
    src = Path(src)
    config = read_config(src)
    arch = registry.for_hf(config.get("architectures"))
    hp = arch.hparams(config)
    e_type, d_type = quant.parse_type(expert_type), quant.parse_type(dense_type)
    s_type = quant.parse_type(substitute_type) if substitute_type else None
    ckpt = SafetensorsCheckpoint(src)
    specs = arch.tensor_specs(hp)
    _check_tensors(ckpt, specs, arch, src)

    fallbacks = []
    base_tensors: list[OutTensor] = []
    expert_tensors: dict[tuple[int, int], list[OutTensor]] = {}
    substitute_tensors: dict[tuple[int, int], list[OutTensor]] = {}
    for s in specs:
        requested = {DENSE: d_type, EXPERT: e_type, F32: GGMLType.F32,
                     EXPERT_F32: GGMLType.F32}[s.kind]
        used, why = quant.choose_type(requested, s.written_shape[-1])
        if why:
            fallbacks.append({"tensor": s.gguf_name, "requested": requested.name,
                              "used": used.name, "why": why})
        out = OutTensor(name=s.gguf_name, shape=s.written_shape, type=used,
                        nbytes=quant.nbytes(used, s.written_shape),
                        chunks=lambda s=s, used=used: _quantized_chunks(ckpt, s, used))
        if s.kind in (EXPERT, EXPERT_F32):
            expert_tensors.setdefault((s.layer, s.expert), []).append(out)
            if s_type is not None:  # expert biases stay F32 in substitutes too
                sub_type = s_type if s.kind == EXPERT else GGMLType.F32
                sub, why = quant.choose_type(sub_type, s.written_shape[-1])
                if why:
                    fallbacks.append({"tensor": f"substitute {s.gguf_name}",
                                      "requested": sub_type.name, "used": sub.name, "why": why})
                substitute_tensors.setdefault((s.layer, s.expert), []).append(OutTensor(
                    name=s.gguf_name, shape=s.written_shape, type=sub,
                    nbytes=quant.nbytes(sub, s.written_shape),
                    chunks=lambda s=s, sub=sub: _quantized_chunks(ckpt, s, sub)))
        else:
            base_tensors.append(out)
    for name, values in arch.generated_tensors(hp):
        data = np.ascontiguousarray(values, dtype=np.float32)
        base_tensors.append(OutTensor(name=name, shape=data.shape, type=GGMLType.F32,
                                      nbytes=data.nbytes, chunks=lambda d=data: iter([d])))

    def base_metadata(w: GGUFWriter) -> None:
        w.add_name(config.get("_name_or_path") or src.resolve().name)
        arch.add_metadata(w, hp)
        w.add_quantization_version(GGML_QUANT_VERSION)
        add_tokenizer(w, src)
        add_edgemoe_base_keys(w, e_type.name, d_type.name, hp.expert_layers)

    experts = tuple(expert_out_file(expert_file(l, e), l, e, ts)
                    for (l, e), ts in sorted(expert_tensors.items()))
    substitutes = tuple(expert_out_file(substitute_file(l, e), l, e, ts)
                        for (l, e), ts in sorted(substitute_tensors.items()))
    base = OutFile(rel=BASE_FILE, arch=arch.name, metadata=base_metadata,
                   tensors=tuple(base_tensors))
    source_files = sorted({t.file for t in ckpt.tensors.values()}) + [src / "config.json"]
    source_files += sorted(p for p in src.glob("tokenizer*") if p.is_file())
    return Plan(
        source={"kind": "safetensors", "path": str(src.resolve()),
                "hf_architecture": arch.hf_architectures[0]},
        arch=arch.name, hp=hp, expert_type=e_type.name, dense_type=d_type.name, base=base,
        experts=experts, fallbacks=tuple(fallbacks),
        fingerprint=fingerprint(source_files, {"expert_type": e_type.name,
                                               "dense_type": d_type.name,
                                               **({"substitute_type": s_type.name}
                                                  if s_type else {})}),
        substitute_type=s_type.name if s_type else None, substitutes=substitutes)
