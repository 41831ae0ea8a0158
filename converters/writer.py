"""Writing GGUF files one tensor block at a time, crash-safely, and assembling a shard set.

Every file is written under `<name>.tmp`, flushed to disk, then renamed, so a file with its final
name is always complete. A journal (one JSON line per finished file, with its sha256, tensor
offsets and crc32s) lets `--resume` skip files that still match; the manifest is written last,
sealed with its own digest, so its presence marks a complete shard set. The crc32s (of each
tensor, and of each expert's data run) are computed as the bytes pass, for the runtime's checks
at read time.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUFWriter

from edgemoe.errors import ConvertError
from edgemoe.hparams import EXPERT_LAYERS_KEY
from edgemoe.quant import GGMLType
from edgemoe.shardset import (ALIGNMENT, BASE_FILE, EXPERT_TENSORS, EXPERTS_DIR, FORMAT_NAME,
                              FORMAT_VERSION, JOURNAL_FILE, MANIFEST_FILE, SUBSTITUTES_DIR,
                              check_file, expert_tensor_key, expert_tensor_name, seal_manifest)

TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]            # numpy order (outermost first)
    type: GGMLType
    nbytes: int
    chunks: Callable[[], Iterator[np.ndarray | bytes | memoryview]]  # its bytes, in order


@dataclass(frozen=True)
class OutFile:
    rel: str                          # path relative to the output directory
    arch: str                         # general.architecture
    metadata: Callable[[GGUFWriter], None]
    tensors: tuple[OutTensor, ...]
    alignment: int = GGUF_DEFAULT_ALIGNMENT
    layer: int | None = None
    expert: int | None = None

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class Written:
    rel: str
    bytes: int
    sha256: str
    tensors: dict = field(default_factory=dict)  # name -> {"offset", "nbytes", "crc32"}
    data_crc32: int | None = None   # of the bytes from the first tensor to the end of the last
    header_crc32: int | None = None  # of the bytes before the first tensor


class _HashingFile:
    """A write-only file that hashes what passes through, so checksums need no second read."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.pos = 0
        self.run_crc: int | None = None      # from start_run(): the tensor data run
        self.head_crc = 0                    # until start_run(): the header
        self.tensor_crc = 0

    def start_run(self) -> None:
        self.run_crc = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.raw.write(view)
        self.sha.update(view)
        if self.run_crc is not None:
            self.run_crc = zlib.crc32(view, self.run_crc)
            self.tensor_crc = zlib.crc32(view, self.tensor_crc)
        else:
            self.head_crc = zlib.crc32(view, self.head_crc)
        self.pos += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.raw.close()


class Progress:
    """A one-line progress bar with throughput on stderr (redrawn at most 5 times a second)."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30):
        self.total, self.enabled, self.width = max(total, 1), enabled, width
        self.done = 0
        self.start = self.last = time.monotonic()
        self.label = ""
        self.drawn = -1

    def update(self, n: int, label: str | None = None) -> None:
        self.done += n
        if label is not None:
            self.label = label
        now = time.monotonic()
        if self.enabled and (now - self.last >= 0.2 or self.done >= self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self.drawn = self.done
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * self.width)
        rate = self.done / max(now - self.start, 1e-6)
        sys.stderr.write(f"\r[{bar:<{self.width}}] {frac * 100:5.1f}% "
                         f"{self.done / 1e6:9.1f}/{self.total / 1e6:.1f} MB "
                         f"{rate / 1e6:7.1f} MB/s  {self.label[:40]:<40}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            if self.drawn != self.done:
                self._draw(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()


def _disk_error(path: Path, exc: OSError) -> ConvertError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConvertError(f"disk full while writing {path} ({exc.strerror}); free space on "
                            f"{path.parent} or choose another OUT, then rerun with --resume")
    return ConvertError(f"cannot write {path}: {exc}")


def write_gguf(path: Path, out: OutFile, progress: Progress | None = None) -> Written:
    """Write `out` to `path` (via a temporary name); tensor offsets are absolute in the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    w = GGUFWriter(None, out.arch)
    if out.alignment != GGUF_DEFAULT_ALIGNMENT:
        w.add_custom_alignment(out.alignment)
    out.metadata(w)
    for t in out.tensors:
        # raw_dtype fixes the stored type; the placeholder numpy dtype is then ignored.
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.type)
    offsets = {}
    run_crc = None
    complete = False
    try:
        w.open_output_file(tmp)
        raw = w.fout[0]
        f = _HashingFile(raw)
        w.fout = [f]
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.write_padding(f, f.tell())
        f.start_run()
        for t in out.tensors:
            start = f.tell()
            f.tensor_crc = 0
            for chunk in t.chunks():
                n = f.write(chunk)
                if progress:
                    progress.update(n, out.rel)
            if f.tell() - start != t.nbytes:
                raise ConvertError(f"{path}: tensor {t.name} produced {f.tell() - start} bytes, "
                                   f"expected {t.nbytes}")
            offsets[t.name] = {"offset": start, "nbytes": t.nbytes, "crc32": f.tensor_crc}
            run_crc = f.run_crc   # the run ends with the last tensor, before its padding
            w.write_padding(f, t.nbytes, out.alignment)
        raw.flush()
        os.fsync(raw.fileno())
        size = f.tell()
        raw.close()
        os.replace(tmp, path)
        complete = True
    except OSError as exc:
        raise _disk_error(path, exc) from exc
    finally:
        if not complete:
            if w.fout:
                w.fout[0].close()
            tmp.unlink(missing_ok=True)
    return Written(rel=out.rel, bytes=size, sha256=f.sha.hexdigest(), tensors=offsets,
                   data_crc32=run_crc, header_crc32=f.head_crc)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(path, exc) from exc


def expert_out_file(rel: str, layer: int, expert: int, tensors) -> OutFile:
    """One expert shard (or its substitute): the `edgemoe.expert` header naming layer and expert,
    its tensors in one page-aligned run."""
    def add(w: GGUFWriter) -> None:
        w.add_uint32("edgemoe.format_version", FORMAT_VERSION)
        w.add_uint32("edgemoe.layer", layer)
        w.add_uint32("edgemoe.expert", expert)
    return OutFile(rel=rel, arch="edgemoe.expert", metadata=add, tensors=tuple(tensors),
                   alignment=ALIGNMENT, layer=layer, expert=expert)


def add_edgemoe_base_keys(w: GGUFWriter, expert_type: str, dense_type: str,
                          expert_layers: tuple[int, ...]) -> None:
    from gguf import GGUFValueType

    w.add_uint32("edgemoe.format_version", FORMAT_VERSION)
    w.add_string("edgemoe.expert_type", expert_type)
    w.add_string("edgemoe.dense_type", dense_type)
    w.add_key_value(EXPERT_LAYERS_KEY, list(expert_layers), GGUFValueType.ARRAY,
                    sub_type=GGUFValueType.UINT32)


# ---- a whole shard set --------------------------------------------------------------------------

def _our_files(out: Path) -> list[Path]:
    """Files a conversion writes into OUT (the only ones --force removes)."""
    names = [out / MANIFEST_FILE, out / BASE_FILE, out / JOURNAL_FILE]
    for sub in (EXPERTS_DIR, SUBSTITUTES_DIR):
        names += list((out / sub).glob("blk.*.gguf")) if (out / sub).is_dir() else []
        names += list(out.glob(f"{sub}/*{TMP_SUFFIX}"))
    names += list(out.glob("*" + TMP_SUFFIX))
    return [p for p in names if p.is_file()]


def _prepare_out(out: Path, resume: bool, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (resume or force):
        raise ConvertError(f"{out}: exists and is not empty; pass --resume to continue an "
                           "interrupted conversion or --force to overwrite it")
    if force and not resume:
        for p in _our_files(out):
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPERTS_DIR).mkdir(exist_ok=True)
    # Leftovers of a killed run are incomplete by construction.
    for p in list(out.glob("*" + TMP_SUFFIX)) + list(out.glob(f"{EXPERTS_DIR}/*{TMP_SUFFIX}")):
        p.unlink()


def _done_records(out: Path, fingerprint: str) -> dict[str, Written]:
    """Files an earlier run of the same plan finished (journal or manifest) and that still match."""
    records: dict[str, dict] = {}
    journal = out / JOURNAL_FILE
    if journal.is_file():
        lines = journal.read_text().splitlines()
        try:
            head = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            head = {}
        if head.get("fingerprint") == fingerprint:
            for line in lines[1:]:
                try:  # a line cut short by a kill is simply not trusted
                    rec = json.loads(line)
                    records[rec["rel"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
    manifest = out / MANIFEST_FILE
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            m = {}
        if isinstance(m, dict) and m.get("fingerprint") == fingerprint:
            try:
                base = m["base"]
                if "tensor_crc32" in base:  # sets written before checksums are rewritten
                    records[base["file"]] = {
                        "rel": base["file"], "bytes": base["bytes"], "sha256": base["sha256"],
                        "tensors": {n: {"crc32": c} for n, c in base["tensor_crc32"].items()},
                        "data_crc32": 0, "header_crc32": base["header_crc32"]}
                for rec in m["experts"]:
                    if "crc32" not in rec:
                        continue
                    tensors = {expert_tensor_name(rec["layer"], rec["expert"], proj):
                               {"offset": t["offset"], "nbytes": t["nbytes"]}
                               for proj, t in rec["tensors"].items()}
                    records[rec["file"]] = {"rel": rec["file"], "bytes": rec["bytes"],
                                            "sha256": rec["sha256"], "tensors": tensors,
                                            "data_crc32": rec["crc32"]}
            except (KeyError, TypeError, AttributeError):
                pass  # a damaged manifest: what it listed is written again
    done = {}
    for rel, rec in records.items():
        try:
            ok = (rec.get("data_crc32") is not None and rec.get("header_crc32") is not None
                  and check_file(out / rel, rec["bytes"], rec["sha256"]) is None)
        except (KeyError, TypeError, OSError):
            ok = False
        if ok:
            done[rel] = Written(rel=rel, bytes=rec["bytes"], sha256=rec["sha256"],
                                tensors=rec["tensors"], data_crc32=rec["data_crc32"],
                                header_crc32=rec.get("header_crc32"))
    return done


def base_entry(w: Written) -> dict:
    """The manifest's record of a written base.gguf (its checksums included)."""
    return {"file": w.rel, "bytes": w.bytes, "sha256": w.sha256, "header_crc32": w.header_crc32,
            "tensor_crc32": {name: t["crc32"] for name, t in w.tensors.items()}}


def _expert_entry(f: OutFile, w: Written) -> dict:
    tensors = {}
    for t in f.tensors:
        proj, ne = expert_tensor_key(t.name), list(reversed(t.shape))
        tensors[proj] = {"type": t.type.name, "ne": ne, "offset": w.tensors[t.name]["offset"],
                         "nbytes": t.nbytes}
    first, last = tensors[expert_tensor_key(f.tensors[0].name)], \
        tensors[expert_tensor_key(f.tensors[-1].name)]
    return {"layer": f.layer, "expert": f.expert, "file": f.rel, "bytes": w.bytes,
            "sha256": w.sha256, "data_offset": first["offset"],
            "data_bytes": last["offset"] + last["nbytes"] - first["offset"],
            "crc32": w.data_crc32, "tensors": tensors}


def write_shard_set(plan, out: Path, resume: bool = False, force: bool = False,
                    progress: bool = True) -> dict:
    """Write every file of `plan` (converters.plan.Plan) into `out`, then the manifest."""
    out = Path(out)
    _prepare_out(out, resume, force)
    done = _done_records(out, plan.fingerprint) if resume else {}
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    files = [plan.base, *plan.experts, *plan.substitutes]
    todo = [f for f in files if f.rel not in done]
    needed = sum(f.data_bytes + f.alignment * (len(f.tensors) + 2) for f in todo)
    free = shutil.disk_usage(out).free
    if needed > free:
        raise ConvertError(f"disk full: {out} has {free / 1e6:.1f} MB free, the conversion needs "
                           f"about {needed / 1e6:.1f} MB more")
    journal = out / JOURNAL_FILE
    try:
        with open(journal, "w") as j:
            j.write(json.dumps({"fingerprint": plan.fingerprint}) + "\n")
            for rec in done.values():
                j.write(json.dumps(rec.__dict__) + "\n")
    except OSError as exc:
        raise _disk_error(journal, exc) from exc
    bar = Progress(sum(f.data_bytes for f in todo), enabled=progress)
    written = dict(done)
    try:
        for f in todo:
            rec = write_gguf(out / f.rel, f, bar)
            written[f.rel] = rec
            try:
                with open(journal, "a") as j:
                    j.write(json.dumps(rec.__dict__) + "\n")
            except OSError as exc:
                raise _disk_error(journal, exc) from exc
    finally:
        bar.close()
    base = written[plan.base.rel]
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "arch": plan.arch,
        "source": plan.source, "fingerprint": plan.fingerprint,
        "n_layer": plan.hp.n_layer, "n_expert": plan.hp.n_expert,
        "n_expert_used": plan.hp.n_expert_used, "n_embd": plan.hp.n_embd,
        "n_ff_exp": plan.hp.n_ff_exp, "expert_layers": list(plan.hp.expert_layers),
        "expert_type": plan.expert_type, "dense_type": plan.dense_type,
        "expert_tensors": [expert_tensor_key(t.name) for t in plan.experts[0].tensors]
        if plan.experts else list(EXPERT_TENSORS),
        "fallbacks": list(plan.fallbacks),
        "base": base_entry(base),
        "experts": [_expert_entry(f, written[f.rel]) for f in plan.experts],
    }
    if plan.substitutes:
        manifest["substitute_type"] = plan.substitute_type
        subs = {(f.layer, f.expert): _expert_entry(f, written[f.rel]) for f in plan.substitutes}
        for entry in manifest["experts"]:
            sub = subs[(entry["layer"], entry["expert"])]
            entry["substitute"] = {k: v for k, v in sub.items() if k not in ("layer", "expert")}
    write_json_atomic(out / MANIFEST_FILE, seal_manifest(manifest))
    journal.unlink(missing_ok=True)
    return manifest

