"""Seeded fuzzing of shard sets through the real CLI paths.

Each case copies a good shard set, applies one mutation (a GGUF header field, a hyper-parameter,
a data byte, a truncation, a manifest edit, a link or special file, a swapped expert, a hostile
chat template) and runs `edgemoe run`, `edgemoe run --memory-budget 50% --policy ondemand` and,
every few cases, `verify` and `info` (template cases: `chat` and `run`). Every command runs in a
forked child of this process (the modules and libraries are loaded once) with an address-space
limit and a timeout; an audit hook and /proc/self/{maps,fd} record what it opened.

Outcome of one command, worst first:
  crash      killed by a signal (segfault, abort)
  hang       still running at the timeout
  blow-up    MemoryError / bad_alloc, or more than BLOWUP_BYTES resident
  escape     opened a file outside the shard set (the planted targets: outside/, /dev/zero)
  traceback  a Python traceback
  unclean    a failure that is not one line `edgemoe CMD: error: ...`
  silent     exit 0 with output that differs from the good set's
  clean      a one-line error, or exit 0 with the good set's output

    python tests/fuzz_shardset.py SHARDS --cases 10000 --seed 1 --work /tmp/fuzz
prints the table by mutation class; tests/test_fuzz.py runs a few hundred cases by default.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

OUTCOMES = ("crash", "hang", "blow-up", "escape", "traceback", "unclean", "silent", "clean")
BAD = frozenset(OUTCOMES[:6])
BLOWUP_BYTES = 1 << 30
AS_LIMIT = 4 << 30
TIMEOUT = 30.0
PROMPT = "ROMEO:"
CHAT_INPUT = b"Hello there.\nROMEO:\n"


# ---- an independent GGUF layout scanner (positions of every field, for the mutations) ------------

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class Layout:
    kvs: list = field(default_factory=list)       # dicts: key, key_pos, type_pos, vtype, value_pos, end
    tensors: list = field(default_factory=list)   # dicts: name, name_pos, ndims_pos, dims_pos, type_pos, offset_pos
    header_end: int = 0
    data_start: int = 0
    alignment: int = 32


def scan(data: bytes) -> Layout:
    lay = Layout()
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def string(p):
        n = struct.unpack_from("<Q", data, p)[0]
        return data[p + 8:p + 8 + n], p + 8 + n

    for _ in range(n_kv):
        key, p = string(pos)
        vtype = struct.unpack_from("<I", data, p)[0]
        kv = {"key": key.decode(), "key_pos": pos, "type_pos": p, "vtype": vtype, "value_pos": p + 4}
        p += 4
        if vtype == 8:
            _, p = string(p)
        elif vtype == 9:
            etype, count = struct.unpack_from("<IQ", data, p)
            kv.update(etype=etype, count=count, count_pos=p + 4, etype_pos=p)
            p += 12
            for _ in range(count):
                if etype == 8:
                    _, p = string(p)
                else:
                    p += _SIZES[etype]
        else:
            p += _SIZES[vtype]
        kv["end"] = p
        if kv["key"] == "general.alignment":
            lay.alignment = struct.unpack_from("<I", data, kv["value_pos"])[0]
        lay.kvs.append(kv)
        pos = p
    for _ in range(n_tensors):
        name, p = string(pos)
        ndims = struct.unpack_from("<I", data, p)[0]
        t = {"name": name.decode(), "name_pos": pos, "ndims_pos": p,
             "dims_pos": [p + 4 + 8 * i for i in range(ndims)]}
        p += 4 + 8 * ndims
        t["type_pos"], t["offset_pos"] = p, p + 4
        t["offset"] = struct.unpack_from("<Q", data, p + 4)[0]
        lay.tensors.append(t)
        pos = p + 12
    lay.header_end = pos
    lay.data_start = -(-pos // lay.alignment) * lay.alignment
    return lay


# ---- mutations ----------------------------------------------------------------------------------

def _patch(path: Path, pos: int, raw: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(raw)


def _flip_bit(path: Path, pos: int, bit: int) -> None:
    with open(path, "rb") as f:
        f.seek(pos)
        b = f.read(1)[0]
    _patch(path, pos, bytes([b ^ (1 << bit)]))


def _u64(rng) -> int:
    return rng.choice([0, 1, 2, 3, 7, 255, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                       2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1, rng.randrange(2**64)])


def _u32(rng) -> int:
    return rng.choice([0, 1, 2, 3, 5, 7, 8, 9, 12, 13, 31, 39, 40, 255, 65535, 2**31, 2**32 - 1,
                       rng.randrange(2**32)])


class Mutator:
    """The good set's layouts, and one function per mutation class."""

    def __init__(self, good: Path, outside: Path):
        self.good = good
        self.outside = outside
        self.manifest = json.loads((good / "manifest.json").read_text())
        self.base = (good / "base.gguf").read_bytes()
        self.base_layout = scan(self.base)
        first = self.manifest["experts"][0]["file"]
        self.expert_layout = scan((good / first).read_bytes())
        self.classes = {
            "GGUF header (base)": (20, self.base_header),
            "GGUF header (expert)": (8, self.expert_header),
            "KV semantics": (10, self.kv_semantics),
            "tensor data": (8, self.tensor_data),
            "truncate / append / empty": (8, self.truncate),
            "manifest syntax / keys / types / numbers": (16, self.manifest_values),
            "manifest offsets / sizes / ne": (8, self.manifest_offsets),
            "manifest edits on all experts": (4, self.manifest_all),
            "paths / links / special files": (8, self.paths),
            "swapped / missing expert files": (5, self.swapped),
            "chat templates": (5, self.chat_template),
        }

    def pick(self, rng) -> str:
        names = list(self.classes)
        return rng.choices(names, weights=[self.classes[n][0] for n in names])[0]

    # -- helpers --
    def _expert_path(self, case: Path, rng) -> Path:
        return case / rng.choice(self.manifest["experts"])["file"]

    def _header_fields(self, lay: Layout):
        """(position, width, label) of every header field worth mutating."""
        out = [(8, 8, "n_tensors"), (16, 8, "n_kv"), (4, 4, "version")]
        for kv in lay.kvs:
            out.append((kv["key_pos"], 8, f"key length of {kv['key']}"))
            out.append((kv["type_pos"], 4, f"type of {kv['key']}"))
            if kv["vtype"] == 8:
                out.append((kv["value_pos"], 8, f"string length of {kv['key']}"))
            elif kv["vtype"] == 9:
                out.append((kv["etype_pos"], 4, f"element type of {kv['key']}"))
                out.append((kv["count_pos"], 8, f"array count of {kv['key']}"))
            else:
                width = _SIZES[kv["vtype"]]
                out.append((kv["value_pos"], width, f"value of {kv['key']}"))
        for t in lay.tensors:
            out.append((t["name_pos"], 8, f"name length of {t['name']}"))
            out.append((t["ndims_pos"], 4, f"n_dims of {t['name']}"))
            for i, p in enumerate(t["dims_pos"]):
                out.append((p, 8, f"ne[{i}] of {t['name']}"))
            out.append((t["type_pos"], 4, f"type of {t['name']}"))
            out.append((t["offset_pos"], 8, f"offset of {t['name']}"))
        return out

    def _header(self, path: Path, lay: Layout, rng) -> str:
        mode = rng.random()
        if mode < 0.25:
            flips = rng.randint(1, 8)
            for _ in range(flips):
                pos = rng.randrange(lay.header_end)
                _flip_bit(path, pos, rng.randrange(8))
            return f"{flips} bit flip(s) in the header"
        if mode < 0.35:
            pos = rng.randrange(lay.header_end)
            n = rng.randint(1, 16)
            _patch(path, pos, rng.randbytes(n))
            return f"{n} random bytes at {pos}"
        pos, width, label = rng.choice(self._header_fields(lay))
        value = _u64(rng) if width == 8 else _u32(rng) if width == 4 else rng.randrange(256 ** width)
        value %= 256 ** width
        _patch(path, pos, value.to_bytes(width, "little"))
        return f"{label} = {value}"

    # -- classes --
    def base_header(self, case: Path, rng) -> str:
        return "base: " + self._header(case / "base.gguf", self.base_layout, rng)

    def expert_header(self, case: Path, rng) -> str:
        path = self._expert_path(case, rng)
        return f"{path.name}: " + self._header(path, self.expert_layout, rng)

    def kv_semantics(self, case: Path, rng) -> str:
        path = case / "base.gguf"
        kvs = {kv["key"]: kv for kv in self.base_layout.kvs}
        numeric = [kv for kv in self.base_layout.kvs if kv["vtype"] in _SIZES]
        choice = rng.random()
        if choice < 0.6:
            kv = rng.choice(numeric)
            width = _SIZES[kv["vtype"]]
            if kv["vtype"] in (6, 12):
                value = rng.choice([0.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-30,
                                    1e30, 5e-324])
                raw = struct.pack("<f" if width == 4 else "<d", value)
            else:
                value = rng.choice([0, 1, 2, 3, 7, 8, 9, 47, 49, 64, 96, 2**15, 2**16, 2**31 - 1,
                                    2**31, 2**32 - 1, rng.randrange(256 ** width)]) % 256 ** width
                raw = value.to_bytes(width, "little")
            _patch(path, kv["value_pos"], raw)
            return f"{kv['key']} = {value}"
        if choice < 0.75:
            kv = rng.choice(numeric)
            new = rng.choice([t for t in _SIZES if _SIZES[t] == _SIZES[kv["vtype"]]] + [8, 9])
            _patch(path, kv["type_pos"], struct.pack("<I", new))
            return f"type of {kv['key']} {kv['vtype']} -> {new}"
        if choice < 0.85 and "edgemoe.expert_layers" in kvs:
            kv = kvs["edgemoe.expert_layers"]
            i = rng.randrange(kv["count"])
            value = rng.choice([0, 3, 4, 5, 2**31, 2**32 - 1])
            _patch(path, kv["value_pos"] + 12 + 4 * i, struct.pack("<I", value))
            return f"edgemoe.expert_layers[{i}] = {value}"
        # a string: bytes that are not UTF-8, or another architecture of the same length
        strings = [kv for kv in self.base_layout.kvs if kv["vtype"] == 8]
        kv = rng.choice(strings)
        n = struct.unpack_from("<Q", self.base, kv["value_pos"])[0]
        if n == 0:
            return f"{kv['key']} is empty (unchanged)"
        start = kv["value_pos"] + 8
        if rng.random() < 0.5:
            pos = start + rng.randrange(n)
            _patch(path, pos, bytes([rng.choice([0x80, 0xc3, 0xff, 0xfe, 0xed])]))
            return f"{kv['key']}: byte {pos - start} not UTF-8"
        other = rng.choice(["llama", "qwen2moe", "olmoe", "bert", "granitemoe", "gpt-oss"])
        raw = (other.encode() * n)[:n]
        _patch(path, start, raw)
        return f"{kv['key']} = {raw[:20]!r}"

    def tensor_data(self, case: Path, rng) -> str:
        if rng.random() < 0.5:
            path = case / "base.gguf"
            lo = self.base_layout.data_start
        else:
            path = self._expert_path(case, rng)
            entry = next(e for e in self.manifest["experts"] if case / e["file"] == path)
            lo = entry["data_offset"]
        size = path.stat().st_size
        pos = rng.randrange(lo, size)
        _flip_bit(path, pos, rng.randrange(8))
        return f"{path.name}: bit flip at {pos} (data section starts at {lo})"

    def truncate(self, case: Path, rng) -> str:
        target = rng.choice(["base.gguf", "manifest.json", "expert"])
        path = self._expert_path(case, rng) if target == "expert" else case / target
        size = path.stat().st_size
        mode = rng.choice(["cut", "cut", "append", "empty"])
        if mode == "cut":
            n = rng.choice([1, 4, 24, rng.randrange(size)])
            with open(path, "r+b") as f:
                f.truncate(max(0, size - n) if rng.random() < 0.5 else n)
            return f"{path.name} truncated ({size} -> {path.stat().st_size})"
        if mode == "append":
            with open(path, "ab") as f:
                f.write(rng.randbytes(rng.choice([1, 100, 4096])))
            return f"{path.name}: bytes appended"
        path.write_bytes(b"")
        return f"{path.name} emptied"

    def _write_manifest(self, case: Path, m, seal: bool) -> None:
        from edgemoe.shardset import seal_manifest

        if seal and isinstance(m, dict):
            m = seal_manifest(m)
        (case / "manifest.json").write_text(json.dumps(m))

    def manifest_values(self, case: Path, rng) -> str:
        text = (case / "manifest.json").read_text()
        mode = rng.random()
        if mode < 0.15:  # syntax: drop / insert / change characters
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(len(text))
                op = rng.randrange(3)
                text = (text[:pos] + text[pos + 1:] if op == 0 else
                        text[:pos] + rng.choice('{}[]",:0-9e.') + text[pos:] if op == 1 else
                        text[:pos] + rng.choice('{}[]",:0-9e.x') + text[pos + 1:])
            (case / "manifest.json").write_text(text)
            return "syntax edit"
        if mode < 0.2:
            depth = rng.choice([100, 1000, 100000])
            (case / "manifest.json").write_text("[" * depth + "]" * depth)
            return f"nested {depth} deep"
        m = json.loads(text)
        # a random path into the manifest
        obj, keyp = m, []
        while True:
            if isinstance(obj, dict) and obj:
                k = rng.choice(list(obj))
            elif isinstance(obj, list) and obj:
                k = rng.randrange(len(obj))
            else:
                break
            keyp.append(k)
            if not isinstance(obj[k], (dict, list)) or rng.random() < 0.3:
                break
            obj = obj[k]
        if not keyp:
            return "nothing to edit"
        parent = m
        for k in keyp[:-1]:
            parent = parent[k]
        k = keyp[-1]
        old = parent[k]
        op = rng.random()
        if op < 0.15 and isinstance(parent, dict):
            del parent[k]
            what = "removed"
        else:
            new = rng.choice([None, True, -1, 0, 1, 2**64, -2**63, 1.5, float("nan"), "x", "",
                              [], {}, [1, 2], "../../etc/passwd", "/dev/zero", 10**5000 if
                              rng.random() < 0.1 else 3,
                              (old * 2 if isinstance(old, int) and not isinstance(old, bool) else 7),
                              (old + 1 if isinstance(old, int) and not isinstance(old, bool) else 8)])
            try:
                parent[k] = new
            except TypeError:
                return "nothing to edit"
            what = ("= a 5001-digit integer" if isinstance(new, int) and new > 10**4000
                    else f"= {str(new)[:30]}")
        seal = rng.random() < 0.7
        # a 5000-digit integer: written with Python's digit limit lifted for this write only (the
        # runtime reads with the limit in place, as a user's process would)
        limit = sys.get_int_max_str_digits()
        sys.set_int_max_str_digits(0)
        try:
            self._write_manifest(case, m, seal)
        finally:
            sys.set_int_max_str_digits(limit)
        return f"{'/'.join(map(str, keyp))} {what}" + (" (sealed)" if seal else "")

    def manifest_offsets(self, case: Path, rng) -> str:
        m = json.loads((case / "manifest.json").read_text())
        e = rng.choice(m["experts"])
        proj = rng.choice(["ffn_gate", "ffn_up", "ffn_down"])
        key = rng.choice(["offset", "nbytes", "ne", "data_offset", "data_bytes", "bytes",
                          "type", "crc32", "layer", "expert"])
        if key in ("offset", "nbytes"):
            t = e["tensors"][proj]
            t[key] = rng.choice([0, 100, -1, 4096, t[key] - 4096, t[key] + 4096, t[key] * 2,
                                 2**63, e["data_offset"]])
            what = f"{proj}.{key} = {t[key]}"
        elif key == "ne":
            t = e["tensors"][proj]
            t["ne"] = rng.choice([[t["ne"][1], t["ne"][0]], [t["ne"][0]], [0, 0], [-1, 5],
                                  [float(t["ne"][0]), float(t["ne"][1])], [t["ne"][0], 2**40],
                                  t["ne"] + [1], [t["ne"][0] * 2, t["ne"][1] // 2]])
            what = f"{proj}.ne = {t['ne']}"
        elif key == "type":
            e["tensors"][proj]["type"] = rng.choice(["Q8_0", "F32", "I32", "Q4_K", "F64", "XX"])
            what = f"{proj}.type = {e['tensors'][proj]['type']}"
        else:
            old = e[key]
            e[key] = rng.choice([-1, 0, 1, old + 1, old - 1, old + 4096, old * 2, 2**62])
            what = f"{key} = {e[key]}"
        self._write_manifest(case, m, seal=True)
        return f"blk.{e.get('layer')}.{e.get('expert')} {what} (sealed)"

    def manifest_all(self, case: Path, rng) -> str:
        m = json.loads((case / "manifest.json").read_text())
        op = rng.randrange(5)
        for e in m["experts"]:
            for t in e["tensors"].values():
                if op == 0:
                    t["type"] = "Q8_0"
                elif op == 1:
                    t["ne"] = list(reversed(t["ne"]))
                elif op == 2:
                    t["offset"] += 4096
            if op == 3:
                e["crc32"] = 0
        if op == 4:
            m["n_embd"], m["n_ff_exp"] = m["n_ff_exp"], m["n_embd"]
            for e in m["experts"]:
                for t in e["tensors"].values():
                    t["ne"] = list(reversed(t["ne"]))
        self._write_manifest(case, m, seal=True)
        return ["all types Q8_0", "all ne reversed", "all offsets +4096", "all crc32 0",
                "n_embd/n_ff_exp swapped with every ne"][op] + " (sealed)"

    def paths(self, case: Path, rng) -> str:
        op = rng.randrange(10)
        target = rng.choice(["base.gguf", "manifest.json", "experts", "expert"])
        path = self._expert_path(case, rng) if target == "expert" else case / target
        outside_copy = self.outside / ("copy-" + path.name)
        if op <= 2:  # a link to a file outside the set (an identical copy), /dev/zero, a pipe
            dest = [outside_copy, Path("/dev/zero"), self.outside / "fifo"][op]
            if path.is_dir():
                shutil.rmtree(path)
                dest = self.outside / "experts-copy" if op == 0 else dest
            else:
                path.unlink()
            path.symlink_to(dest)
            return f"{path.relative_to(case)} -> {dest}"
        if op == 3:  # a directory in place of a file (or a file for experts/)
            if path.is_dir():
                shutil.rmtree(path)
                path.write_bytes(b"not a directory")
            else:
                path.unlink()
                path.mkdir()
            return f"{path.relative_to(case)} replaced by the other kind"
        if op == 4:
            if path.is_dir():
                return "pipe for a directory (skipped)"
            path.unlink()
            os.mkfifo(path)
            return f"{path.relative_to(case)} is a named pipe"
        if op == 5:  # a link loop
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            path.symlink_to(path.name)
            return f"{path.relative_to(case)} links to itself"
        # manifest paths that leave the set (sealed, so only the path check stands)
        m = json.loads((case / "manifest.json").read_text())
        e = rng.choice(m["experts"]) if rng.random() < 0.7 else m["base"]
        e["file"] = rng.choice([str(outside_copy), "../outside/copy-base.gguf", "/dev/zero",
                                "experts/../../outside/copy-base.gguf", "x" * 5000,
                                "experts/" + "a/" * 3000 + "b.gguf", "", ".", "experts",
                                "base.gguf\x00.gguf"])
        self._write_manifest(case, m, seal=True)
        return f"file = {e['file'][:40]!r} (sealed)"

    def swapped(self, case: Path, rng) -> str:
        entries = self.manifest["experts"]
        a, b = rng.sample(entries, 2)
        pa, pb = case / a["file"], case / b["file"]
        op = rng.randrange(3)
        if op == 0:
            tmp = pa.with_suffix(".swap")
            pa.rename(tmp)
            pb.rename(pa)
            tmp.rename(pb)
            return f"{pa.name} <-> {pb.name}"
        if op == 1:
            shutil.copyfile(pb, pa)
            return f"{pb.name} copied over {pa.name}"
        pa.unlink()
        return f"{pa.name} removed"

    TEMPLATES = [
        "{{ 'a' * 10**10 }}",
        "{{ 'ab' * 50000000 }}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% for i in range(10**9) %}x{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% include 'other.jinja' %}",
        "{% import 'x' as y %}{{ y }}",
        "{% extends 'base.html' %}",
        "{{ messages.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ 9 ** 9 ** 9 }}",
        "{% set x = [1] %}{% for i in range(20) %}{% set x = x + x %}{% endfor %}{{ x|length }}",
        "{{ raise_exception('no') }}",
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
        "{{ messages[0]['content'] | upper }}{{ undefined_name.attr }}",
        "{% for m in messages %}{{ m.content * 1000 }}{% endfor %}",
        "{{ range(100000) | list | join(',') }}{{ range(100000) | list | join(',') }}",
        "{% if %}",
        "{{ cycler(1,2).next() }}{{ joiner()() }}{{ namespace(a=1).a }}",
        "x" * 200000,
    ]

    def chat_template(self, case: Path, rng) -> str:
        """Rewrite base.gguf with another tokenizer.chat_template (the data section moves with the
        header; the manifest records the new size, hashes and header crc, sealed)."""
        import hashlib
        import zlib

        kv = next(kv for kv in self.base_layout.kvs if kv["key"] == "tokenizer.chat_template")
        if rng.random() < 0.8:
            text = rng.choice(self.TEMPLATES).encode()
        else:
            text = rng.randbytes(rng.randint(1, 64))
        data = self.base
        lay = self.base_layout
        head = (data[:kv["value_pos"]] + struct.pack("<Q", len(text)) + text
                + data[kv["end"]:lay.header_end])
        pad = -len(head) % lay.alignment
        new = head + b"\0" * pad + data[lay.data_start:]
        (case / "base.gguf").write_bytes(new)
        m = json.loads((case / "manifest.json").read_text())
        m["base"].update(bytes=len(new), sha256=hashlib.sha256(new).hexdigest())
        if "header_crc32" in m["base"]:
            m["base"]["header_crc32"] = zlib.crc32(new[:len(head) + pad])
        self._write_manifest(case, m, seal=True)
        return f"chat template {text[:40]!r}"


# ---- running one command in a forked child -------------------------------------------------------

@dataclass
class Result:
    case: int
    klass: str
    what: str
    command: str
    outcome: str
    detail: str = ""


def _child(argv, stdin_path, out_path, err_path, forbidden, report_path):
    try:
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
        for fd, path, flags in ((0, stdin_path, os.O_RDONLY),
                                (1, out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            f = os.open(path, flags, 0o644)
            os.dup2(f, fd)
            os.close(f)
        # fresh streams on the new descriptors (pytest replaces sys.stdin/stdout with its own)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        opened = []

        def hook(event, args):
            if event == "open" and args and isinstance(args[0], (str, bytes)):
                p = os.fsdecode(args[0])
                if any(p.startswith(x) for x in forbidden):
                    opened.append(p)
        sys.addaudithook(hook)
        from edgemoe.cli import main

        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        # what C code opened and still holds, or mapped
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if any(target.startswith(x) for x in forbidden):
                opened.append(target)
        with open("/proc/self/maps") as maps:
            for line in maps:
                mapped = " ".join(line.split()[5:])
                # a shared anonymous mapping shows as "/dev/zero (deleted)": not an open
                if mapped != "/dev/zero (deleted)" and any(mapped.startswith(x) for x in forbidden):
                    opened.append(mapped)
        if opened:
            with open(report_path, "w") as f:
                f.write("\n".join(opened))
        os._exit(int(rc or 0) & 0xff)
    except BaseException:  # noqa: BLE001 - reported as a traceback by the parent
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(70)


def run_command(argv, workdir: Path, stdin: bytes, forbidden, timeout=TIMEOUT):
    """(returncode or -signal or None on timeout, stdout, stderr, maxrss bytes, opened)."""
    stdin_path, out_path = workdir / "stdin", workdir / "stdout"
    err_path, report = workdir / "stderr", workdir / "opened"
    stdin_path.write_bytes(stdin)
    report.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(argv, stdin_path, out_path, err_path, forbidden, report)
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        got, status, usage = os.wait4(pid, os.WNOHANG)
        if got:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            rc = None
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    else:
        rc = None
    if got:
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    opened = report.read_text().splitlines() if report.exists() else []
    return (rc, out_path.read_bytes(), err_path.read_bytes(), usage.ru_maxrss * 1024, opened)


def classify(cmd: str, rc, out: bytes, err: bytes, maxrss: int, opened, reference: bytes | None,
             output_may_differ: bool) -> tuple[str, str]:
    text = err.decode("utf-8", "replace")
    if rc is None:
        return "hang", ""
    if rc < 0:
        return "crash", f"signal {-rc}: {text[-300:]}"
    if maxrss > BLOWUP_BYTES or "MemoryError" in text or "bad_alloc" in text:
        return "blow-up", f"{maxrss >> 20} MiB: {text[-200:]}"
    if opened:
        return "escape", "; ".join(opened[:3])
    if "Traceback" in text or b"Traceback" in out:
        return "traceback", text[-600:]
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith("edgemoe: warning:")]
    if rc == 0:
        if cmd == "chat":
            return "clean", ""
        if reference is not None and out != reference and not output_may_differ:
            return "silent", out[-120:].decode("utf-8", "replace")
        return "clean", ""
    verb = cmd.split()[0]
    if cmd == "chat":   # a failed turn prints "error: ..." in the conversation; the exit says so
        return "clean", ""
    if len(lines) == 1 and lines[0].startswith(f"edgemoe {verb}: error: "):
        return "clean", ""
    return "unclean", text[-400:]


# ---- the campaign -------------------------------------------------------------------------------

COMMANDS = {
    "run": ["run", "{set}", "-p", PROMPT, "-n", "6", "--temp", "0", "-t", "1", "-c", "256"],
    "run ondemand": ["run", "{set}", "-p", PROMPT, "-n", "6", "--temp", "0", "-t", "1", "-c",
                     "256", "--memory-budget", "50%", "--policy", "ondemand"],
    "verify": ["verify", "{set}"],
    "info": ["info", "{set}"],
    "chat": ["chat", "{set}", "-n", "4", "--temp", "0", "-t", "1", "-c", "256"],
}


def _argv(cmd: str, case: Path) -> list[str]:
    return [case.as_posix() if a == "{set}" else a for a in COMMANDS[cmd]]


def _normal(out: bytes, case: Path) -> bytes:
    return out.replace(str(case).encode(), b"<SET>")


class Campaign:
    def __init__(self, good: Path, work: Path, seed: int, timeout: float = TIMEOUT):
        self.good, self.work, self.seed, self.timeout = Path(good), Path(work), seed, timeout
        self.work.mkdir(parents=True, exist_ok=True)
        self.outside = self.work / "outside"
        if self.outside.exists():
            shutil.rmtree(self.outside)
        self.outside.mkdir()
        # the planted targets: copies of the set's own files (so a followed link would "work")
        shutil.copyfile(self.good / "base.gguf", self.outside / "copy-base.gguf")
        shutil.copyfile(self.good / "manifest.json", self.outside / "copy-manifest.json")
        shutil.copytree(self.good / "experts", self.outside / "experts-copy")
        for p in (self.good / "experts").iterdir():
            shutil.copyfile(p, self.outside / ("copy-" + p.name))
        os.mkfifo(self.outside / "fifo")
        self.forbidden = (str(self.outside), "/dev/zero")
        self.mutator = Mutator(self.good, self.outside)
        self.scratch = self.work / "io"
        self.scratch.mkdir(exist_ok=True)
        _preload()
        self.reference = {}
        ref = self.work / "reference"
        if ref.exists():
            shutil.rmtree(ref)
        shutil.copytree(self.good, ref)
        for cmd in COMMANDS:
            rc, out, err, _, _ = run_command(_argv(cmd, ref), self.scratch,
                                             CHAT_INPUT if cmd == "chat" else b"", self.forbidden,
                                             self.timeout)
            if rc != 0:
                raise RuntimeError(f"the good set fails `{cmd}`: {err.decode()[-500:]}")
            self.reference[cmd] = _normal(out, ref)

    def case(self, i: int) -> list[Result]:
        rng = random.Random(f"{self.seed}:{i}")
        klass = self.mutator.pick(rng)
        case = self.work / "case"
        if case.exists() or case.is_symlink():
            shutil.rmtree(case)
        shutil.copytree(self.good, case)
        try:
            what = self.mutator.classes[klass][1](case, rng)
        except Exception as exc:  # noqa: BLE001 - a harness bug, not a finding: say so
            raise RuntimeError(f"case {i} ({klass}): mutation failed: {exc!r}") from exc
        if klass == "chat templates":
            cmds = ["chat", "run"]
        else:
            cmds = ["run", "run ondemand"] + (["verify", "info"] if i % 5 == 0 else [])
        results = []
        for cmd in cmds:
            rc, out, err, rss, opened = run_command(
                _argv(cmd, case), self.scratch, CHAT_INPUT if cmd == "chat" else b"",
                self.forbidden, self.timeout)
            outcome, detail = classify(cmd, rc, _normal(out, case), err, rss, opened,
                                       self.reference.get(cmd),
                                       output_may_differ=klass == "chat templates")
            results.append(Result(i, klass, what, cmd, outcome, detail))
        return results


def _preload() -> None:
    """Import what every child needs once, in the parent (no backend is started here)."""
    import edgemoe.cli  # noqa: F401
    import edgemoe.cli_run  # noqa: F401
    import edgemoe.engine  # noqa: F401
    import edgemoe.api  # noqa: F401
    import edgemoe.tokenizer  # noqa: F401
    import converters.cli  # noqa: F401
    import jinja2.sandbox  # noqa: F401
    from edgemoe import _lib

    _lib.llama()


def table(results: list[Result]) -> str:
    """Worst outcome per case, counted by mutation class."""
    worst: dict[int, Result] = {}
    for r in results:
        if r.case not in worst or OUTCOMES.index(r.outcome) < OUTCOMES.index(worst[r.case].outcome):
            worst[r.case] = r
    rows: dict[str, Counter] = defaultdict(Counter)
    for r in worst.values():
        rows[r.klass][r.outcome] += 1
    head = "| class | cases | " + " | ".join(OUTCOMES) + " |"
    lines = [head, "|" + "---|" * (len(OUTCOMES) + 2)]
    total = Counter()
    for klass in sorted(rows):
        c = rows[klass]
        total.update(c)
        lines.append(f"| {klass} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES)
                     + " |")
    lines.append(f"| total | {sum(total.values())} | " + " | ".join(str(total[o]) for o in OUTCOMES)
                 + " |")
    runs = len(results)
    return "\n".join(lines) + f"\n({runs} command runs)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards", type=Path, help="a good shard set (e.g. the bundled model converted)")
    p.add_argument("--cases", type=int, default=300)
    p.add_argument("--first", type=int, default=0, help="index of the first case")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/edgemoe-fuzz"))
    p.add_argument("--log", type=Path, default=None, help="JSON lines of every non-clean result")
    p.add_argument("--timeout", type=float, default=TIMEOUT)
    p.add_argument("--results", type=Path, default=None,
                   help="JSON lines of every command run (appended; cases already in it are "
                   "skipped, so an interrupted campaign resumes)")
    p.add_argument("--skip", type=Path, nargs="+", default=[], metavar="RESULTS",
                   help="also skip the cases these result files hold (a campaign re-split over "
                   "more processes)")
    p.add_argument("--table", type=Path, nargs="+", default=None, metavar="RESULTS",
                   help="print the table of --results files and exit")
    args = p.parse_args(argv)
    if args.table:
        rows = [Result(**json.loads(line)) for path in args.table
                for line in path.read_text().splitlines() if line.strip()]
        print(table(rows))
        return 1 if any(r.outcome in BAD for r in rows) else 0
    finished = set()
    for path in [args.results, *args.skip]:
        if path and path.exists():
            finished |= {json.loads(line)["case"] for line in path.read_text().splitlines()
                         if line.strip()}
    campaign = Campaign(args.shards, args.work, args.seed, args.timeout)
    results = []
    log = open(args.log, "a") if args.log else None
    every = open(args.results, "a") if args.results else None
    start = time.monotonic()
    for i in range(args.first, args.first + args.cases):
        if i in finished:
            continue
        rs = campaign.case(i)
        results.extend(rs)
        for r in rs:
            if r.outcome != "clean" and log:
                log.write(json.dumps(r.__dict__) + "\n")
                log.flush()
            if every:
                every.write(json.dumps(r.__dict__) + "\n")
        if every:
            every.flush()
        done = i - args.first + 1
        if done % 100 == 0:
            bad = sum(r.outcome in BAD for r in results)
            print(f"{done} cases, {len(results)} runs, {bad} bad, "
                  f"{time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    print(table(results))
    return 1 if any(r.outcome in BAD for r in results) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
