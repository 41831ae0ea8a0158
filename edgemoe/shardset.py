"""Read an edgemoe shard set (docs/FORMAT.md): the manifest, the base GGUF and one GGUF per expert.

The runtime locates expert bytes from the manifest alone, so opening a set checks that every file
the manifest names exists with the recorded size and that every tensor lies inside its file;
`verify()` additionally hashes every file. Nothing here parses GGUF: that keeps the hot path
(reading one expert's contiguous run) free of per-file parsing.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from edgemoe.errors import ShardSetError

FORMAT_NAME = "edgemoe.shardset"
FORMAT_VERSION = 1
# Expert data runs start on a page boundary so one O_DIRECT read can fetch a whole expert.
ALIGNMENT = 4096
MANIFEST_FILE = "manifest.json"
BASE_FILE = "base.gguf"
EXPERTS_DIR = "experts"
SUBSTITUTES_DIR = "substitutes"
# The three per-expert projections, in file order; their llama.cpp names are blk.{L}.{name}.{E}.weight.
EXPERT_TENSORS = ("ffn_gate", "ffn_up", "ffn_down")


def expert_file(layer: int, expert: int) -> str:
    """Path of an expert shard relative to the shard-set directory."""
    return f"{EXPERTS_DIR}/blk.{layer}.{expert}.gguf"


def substitute_file(layer: int, expert: int) -> str:
    """Path of an expert's low-bit substitute shard relative to the shard-set directory."""
    return f"{SUBSTITUTES_DIR}/blk.{layer}.{expert}.gguf"


def expert_tensor_name(layer: int, expert: int, proj: str) -> str:
    """llama.cpp's per-expert tensor name, e.g. blk.0.ffn_gate.3.weight."""
    return f"blk.{layer}.{proj}.{expert}.weight"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, size: int, sha256: str | None) -> str | None:
    """None when `path` exists with `size` bytes (and `sha256`, if given); else what is wrong."""
    if not path.is_file():
        return f"{path}: missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{path}: {actual} bytes, manifest says {size}"
    if sha256 is not None and file_sha256(path) != sha256:
        return f"{path}: sha256 differs from the manifest"
    return None


@dataclass(frozen=True)
class TensorInfo:
    type: str             # ggml type name as llama.cpp spells it, e.g. "Q4_K"
    ne: tuple[int, ...]   # ggml dimensions, innermost first: ffn_gate is (n_embd, n_ff_exp)
    offset: int           # absolute byte offset in the shard file
    nbytes: int


@dataclass(frozen=True)
class ExpertShard:
    layer: int
    expert: int
    path: Path
    bytes: int            # size of the whole file
    sha256: str           # of the whole file
    data_offset: int      # start of ffn_gate's data, a multiple of ALIGNMENT
    data_bytes: int       # from data_offset to the end of ffn_down's data
    tensors: Mapping[str, TensorInfo]  # keyed by "ffn_gate", "ffn_up", "ffn_down"
    # The same expert at the shard set's substitute_type (a shard of the same layout), if any.
    substitute: "ExpertShard | None" = None

    def verify(self) -> str | None:
        return check_file(self.path, self.bytes, self.sha256)


def _field(obj: Mapping, key: str, kind: type | tuple, where: str):
    if key not in obj:
        raise ShardSetError(f"{where}: key '{key}' missing")
    value = obj[key]
    # bool is an int subclass; a flag where a count belongs is still a corrupt manifest.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ShardSetError(f"{where}: key '{key}' should be {getattr(kind, '__name__', kind)}, "
                            f"got {value!r}")
    return value


class ShardSet:
    """An opened, structurally checked shard set. Use `ShardSet.open(path)`."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        where = str(root / MANIFEST_FILE)
        self.arch: str = _field(manifest, "arch", str, where)
        self.n_layer: int = _field(manifest, "n_layer", int, where)
        self.n_expert: int = _field(manifest, "n_expert", int, where)
        self.n_expert_used: int = _field(manifest, "n_expert_used", int, where)
        self.n_embd: int = _field(manifest, "n_embd", int, where)
        self.n_ff_exp: int = _field(manifest, "n_ff_exp", int, where)
        self.expert_layers: tuple[int, ...] = tuple(_field(manifest, "expert_layers", list, where))
        self.expert_type: str = _field(manifest, "expert_type", str, where)
        self.dense_type: str = _field(manifest, "dense_type", str, where)
        self.fallbacks: list[dict] = list(manifest.get("fallbacks", []))
        sub = manifest.get("substitute_type")
        if sub is not None and not isinstance(sub, str):
            raise ShardSetError(f"{where}: key 'substitute_type' should be a string, got "
                                f"{type(sub).__name__}")
        self.substitute_type: str | None = sub
        self.source: dict = dict(manifest.get("source", {}))
        base = _field(manifest, "base", dict, where)
        self.base_path = root / _field(base, "file", str, f"{where} base")
        self.base_bytes: int = _field(base, "bytes", int, f"{where} base")
        self.base_sha256: str = _field(base, "sha256", str, f"{where} base")
        self._experts: dict[tuple[int, int], ExpertShard] = {}
        for entry in _field(manifest, "experts", list, where):
            shard = self._parse_expert(entry, where)
            self._experts[(shard.layer, shard.expert)] = shard
        missing = [(l, e) for l in self.expert_layers for e in range(self.n_expert)
                   if (l, e) not in self._experts]
        if sub is not None:
            lacking = [s for s in self._experts.values() if s.substitute is None]
            if lacking:
                raise ShardSetError(f"{where}: substitute_type {sub} but expert "
                                    f"blk.{lacking[0].layer}.{lacking[0].expert} has no substitute")
        if missing:
            l, e = missing[0]
            raise ShardSetError(f"{where}: {len(missing)} expert(s) not listed, first blk.{l}.{e}")

    def _parse_expert(self, entry: dict, where: str) -> ExpertShard:
        layer = _field(entry, "layer", int, f"{where} expert")
        expert = _field(entry, "expert", int, f"{where} expert")
        where = f"{where} expert blk.{layer}.{expert}"
        if layer not in self.expert_layers or not 0 <= expert < self.n_expert:
            raise ShardSetError(f"{where}: outside expert_layers {list(self.expert_layers)} "
                                f"x {self.n_expert} experts")
        substitute = None
        if "substitute" in entry:
            substitute = self._parse_shard(_field(entry, "substitute", dict, where), layer,
                                           expert, f"{where} substitute", None)
        return self._parse_shard(entry, layer, expert, where, substitute)

    def _parse_shard(self, entry: dict, layer: int, expert: int, where: str,
                     substitute: ExpertShard | None) -> ExpertShard:
        size = _field(entry, "bytes", int, where)
        tensors = {}
        raw = _field(entry, "tensors", dict, where)
        for proj in EXPERT_TENSORS:
            t = _field(raw, proj, dict, where)
            info = TensorInfo(type=_field(t, "type", str, f"{where} {proj}"),
                              ne=tuple(_field(t, "ne", list, f"{where} {proj}")),
                              offset=_field(t, "offset", int, f"{where} {proj}"),
                              nbytes=_field(t, "nbytes", int, f"{where} {proj}"))
            if info.offset < 0 or info.offset + info.nbytes > size:
                raise ShardSetError(f"{where}: tensor {proj} [{info.offset}, "
                                    f"{info.offset + info.nbytes}) lies outside the {size}-byte file")
            tensors[proj] = info
        data_offset = _field(entry, "data_offset", int, where)
        data_bytes = _field(entry, "data_bytes", int, where)
        if data_offset % ALIGNMENT or data_offset != tensors[EXPERT_TENSORS[0]].offset:
            raise ShardSetError(f"{where}: data_offset {data_offset} is not the {ALIGNMENT}-aligned "
                                f"start of {EXPERT_TENSORS[0]}")
        last = tensors[EXPERT_TENSORS[-1]]
        if data_offset + data_bytes != last.offset + last.nbytes:
            raise ShardSetError(f"{where}: data_bytes {data_bytes} does not end at the end of "
                                f"{EXPERT_TENSORS[-1]}")
        return ExpertShard(layer=layer, expert=expert,
                           path=self.root / _field(entry, "file", str, where), bytes=size,
                           sha256=_field(entry, "sha256", str, where), data_offset=data_offset,
                           data_bytes=data_bytes, tensors=tensors, substitute=substitute)

    @classmethod
    def open(cls, path: str | Path) -> "ShardSet":
        root = Path(path)
        if not root.is_dir():
            raise ShardSetError(f"{root}: not a directory (expected a shard set written by "
                                "`edgemoe convert`)")
        manifest_path = root / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ShardSetError(f"{manifest_path}: missing; the shard set is incomplete "
                                "(rerun `edgemoe convert --resume`)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardSetError(f"{manifest_path}: unreadable ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise ShardSetError(f"{manifest_path}: format should be '{FORMAT_NAME}'")
        if manifest.get("version") != FORMAT_VERSION:
            raise ShardSetError(f"{manifest_path}: version {manifest.get('version')!r}, "
                                f"this edgemoe reads version {FORMAT_VERSION}")
        shards = cls(root, manifest)
        problems = shards._problems(hash_files=False)
        if problems:
            raise ShardSetError(f"{problems[0]}" + (f" (and {len(problems) - 1} more problem(s))"
                                                    if len(problems) > 1 else ""))
        return shards

    def expert(self, layer: int, expert: int) -> ExpertShard:
        try:
            return self._experts[(layer, expert)]
        except KeyError:
            raise ShardSetError(f"{self.root}: no expert blk.{layer}.{expert} "
                                f"(expert layers {list(self.expert_layers)}, "
                                f"{self.n_expert} experts)") from None

    def experts(self) -> Iterator[ExpertShard]:
        """Every expert shard, by layer then expert."""
        return iter(sorted(self._experts.values(), key=lambda s: (s.layer, s.expert)))

    @property
    def expert_bytes_total(self) -> int:
        """Bytes of expert weights (data runs only, not GGUF headers or padding)."""
        return sum(s.data_bytes for s in self._experts.values())

    def _problems(self, hash_files: bool) -> list[str]:
        problems = []
        base = check_file(self.base_path, self.base_bytes, self.base_sha256 if hash_files else None)
        if base:
            problems.append(base)
        for expert in self.experts():
            for shard in (expert, expert.substitute):
                if shard is None:
                    continue
                issue = check_file(shard.path, shard.bytes, shard.sha256 if hash_files else None)
                if issue:
                    problems.append(issue)
        return problems

    def verify(self) -> None:
        """Hash every file against the manifest; raise ShardSetError naming the bad files."""
        problems = self._problems(hash_files=True)
        if problems:
            shown = "; ".join(problems[:3])
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ShardSetError(f"{len(problems)} file(s) fail verification: {shown}{more}")
