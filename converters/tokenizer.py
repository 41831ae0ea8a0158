"""Carry a Hugging Face checkpoint's tokenizer into GGUF metadata (tokenizer.ggml.*, chat template).

Two tokenizer families cover the MoE checkpoints we convert:
- byte-level BPE (GGUF tokenizer model "gpt2": Qwen2/3-MoE, OLMoE, Llama-3 style). llama.cpp runs
  the merges itself but needs to be told which pre-tokenizer (the regex that splits text into
  words before merging) the model was trained with: `tokenizer.ggml.pre`. Two ways find it, in
  this order: llama.cpp's own, the sha256 of the token ids the tokenizer gives a fixed probe text
  (identifies published models exactly, e.g. DeepSeek's, whose pre-tokenizer is a chain of
  splits; needs the `tokenizers` library to run the tokenizer); and ours, matching the
  tokenizer.json pre-tokenizer's regexes against the ones llama.cpp implements (identifies any
  tokenizer trained with a known pre-tokenizer, our tiny test models included).
- SentencePiece (GGUF tokenizer model "llama": Mixtral, Llama-2): pieces, scores and piece types,
  read from tokenizer.json (HF's BPE-with-byte-fallback form) or, without it, from the
  tokenizer.model protobuf.

Only json/gguf besides the optional `tokenizers` for the probe: no transformers or sentencepiece.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import gguf

from edgemoe.errors import ConvertError

# Pre-tokenizer regexes exactly as tokenizer.json spells them, under the name llama.cpp gives the
# pre-tokenizer it implements for them (src/llama-vocab.cpp adapts each to its own regex engine).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LETTERS_CASED = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{c}"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{c}"
)
PRE_TOKENIZER_REGEXES: dict[str, str] = {
    "llama-bpe": _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen35": _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "seed-coder": _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-4o": _LETTERS_CASED.replace("{c}", _CONTRACTIONS + "?")
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "tekken": _LETTERS_CASED.replace("{c}", "")
    + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}

# A pre-tokenizer reduced to its steps: ("split", regex), ("gpt2",) for ByteLevel's built-in GPT-2
# regex, ("digits", individual). ByteLevel without its regex only maps bytes, so it adds no step.
_GPT2_STEP = ("gpt2",)
_KNOWN_PRE_TOKENIZERS: dict[tuple[tuple[Any, ...], ...], str] = {
    (_GPT2_STEP,): "gpt-2",
    (("digits", True), _GPT2_STEP): "starcoder",
    **{(("split", regex),): name for name, regex in PRE_TOKENIZER_REGEXES.items()},
}

# llama.cpp's converter names a published tokenizer's pre-tokenizer by the sha256 of str(ids), ids
# being what the tokenizer (with its specials, e.g. BOS) makes of this text (convert_hf_to_gguf.py,
# get_vocab_base_pre). The text and the digests below are llama.cpp's, so that we name the same
# models the same way.
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d"
    "\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 "
    "33333 333333 3333333 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796"
    "\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1"
    "314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b"
    "\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been "
    "'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'"
    "Ve a'lL")
PRE_TOKENIZER_DIGESTS: dict[str, str] = {
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
}

# Tokens that close a chat turn; when the chat template uses one, it is the EOT token (llama.cpp
# otherwise guesses among such names in hash order, which is ambiguous when several exist).
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE_MARK = "\u2581"  # "▁", SentencePiece's escaped space


@dataclasses.dataclass(frozen=True)
class TokenizerMetadata:
    """Everything `add_tokenizer` writes; read from a checkpoint by `read_tokenizer`."""

    model: str                      # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str                        # tokenizer.ggml.pre
    tokens: tuple[str, ...]         # (n_vocab,)
    token_types: tuple[int, ...]    # (n_vocab,) gguf.TokenType values
    scores: tuple[float, ...] | None  # (n_vocab,) SentencePiece only
    merges: tuple[str, ...] | None  # "left right" pairs by rank; BPE only
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eot_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None   # SentencePiece only
    remove_extra_whitespaces: bool | None
    chat_template: str | None

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path) -> None:
    """Write the tokenizer of the checkpoint in `model_dir` into `writer`'s metadata."""
    write_tokenizer(writer, read_tokenizer(Path(model_dir)))


def write_tokenizer(writer: gguf.GGUFWriter, meta: TokenizerMetadata) -> None:
    writer.add_tokenizer_model(meta.model)
    writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(list(meta.tokens))
    writer.add_token_types(list(meta.token_types))
    if meta.scores is not None:
        writer.add_token_scores(list(meta.scores))
    if meta.merges is not None:
        writer.add_token_merges(list(meta.merges))
    for token_id, add in (
        (meta.bos_id, writer.add_bos_token_id),
        (meta.eos_id, writer.add_eos_token_id),
        (meta.unk_id, writer.add_unk_token_id),
        (meta.pad_id, writer.add_pad_token_id),
        (meta.eot_id, writer.add_eot_token_id),
    ):
        if token_id is not None:
            add(token_id)
    # Always explicit: llama.cpp's defaults differ per tokenizer model (SentencePiece adds BOS).
    writer.add_add_bos_token(meta.add_bos)
    writer.add_add_eos_token(meta.add_eos)
    if meta.add_space_prefix is not None:
        writer.add_add_space_prefix(meta.add_space_prefix)
    if meta.remove_extra_whitespaces is not None:
        writer.add_remove_extra_whitespaces(meta.remove_extra_whitespaces)
    if meta.chat_template is not None:
        writer.add_chat_template(meta.chat_template)


def read_tokenizer(model_dir: Path) -> TokenizerMetadata:
    """Read tokenizer.json (or tokenizer.model) and tokenizer_config.json from a checkpoint dir."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json", required=False)
    tok_config = _read_json(model_dir / "tokenizer_config.json", required=False)
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        vocab = _vocab_from_tokenizer_json(tokenizer_json, _read_json(tokenizer_json, required=True))
    elif (model_dir / "tokenizer.model").is_file():
        vocab = _vocab_from_sentencepiece_model(model_dir / "tokenizer.model")
        vocab = _with_added_tokens(vocab, model_dir / "tokenizer_config.json", tok_config)
    else:
        raise ConvertError(f"{model_dir}: no tokenizer.json or tokenizer.model")
    return _finish(model_dir, vocab, config, tok_config)


# --- reading files --------------------------------------------------------------------------------

def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ConvertError(f"{path}: file not found")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


@dataclasses.dataclass(frozen=True)
class _Vocab:
    """The tokenizer proper, before the checkpoint's configs add specials and the template."""

    model: str
    pre: str
    pieces: dict[int, str]          # id -> token text (may have gaps up to the model's vocab size)
    types: dict[int, int]           # id -> gguf.TokenType
    scores: dict[int, float] | None
    merges: tuple[str, ...] | None
    add_space_prefix: bool | None
    remove_extra_whitespaces: bool | None
    post_bos: str | None            # token the post-processor puts first / last, if any
    post_eos: str | None


def _vocab_from_tokenizer_json(path: Path, data: dict[str, Any]) -> _Vocab:
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise ConvertError(f"{path}: key 'model.vocab' missing or not an object")
    if model.get("type", "BPE") != "BPE":
        raise ConvertError(
            f"{path}: tokenizer model type {model.get('type')!r} is not supported (expected 'BPE': "
            "byte-level BPE or SentencePiece-style BPE with byte fallback)"
        )
    pieces: dict[int, str] = {}
    for text, token_id in model["vocab"].items():
        if not isinstance(token_id, int) or token_id < 0:
            raise ConvertError(f"{path}: key 'model.vocab': token {text!r} has invalid id {token_id!r}")
        pieces[token_id] = text
    types = {token_id: int(gguf.TokenType.NORMAL) for token_id in pieces}

    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        raise ConvertError(f"{path}: key 'added_tokens' is not a list")
    for entry in added:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or not isinstance(entry.get("content"), str):
            raise ConvertError(f"{path}: key 'added_tokens': entry {entry!r} lacks an integer 'id' and a 'content'")
        pieces[entry["id"]] = entry["content"]
        types[entry["id"]] = int(gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED)

    bos, eos = _post_processor_specials(data.get("post_processor"))
    pre_tokenizer = data.get("pre_tokenizer")
    if _has_byte_level(pre_tokenizer):
        return _Vocab(
            model="gpt2", pre=_detect_pre(path, pre_tokenizer), pieces=pieces, types=types, scores=None,
            merges=_merges(path, model.get("merges")), add_space_prefix=None, remove_extra_whitespaces=None,
            post_bos=bos, post_eos=eos,
        )
    if (
        model.get("byte_fallback")
        or _has_space_mark(data.get("normalizer"), "normalizers")
        or _has_space_mark(pre_tokenizer, "pretokenizers")
    ):
        return _spm_from_bpe(path, data, model, pieces, types, bos, eos)
    raise ConvertError(
        f"{path}: BPE without a ByteLevel pre-tokenizer nor SentencePiece-style byte fallback / '▁' "
        "spaces is not supported"
    )


def _components(node: Any, list_key: str) -> list[dict[str, Any]]:
    """Flatten a (possibly nested) tokenizers Sequence of normalizers / pre-tokenizers."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [c for child in node.get(list_key) or [] for c in _components(child, list_key)]
    return [node]


def _has_byte_level(pre_tokenizer: Any) -> bool:
    return any(c.get("type") == "ByteLevel" for c in _components(pre_tokenizer, "pretokenizers"))


def _has_space_mark(node: Any, list_key: str) -> bool:
    """Whether a normalizer / pre-tokenizer writes spaces as SentencePiece's "▁"."""
    return any(
        c.get("type") == "Metaspace" or (c.get("type") == "Replace" and c.get("content") == _SPACE_MARK)
        for c in _components(node, list_key)
    )


def probe_digest(path: Path) -> str | None:
    """llama.cpp's identity of a tokenizer.json: sha256 of str(ids of PRE_TOKENIZER_PROBE), or
    None when the `tokenizers` library is absent or cannot load the file."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        ids = Tokenizer.from_file(str(path)).encode(PRE_TOKENIZER_PROBE).ids
    except Exception:  # noqa: BLE001 - its errors are plain Exceptions; the checks below explain
        return None
    return hashlib.sha256(str(ids).encode()).hexdigest()


def _detect_pre(path: Path, pre_tokenizer: Any) -> str:
    digest = probe_digest(path)
    if digest in PRE_TOKENIZER_DIGESTS:
        return PRE_TOKENIZER_DIGESTS[digest]
    steps: list[tuple[Any, ...]] = []
    for c in _components(pre_tokenizer, "pretokenizers"):
        kind = c.get("type")
        if kind == "ByteLevel":
            if c.get("add_prefix_space"):
                raise ConvertError(f"{path}: ByteLevel pre-tokenizer with add_prefix_space=true is not supported")
            if c.get("use_regex", True):
                steps.append(_GPT2_STEP)
        elif kind == "Split":
            pattern = c.get("pattern") or {}
            if "Regex" not in pattern or c.get("behavior") != "Isolated" or c.get("invert"):
                raise ConvertError(
                    f"{path}: pre-tokenizer Split {json.dumps(c)} is not supported "
                    "(expected an Isolated, non-inverted Regex split)"
                )
            steps.append(("split", pattern["Regex"]))
        elif kind == "Digits":
            steps.append(("digits", bool(c.get("individual_digits"))))
        else:
            raise ConvertError(f"{path}: pre-tokenizer {kind!r} is not supported by llama.cpp's byte-level BPE")
    name = _KNOWN_PRE_TOKENIZERS.get(tuple(steps))
    if name is None:
        raise ConvertError(
            f"{path}: pre-tokenizer {steps!r} matches none llama.cpp implements that we know "
            f"(known: {', '.join(sorted(set(_KNOWN_PRE_TOKENIZERS.values())))}), and "
            + (f"its probe digest {digest} is none of llama.cpp's published ones we know "
               f"({', '.join(sorted(set(PRE_TOKENIZER_DIGESTS.values())))})" if digest else
               "the `tokenizers` package, which identifies published tokenizers by llama.cpp's "
               "probe text, is not installed")
        )
    return name


def _merges(path: Path, merges: Any) -> tuple[str, ...]:
    if not isinstance(merges, list) or not merges:
        raise ConvertError(f"{path}: key 'model.merges' missing or empty (byte-level BPE needs its merges)")
    out = []
    for merge in merges:
        # Two spellings: "a b" (older files) and ["a", "b"] (tokenizers >= 0.20).
        if isinstance(merge, str) and merge.count(" ") == 1:
            out.append(merge)
        elif (
            isinstance(merge, list) and len(merge) == 2 and all(isinstance(p, str) and p and " " not in p for p in merge)
        ):
            out.append(f"{merge[0]} {merge[1]}")
        else:
            raise ConvertError(f"{path}: key 'model.merges': entry {merge!r} is not a pair of space-free tokens")
    return tuple(out)


def _post_processor_specials(post: Any) -> tuple[str | None, str | None]:
    """The special tokens a TemplateProcessing post-processor puts before / after a sequence."""
    first = last = None
    for proc in _components(post, "processors"):
        if proc.get("type") != "TemplateProcessing":
            continue
        single = proc.get("single") or []
        if len(single) > 1 and "SpecialToken" in single[0]:
            first = single[0]["SpecialToken"].get("id")
        if len(single) > 1 and "SpecialToken" in single[-1]:
            last = single[-1]["SpecialToken"].get("id")
    return first, last


def _spm_from_bpe(
    path: Path, data: dict[str, Any], model: dict[str, Any], pieces: dict[int, str], types: dict[int, int],
    post_bos: str | None, post_eos: str | None,
) -> _Vocab:
    """SentencePiece in HF's tokenizer.json form: BPE over '▁'-escaped text with <0xXX> byte pieces.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose concatenation has the highest
    score; HF merges the pair with the lowest merge rank. A piece's score is therefore minus the
    rank of the first merge that produces it; pieces no merge produces rank below all of them.
    """
    merges = _merges(path, model.get("merges"))
    rank_of: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        rank_of.setdefault(merge.replace(" ", ""), rank)
    scores = {
        token_id: float(-rank_of[text]) if text in rank_of else float(-len(merges) - token_id)
        for token_id, text in pieces.items()
    }
    unk = model.get("unk_token")
    for token_id, text in pieces.items():
        if text == unk:  # usually also listed as a special added token; llama.cpp wants UNKNOWN
            types[token_id] = int(gguf.TokenType.UNKNOWN)
        elif types[token_id] != gguf.TokenType.NORMAL:
            if types[token_id] == gguf.TokenType.USER_DEFINED:
                # llama.cpp matches user-defined tokens against raw text, where spaces are spaces.
                pieces[token_id] = text.replace(_SPACE_MARK, " ")
        elif model.get("byte_fallback") and _BYTE_PIECE.fullmatch(text):
            types[token_id] = int(gguf.TokenType.BYTE)
    if unk is not None and unk not in pieces.values():
        raise ConvertError(f"{path}: key 'model.unk_token' names {unk!r}, which is not in the vocabulary")
    add_space_prefix = False
    for c in _components(data.get("normalizer"), "normalizers"):
        if c.get("type") == "Prepend" and c.get("prepend") == _SPACE_MARK:
            add_space_prefix = True
    for c in _components(data.get("pre_tokenizer"), "pretokenizers"):
        if c.get("type") == "Metaspace" and (c.get("prepend_scheme", "always") != "never" and c.get("add_prefix_space", True)):
            add_space_prefix = True
    return _Vocab(
        model="llama", pre="default", pieces=pieces, types=types, scores=scores, merges=None,
        add_space_prefix=add_space_prefix, remove_extra_whitespaces=False, post_bos=post_bos, post_eos=post_eos,
    )


# --- tokenizer.model (SentencePiece ModelProto) ---------------------------------------------------

def _proto_fields(buf: bytes, path: Path) -> list[tuple[int, int, Any]]:
    """Decode one protobuf message level into (field number, wire type, value) triples."""
    fields = []
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(buf):
                raise ConvertError(f"{path}: truncated SentencePiece model (varint at byte {pos})")
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while pos < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value: Any = varint()
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n = varint()
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ConvertError(f"{path}: not a SentencePiece model (protobuf wire type {wire} at byte {pos})")
        if pos > len(buf):
            raise ConvertError(f"{path}: truncated SentencePiece model (field {field} runs past the end)")
        fields.append((field, wire, value))
    return fields


def _vocab_from_sentencepiece_model(path: Path) -> _Vocab:
    """ModelProto: pieces = 1 (piece = 1, score = 2, type = 3), trainer_spec = 2 (model_type = 3,
    1 unigram / 2 BPE), normalizer_spec = 3 (add_dummy_prefix = 3, remove_extra_whitespaces = 4)."""
    pieces: dict[int, str] = {}
    types: dict[int, int] = {}
    scores: dict[int, float] = {}
    add_prefix = remove_ws = True  # proto2 defaults
    model_type = 1
    for field, wire, value in _proto_fields(path.read_bytes(), path):
        if field == 1 and wire == 2:
            piece, score, kind = "", 0.0, int(gguf.TokenType.NORMAL)
            for f, w, v in _proto_fields(value, path):
                if f == 1 and w == 2:
                    piece = v.decode("utf-8", errors="replace")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    kind = v  # SentencePiece's piece types have GGUF's TokenType numbering
            token_id = len(pieces)
            pieces[token_id], scores[token_id], types[token_id] = piece, score, kind
        elif field == 2 and wire == 2:
            for f, w, v in _proto_fields(value, path):
                if f == 3 and w == 0:
                    model_type = v
        elif field == 3 and wire == 2:
            for f, w, v in _proto_fields(value, path):
                if f == 3 and w == 0:
                    add_prefix = bool(v)
                elif f == 4 and w == 0:
                    remove_ws = bool(v)
    if not pieces:
        raise ConvertError(f"{path}: no pieces found; not a SentencePiece model")
    if model_type != 2:
        raise ConvertError(f"{path}: SentencePiece model type {model_type} is not supported (expected 2, BPE)")
    bad = [t for t in types.values() if t not in {int(x) for x in gguf.TokenType}]
    if bad:
        raise ConvertError(f"{path}: unknown SentencePiece piece type {bad[0]}")
    return _Vocab(
        model="llama", pre="default", pieces=pieces, types=types, scores=scores, merges=None,
        add_space_prefix=add_prefix, remove_extra_whitespaces=remove_ws, post_bos=None, post_eos=None,
    )


def _with_added_tokens(vocab: _Vocab, path: Path, tok_config: dict[str, Any]) -> _Vocab:
    """Tokens added on top of a tokenizer.model (chat markers...), listed in tokenizer_config.json's
    added_tokens_decoder (tokenizer.json carries them itself)."""
    added = tok_config.get("added_tokens_decoder") or {}
    if not isinstance(added, dict):
        raise ConvertError(f"{path}: key 'added_tokens_decoder' is not an object")
    pieces, types, scores = dict(vocab.pieces), dict(vocab.types), dict(vocab.scores or {})
    floor = min(scores.values(), default=0.0) - 1.0
    for key, entry in added.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not key.isdigit() or not isinstance(content, str):
            raise ConvertError(f"{path}: key 'added_tokens_decoder': entry {key!r} needs an id and a 'content'")
        token_id = int(key)
        if pieces.get(token_id) == content:
            continue  # a piece of the model itself (<unk>, <s>...): its own type stands
        if entry.get("special"):
            pieces[token_id], types[token_id] = content, int(gguf.TokenType.CONTROL)
        else:
            pieces[token_id] = content.replace(_SPACE_MARK, " ")
            types[token_id] = int(gguf.TokenType.USER_DEFINED)
        scores.setdefault(token_id, floor)
    return dataclasses.replace(vocab, pieces=pieces, types=types, scores=scores if vocab.scores is not None else None)


# --- specials, flags, chat template ----------------------------------------------------------------

def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(model_dir: Path, tok_config: dict[str, Any]) -> str | None:
    # transformers >= 4.47 saves the template to chat_template.jinja; older ones into the config.
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if template is None:
        template = _read_json(model_dir / "chat_template.json", required=False).get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp uses the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ConvertError(f"{model_dir / 'tokenizer_config.json'}: key 'chat_template' is not a string")
    return template


def _finish(model_dir: Path, vocab: _Vocab, config: dict[str, Any], tok_config: dict[str, Any]) -> TokenizerMetadata:
    cfg_path = model_dir / "tokenizer_config.json"
    n_max = max(vocab.pieces) + 1
    n_vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or n_max
    if not isinstance(n_vocab, int) or n_vocab < n_max:
        raise ConvertError(
            f"{model_dir / 'config.json'}: key 'vocab_size' is {n_vocab!r}, but the tokenizer uses ids up to {n_max - 1}"
        )
    # Ids the tokenizer does not use (embedding rows padded for alignment) become unused tokens.
    tokens = tuple(vocab.pieces.get(i, f"[PAD{i}]") for i in range(n_vocab))
    token_types = tuple(vocab.types.get(i, int(gguf.TokenType.UNUSED)) for i in range(n_vocab))
    scores = None
    if vocab.scores is not None:
        floor = min(vocab.scores.values()) - 1.0
        scores = tuple(vocab.scores.get(i, floor) for i in range(n_vocab))
    id_of: dict[str, int] = {}
    for token_id, text in enumerate(tokens):
        id_of.setdefault(text, token_id)

    def lookup(key: str, text: str) -> int:
        if text not in id_of:
            raise ConvertError(f"{cfg_path}: key '{key}' names {text!r}, which is not in the vocabulary")
        return id_of[text]

    def special(key: str, fallback: str | None, config_key: str) -> int | None:
        # tokenizer_config.json is authoritative, an explicit null included; config.json's ids
        # (often architecture defaults unrelated to the tokenizer) only fill in missing keys.
        if key in tok_config:
            text = _token_text(tok_config[key])
            return None if text is None else lookup(key, text)
        if fallback is not None:
            return lookup(key, fallback)
        token_id = config.get(config_key)
        if isinstance(token_id, list):  # generation may stop on several; the first is the EOS
            token_id = token_id[0] if token_id else None
        if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < n_vocab):
            raise ConvertError(f"{model_dir / 'config.json'}: key '{config_key}' is {token_id!r}, expected an id < {n_vocab}")
        return token_id

    bos_id = special("bos_token", vocab.post_bos, "bos_token_id")
    eos_id = special("eos_token", None, "eos_token_id")
    unk_id = special("unk_token", None, "unk_token_id")
    pad_id = special("pad_token", None, "pad_token_id")

    def flag(key: str, default: bool) -> bool:
        value = tok_config.get(key, default)
        if not isinstance(value, bool):
            raise ConvertError(f"{cfg_path}: key '{key}' is {value!r}, expected true or false")
        return value

    add_bos = flag("add_bos_token", vocab.post_bos is not None)
    add_eos = flag("add_eos_token", vocab.post_eos is not None and vocab.post_eos != vocab.post_bos)
    if add_bos and bos_id is None:
        raise ConvertError(f"{cfg_path}: add_bos_token is true but no bos_token is defined")

    chat_template = _chat_template(model_dir, tok_config)
    eot_id = None
    if chat_template is not None:
        eot_id = next((id_of[t] for t in _END_OF_TURN_TOKENS if t in id_of and t in chat_template), None)
    return TokenizerMetadata(
        model=vocab.model, pre=vocab.pre, tokens=tokens, token_types=token_types, scores=scores,
        merges=vocab.merges, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, pad_id=pad_id, eot_id=eot_id,
        add_bos=add_bos, add_eos=add_eos, add_space_prefix=vocab.add_space_prefix,
        remove_extra_whitespaces=vocab.remove_extra_whitespaces, chat_template=chat_template,
    )
