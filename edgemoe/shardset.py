"""Read an edgemoe shard set (docs/FORMAT.md): the manifest, the base GGUF and one GGUF per expert.

The runtime locates expert bytes from the manifest alone, so opening a set checks everything the
manifest says that can be checked without reading the files: every field's type and range, every
file name (fixed by the format) resolving to a regular file inside the set with the recorded
size, every expert tensor's type, shape and size against the model's dimensions, and every offset
inside its expert's data run and file, so that nothing the manifest says can make a read or a
copy leave its buffer. The manifest carries a sha256 of its own content.

What needs the files is checked when they are read: an expert's GGUF header against its manifest
entry on its first read (`ExpertShard.check_header`) and its data run against the crc32 recorded
at conversion on every read; base.gguf's tensors against their crc32s as they are loaded.
`verify()` hashes every file and checks every header.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from gguf.constants import GGMLQuantizationType

from edgemoe.errors import ShardSetError
from edgemoe.gguf_header import parse, tensor_nbytes, type_name

FORMAT_NAME = "edgemoe.shardset"
FORMAT_VERSION = 1
# Expert data runs start on a page boundary so one O_DIRECT read can fetch a whole expert.
ALIGNMENT = 4096
MANIFEST_FILE = "manifest.json"
# The converter's record of finished files while it runs (docs/FORMAT.md).
JOURNAL_FILE = ".edgemoe-journal.jsonl"
BASE_FILE = "base.gguf"
EXPERTS_DIR = "experts"
SUBSTITUTES_DIR = "substitutes"
EXPERT_ARCH = "edgemoe.expert"
# The three per-expert projections, in file order; their llama.cpp names are blk.{L}.{name}.{E}.weight.
EXPERT_TENSORS = ("ffn_gate", "ffn_up", "ffn_down")
# Models whose experts have biases (gpt-oss) store them after the projections, F32, named
# blk.{L}.{proj}.{E}.bias; the manifest's expert_tensors then lists all six.
EXPERT_BIASES = ("ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")
EXPERT_LAYOUTS = (EXPERT_TENSORS, EXPERT_TENSORS + EXPERT_BIASES)
# The manifest's digest of itself: sha256 of its canonical JSON without this key.
CHECKSUM_KEY = "manifest_sha256"
# Limits of what a manifest may declare (llama.cpp's LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS) and of
# its size, so a crafted one cannot make the reader allocate without bound.
MAX_LAYERS = 512
MAX_EXPERTS = 1024
MAX_DIM = 1 << 24
MAX_MANIFEST_BYTES = 256 << 20
_CRC_MAX = (1 << 32) - 1
# Integer ggml types hold no weights; a matmul on them aborts inside ggml.
_NON_WEIGHT_TYPES = ("I8", "I16", "I32", "I64", "F64")
_warned_unchecked: set[Path] = set()
# Data is checked against its crc32 as it is read (expert runs, base tensors); EDGEMOE_CHECKSUMS=0
# turns that off (to measure what it costs).
CHECKSUMS = os.environ.get("EDGEMOE_CHECKSUMS", "1") != "0"


def expert_file(layer: int, expert: int) -> str:
    """Path of an expert shard relative to the shard-set directory."""
    return f"{EXPERTS_DIR}/blk.{layer}.{expert}.gguf"


def substitute_file(layer: int, expert: int) -> str:
    """Path of an expert's low-bit substitute shard relative to the shard-set directory."""
    return f"{SUBSTITUTES_DIR}/blk.{layer}.{expert}.gguf"


def expert_tensor_name(layer: int, expert: int, key: str) -> str:
    """llama.cpp's per-expert tensor name of "ffn_gate" or "ffn_gate.bias", e.g.
    blk.0.ffn_gate.3.weight, blk.0.ffn_gate.3.bias."""
    proj, _, suffix = key.partition(".")
    return f"blk.{layer}.{proj}.{expert}.{suffix or 'weight'}"


def expert_tensor_key(name: str) -> str:
    """The manifest key of a per-expert tensor name (blk.0.ffn_gate.3.bias -> ffn_gate.bias)."""
    _, _, proj, _, suffix = name.split(".")
    return proj if suffix == "weight" else f"{proj}.{suffix}"


def expert_ne(proj: str, n_embd: int, n_ff_exp: int) -> tuple[int, ...]:
    """ggml dimensions of one expert projection (or of its bias: "ffn_down.bias" ...)."""
    if proj.endswith(".bias"):
        return (n_embd,) if proj.startswith("ffn_down") else (n_ff_exp,)
    return (n_ff_exp, n_embd) if proj == "ffn_down" else (n_embd, n_ff_exp)


def manifest_digest(manifest: Mapping) -> str:
    """sha256 of the manifest's canonical JSON, the CHECKSUM_KEY itself left out."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """The manifest with its digest recorded (the writer calls this last)."""
    manifest[CHECKSUM_KEY] = manifest_digest(manifest)
    return manifest


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` through `path.tmp`, flushed to disk and renamed over it: a reader, or a
    process killed meanwhile, sees the old file or the new one, never part of one."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "named pipe"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def file_problem(path: Path, size: int | None = None) -> str | None:
    """None when `path` is a regular file (of `size` bytes, if given); else what is wrong.
    Symbolic links are followed (the caller checks where they lead)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path}: missing"
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: is a {_kind(st.st_mode)}, expected a regular file"
    if size is not None and st.st_size != size:
        return f"{path}: {st.st_size} bytes, manifest says {size}"
    return None


def check_file(path: Path, size: int, sha256: str | None) -> str | None:
    """None when `path` is a regular file with `size` bytes (and `sha256`, if given); else what
    is wrong."""
    problem = file_problem(path, size)
    if problem is None and sha256 is not None and file_sha256(path) != sha256:
        return f"{path}: sha256 differs from the manifest"
    return problem


def resolve_inside(root: Path, rel: str) -> Path:
    """root/rel with symbolic links resolved; a ShardSetError when it leaves `root` (which is
    resolved already)."""
    path = root / rel
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop, a name too long
        raise ShardSetError(f"{path}: cannot be resolved ({exc})") from None
    if real != root and root not in real.parents:
        raise ShardSetError(f"{path}: resolves to {real}, outside the shard set {root}; a shard "
                            "set's files must lie inside its directory")
    return real


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
    path: Path            # resolved, inside the shard set
    bytes: int            # size of the whole file
    sha256: str           # of the whole file
    data_offset: int      # start of ffn_gate's data, a multiple of ALIGNMENT
    data_bytes: int       # from data_offset to the end of ffn_down's data
    tensors: Mapping[str, TensorInfo]  # keyed by "ffn_gate", "ffn_up", "ffn_down" (+ biases)
    crc32: int | None = None  # of the data run; None in sets converted before checksums
    # The same expert at the shard set's substitute_type (a shard of the same layout), if any.
    substitute: "ExpertShard | None" = None

    def verify(self) -> str | None:
        problem = check_file(self.path, self.bytes, self.sha256)
        if problem is None:
            try:
                with open(self.path, "rb") as f:
                    self.check_header(f.read(self.data_offset))
            except ShardSetError as exc:
                return str(exc)
        return problem

    def check_header(self, header) -> None:
        """The file's own GGUF header (its first data_offset bytes) must say what the manifest
        says: this expert, these tensors with these types, shapes and offsets."""
        h = parse(header, self.path, self.bytes)
        kv = h.kv
        if kv.get("edgemoe.format_version") != FORMAT_VERSION:
            raise ShardSetError(f"{self.path}: edgemoe.format_version "
                                f"{kv.get('edgemoe.format_version')!r}, this edgemoe reads "
                                f"{FORMAT_VERSION}")
        if (kv.get("general.architecture") != EXPERT_ARCH or kv.get("edgemoe.layer") != self.layer
                or kv.get("edgemoe.expert") != self.expert):
            raise ShardSetError(
                f"{self.path}: holds {kv.get('general.architecture')!r} layer "
                f"{kv.get('edgemoe.layer')!r} expert {kv.get('edgemoe.expert')!r}, the manifest "
                f"lists it as {EXPERT_ARCH} layer {self.layer} expert {self.expert}")
        got = [(t.name, type_name(t.type), t.ne, t.offset, t.nbytes) for t in h.tensors]
        want = [(expert_tensor_name(self.layer, self.expert, p), self.tensors[p].type,
                 tuple(self.tensors[p].ne), self.tensors[p].offset, self.tensors[p].nbytes)
                for p in self.tensors]
        if got != want:
            raise ShardSetError(f"{self.path}: its tensors {got} differ from the manifest's "
                                f"{want}")


def _field(obj: Mapping, key: str, kind: type | tuple, where: str):
    if key not in obj:
        raise ShardSetError(f"{where}: key '{key}' missing")
    value = obj[key]
    # bool is an int subclass; a flag where a count belongs is still a corrupt manifest.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ShardSetError(f"{where}: key '{key}' should be {getattr(kind, '__name__', kind)}, "
                            f"got {_short(value)}")
    return value


def _int(obj: Mapping, key: str, where: str, lo: int, hi: int) -> int:
    value = _field(obj, key, int, where)
    if not lo <= value <= hi:
        raise ShardSetError(f"{where}: key '{key}' is {_short(value)}, expected {lo}..{hi}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_list(manifest: Mapping, key: str, where: str) -> str:
    """A type name, or several joined by '/' (the types a GGUF source mixed)."""
    value = _field(manifest, key, str, where)
    if not all(part in GGMLQuantizationType.__members__ for part in value.split("/")):
        raise ShardSetError(f"{where}: key '{key}' is {_short(value)}, expected ggml type "
                            "names joined by '/'")
    return value


def _weight_type(name: str, where: str) -> str:
    if name not in GGMLQuantizationType.__members__ or name in _NON_WEIGHT_TYPES:
        raise ShardSetError(f"{where}: tensor type {_short(name)} is not a ggml weight type")
    return name


class ShardSet:
    """An opened, structurally checked shard set. Use `ShardSet.open(path)`."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        where = str(root / MANIFEST_FILE)
        self.arch: str = _field(manifest, "arch", str, where)
        self.n_layer: int = _int(manifest, "n_layer", where, 1, MAX_LAYERS)
        self.n_expert: int = _int(manifest, "n_expert", where, 1, MAX_EXPERTS)
        self.n_expert_used: int = _int(manifest, "n_expert_used", where, 1, self.n_expert)
        self.n_embd: int = _int(manifest, "n_embd", where, 1, MAX_DIM)
        self.n_ff_exp: int = _int(manifest, "n_ff_exp", where, 1, MAX_DIM)
        layers = _field(manifest, "expert_layers", list, where)
        if (len(layers) > self.n_layer or
                any(not isinstance(l, int) or isinstance(l, bool) or not 0 <= l < self.n_layer
                    for l in layers) or sorted(set(layers)) != layers):
            raise ShardSetError(f"{where}: expert_layers {_short(layers)} should be distinct "
                                f"increasing layers in 0..{self.n_layer - 1}")
        self.expert_layers: tuple[int, ...] = tuple(layers)
        self.expert_type: str = _type_list(manifest, "expert_type", where)
        self.dense_type: str = _type_list(manifest, "dense_type", where)
        fallbacks = manifest.get("fallbacks", [])
        if not isinstance(fallbacks, list) or not all(isinstance(f, dict) for f in fallbacks):
            raise ShardSetError(f"{where}: key 'fallbacks' should be a list of objects, got "
                                f"{_short(fallbacks)}")
        self.fallbacks: list[dict] = fallbacks
        source = manifest.get("source", {})
        if not isinstance(source, dict) or not all(
                value is None or isinstance(value, str) for value in source.values()):
            raise ShardSetError(f"{where}: key 'source' should be an object of strings, got "
                                f"{_short(source)}")
        self.source: dict = source
        sub = manifest.get("substitute_type")
        if sub is not None:
            _weight_type(sub if isinstance(sub, str) else repr(sub), f"{where} substitute_type")
        self.substitute_type: str | None = sub
        layout = tuple(manifest.get("expert_tensors", EXPERT_TENSORS))
        if layout not in EXPERT_LAYOUTS:
            raise ShardSetError(f"{where}: expert_tensors {_short(list(layout))}; expected one "
                                f"of {[list(l) for l in EXPERT_LAYOUTS]}")
        self.expert_tensors: tuple[str, ...] = layout  # each expert's tensors, in file order
        # Sets converted before checksums existed carry none of them.
        self.checksummed = CHECKSUM_KEY in manifest
        base = _field(manifest, "base", dict, where)
        if _field(base, "file", str, f"{where} base") != BASE_FILE:
            raise ShardSetError(f"{where}: base file {_short(base['file'])}, the format fixes "
                                f"it to {BASE_FILE}")
        self.base_path = resolve_inside(root, BASE_FILE)
        self.base_bytes: int = _int(base, "bytes", f"{where} base", 0, 1 << 62)
        self.base_sha256: str = _field(base, "sha256", str, f"{where} base")
        self.base_crc32: dict[str, int] | None = None
        self.base_header_crc32: int | None = None
        if self.checksummed:
            self.base_header_crc32 = _int(base, "header_crc32", f"{where} base", 0, _CRC_MAX)
            crcs = _field(base, "tensor_crc32", dict, f"{where} base")
            for name, crc in crcs.items():
                if not isinstance(crc, int) or isinstance(crc, bool) or not 0 <= crc <= _CRC_MAX:
                    raise ShardSetError(f"{where} base: tensor_crc32 of {_short(name)} is "
                                        f"{_short(crc)}, expected a crc32")
            self.base_crc32 = crcs

        entries = _field(manifest, "experts", list, where)
        expected = len(self.expert_layers) * self.n_expert
        if len(entries) != expected:
            raise ShardSetError(f"{where}: {len(entries)} expert entries, expected {expected} "
                                f"({len(self.expert_layers)} expert layers x {self.n_expert})")
        # Per projection: (type name, ggml type) -> bytes, computed once.
        self._nbytes: dict[tuple, int | None] = {}
        self._experts: dict[tuple[int, int], ExpertShard] = {}
        for entry in entries:
            if not isinstance(entry, dict):
                raise ShardSetError(f"{where}: an expert entry is {_short(entry)}, expected an "
                                    "object")
            shard = self._parse_expert(entry, where)
            if (shard.layer, shard.expert) in self._experts:
                raise ShardSetError(f"{where}: expert blk.{shard.layer}.{shard.expert} is listed "
                                    "twice")
            self._experts[(shard.layer, shard.expert)] = shard

    def _parse_expert(self, entry: dict, where: str) -> ExpertShard:
        layer = _field(entry, "layer", int, f"{where} expert")
        expert = _field(entry, "expert", int, f"{where} expert")
        if layer not in self.expert_layers or not 0 <= expert < self.n_expert:
            raise ShardSetError(f"{where}: expert blk.{_short(layer)}.{_short(expert)} lies "
                                f"outside expert_layers {list(self.expert_layers)} x "
                                f"{self.n_expert} experts")
        where = f"{where} expert blk.{layer}.{expert}"
        substitute = None
        if self.substitute_type is not None:
            substitute = self._parse_shard(_field(entry, "substitute", dict, where), layer, expert,
                                           f"{where} substitute", substitute_file(layer, expert),
                                           None)
        elif "substitute" in entry:
            raise ShardSetError(f"{where}: a substitute entry but no substitute_type")
        return self._parse_shard(entry, layer, expert, where, expert_file(layer, expert),
                                 substitute)

    def _parse_shard(self, entry: dict, layer: int, expert: int, where: str, fixed: str,
                     substitute: ExpertShard | None) -> ExpertShard:
        """One expert or substitute shard's entry: `fixed` is the file name the format gives it."""
        rel = _field(entry, "file", str, where)
        if rel != fixed:
            raise ShardSetError(f"{where}: file {_short(rel)}, the format fixes it to {fixed}")
        size = _int(entry, "bytes", where, 0, 1 << 62)
        tensors = {}
        raw = _field(entry, "tensors", dict, where)
        for proj in self.expert_tensors:
            t = _field(raw, proj, dict, where)
            at = f"{where} {proj}"
            info = TensorInfo(type=_weight_type(_field(t, "type", str, at), at),
                              ne=tuple(_field(t, "ne", list, at)),
                              offset=_int(t, "offset", at, 0, size),
                              nbytes=_int(t, "nbytes", at, 0, size))
            want = expert_ne(proj, self.n_embd, self.n_ff_exp)
            if info.ne != want or not all(type(d) is int for d in info.ne):
                raise ShardSetError(f"{at}: ne {_short(list(info.ne))}, the model's "
                                    f"n_embd {self.n_embd} and n_ff_exp {self.n_ff_exp} give "
                                    f"{list(want)}")
            key = (info.type, want)
            if key not in self._nbytes:
                self._nbytes[key] = tensor_nbytes(int(GGMLQuantizationType[info.type]), want)
            need = self._nbytes[key]
            if need is None:
                raise ShardSetError(f"{at}: {info.type} cannot hold rows of {want[0]} elements")
            if info.nbytes != need:
                raise ShardSetError(f"{at}: holds {info.nbytes} bytes, {info.type} "
                                    f"{list(want)} needs {need}")
            tensors[proj] = info
        data_offset = _int(entry, "data_offset", where, 0, size)
        data_bytes = _int(entry, "data_bytes", where, 0, size)
        first, last = self.expert_tensors[0], self.expert_tensors[-1]
        if data_offset % ALIGNMENT or data_offset != tensors[first].offset:
            raise ShardSetError(f"{where}: data_offset {data_offset} is not the {ALIGNMENT}-aligned "
                                f"start of {first}")
        if data_offset + data_bytes != tensors[last].offset + tensors[last].nbytes:
            raise ShardSetError(f"{where}: data_bytes {data_bytes} does not end at the end of "
                                f"{last}")
        if data_offset + data_bytes > size:
            raise ShardSetError(f"{where}: data run [{data_offset}, {data_offset + data_bytes}) "
                                f"lies outside the {size}-byte file")
        # Tensors follow each other inside the run, in order, without overlapping: each copy
        # into a slot stays inside the bytes read.
        end = data_offset
        for proj in self.expert_tensors:
            info = tensors[proj]
            if info.offset < end:
                raise ShardSetError(f"{where}: tensor {proj} at {info.offset} overlaps what "
                                    f"precedes it (ends at {end})")
            end = info.offset + info.nbytes
        crc = None
        if self.checksummed:
            crc = _int(entry, "crc32", where, 0, _CRC_MAX)
        return ExpertShard(layer=layer, expert=expert,
                           path=resolve_inside(self.root, rel), bytes=size,
                           sha256=_field(entry, "sha256", str, where), data_offset=data_offset,
                           data_bytes=data_bytes, tensors=tensors, crc32=crc,
                           substitute=substitute)

    @classmethod
    def open(cls, path: str | Path) -> "ShardSet":
        given = Path(path)
        try:
            root = given.resolve()
            is_dir, exists = root.is_dir(), os.path.lexists(given)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ShardSetError(f"{given}: cannot be resolved ({exc})") from None
        if not is_dir:
            what = ("not a directory (nothing is there)" if not exists else
                    "a GGUF file; run it directly (it is converted once into a shard set)"
                    if given.suffix == ".gguf" else "not a directory")
            raise ShardSetError(f"{given}: {what} (expected a shard-set directory written by "
                                "`edgemoe convert`)")
        manifest_path = root / MANIFEST_FILE
        if not os.path.lexists(manifest_path):
            raise ShardSetError(describe_non_shardset(given))
        manifest = _read_manifest(resolve_inside(root, MANIFEST_FILE), manifest_path)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise ShardSetError(f"{manifest_path}: format should be '{FORMAT_NAME}'")
        if manifest.get("version") != FORMAT_VERSION:
            raise ShardSetError(f"{manifest_path}: version {_short(manifest.get('version'))}, "
                                f"this edgemoe reads version {FORMAT_VERSION}")
        shards = cls(root, manifest)
        if shards.checksummed:
            recorded = manifest[CHECKSUM_KEY]
            if recorded != manifest_digest(manifest):
                raise ShardSetError(f"{manifest_path}: its content does not match its "
                                    f"{CHECKSUM_KEY} (edited or corrupt); reconvert the model "
                                    "or restore the file")
        elif root not in _warned_unchecked:
            _warned_unchecked.add(root)
            warnings.warn(f"{root}: converted by an older edgemoe, without checksums; corrupt "
                          "data will not be detected at read time (reconvert with `edgemoe "
                          "convert --force` to add them)", RuntimeWarning, stacklevel=2)
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

    def check_base_header(self, reader) -> None:
        """base.gguf's metadata and tensor table (its GGUFHeader) against the crc32 the
        converter recorded."""
        version = reader.fields.get("edgemoe.format_version")
        if version is not None and version.contents() != FORMAT_VERSION:
            raise ShardSetError(f"{self.base_path}: edgemoe.format_version "
                                f"{version.contents()!r}, this edgemoe reads {FORMAT_VERSION}")
        want = self.base_header_crc32
        if want is None or not CHECKSUMS:
            return
        got = reader.header_crc32
        if got != want:
            raise ShardSetError(f"{self.base_path}: its header (metadata and tensor table) fails "
                                f"its checksum (crc32 {got:08x}, manifest says {want:08x}); the "
                                "file is corrupt: reconvert it")

    def check_match(self, hp) -> None:
        """The base GGUF's hyper-parameters (HParams) must describe the model the manifest does."""
        pairs = [("arch", self.arch, hp.arch), ("n_layer", self.n_layer, hp.n_layer),
                 ("n_expert", self.n_expert, hp.n_expert),
                 ("n_expert_used", self.n_expert_used, hp.n_expert_used),
                 ("n_embd", self.n_embd, hp.n_embd),
                 ("expert_layers", list(self.expert_layers), list(hp.expert_layers))]
        if hp.n_ff_exp:
            pairs.append(("n_ff_exp", self.n_ff_exp, hp.n_ff_exp))
        for key, manifest, base in pairs:
            if manifest != base:
                raise ShardSetError(f"{self.root}: manifest {key}={manifest} but "
                                    f"{self.base_path.name} says {base}; base and expert shards "
                                    "do not match")

    def _problems(self, hash_files: bool) -> list[str]:
        problems = []
        base = check_file(self.base_path, self.base_bytes, self.base_sha256 if hash_files else None)
        if base:
            problems.append(base)
        for expert in self.experts():
            for shard in (expert, expert.substitute):
                if shard is None:
                    continue
                issue = shard.verify() if hash_files else file_problem(shard.path, shard.bytes)
                if issue:
                    problems.append(issue)
        return problems

    def verify(self) -> None:
        """Hash every file and check every expert's header against the manifest; raise
        ShardSetError naming the bad files."""
        problems = self._problems(hash_files=True)
        if problems:
            shown = "; ".join(problems[:3])
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ShardSetError(f"{len(problems)} file(s) fail verification: {shown}{more}")


def _read_manifest(real: Path, shown: Path) -> dict:
    problem = file_problem(real)
    if problem:
        raise ShardSetError(problem.replace(str(real), str(shown), 1))
    try:
        # O_NONBLOCK: a file swapped for a pipe since the check must not block the open.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ShardSetError(f"{shown}: is a {_kind(st.st_mode)}, expected a regular file")
            if st.st_size > MAX_MANIFEST_BYTES:
                raise ShardSetError(f"{shown}: {st.st_size} bytes, more than any manifest "
                                    f"({MAX_MANIFEST_BYTES} at most)")
            data = os.read(fd, st.st_size + 1) if st.st_size else b""
        finally:
            os.close(fd)
        return json.loads(data.decode("utf-8"))
    except OSError as exc:
        raise ShardSetError(f"{shown}: unreadable ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: bad JSON, or an integer of more digits than Python converts
        raise ShardSetError(f"{shown}: unreadable ({_short(str(exc))})") from None


def describe_non_shardset(path: Path) -> str:
    """Why the directory `path` (which has no manifest.json) is not a shard set, and what to do."""
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    manifest = path / MANIFEST_FILE
    if JOURNAL_FILE in names or BASE_FILE in names or EXPERTS_DIR in names:
        return (f"{manifest}: missing; the shard set is incomplete (an interrupted conversion: "
                "rerun the same `edgemoe convert SRC OUT --resume`)")
    if "config.json" in names:
        return (f"{path}: a Hugging Face checkpoint, not a shard set; `edgemoe run` converts it "
                "into its cache on first use, or convert it with `edgemoe convert`")
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    if ggufs:
        return (f"{path}: holds {ggufs[0]}" + (f" and {len(ggufs) - 1} more GGUF file(s)"
                                              if len(ggufs) > 1 else "")
                + " but no manifest.json; pass the .gguf file itself or convert it with "
                "`edgemoe convert`")
    return (f"{path}: not a shard set (no {MANIFEST_FILE}; expected a directory written by "
            f"`edgemoe convert`: {MANIFEST_FILE}, {BASE_FILE}, {EXPERTS_DIR}/)")
