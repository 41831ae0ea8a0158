"""Tiny tokenizers built offline, saved into a checkpoint directory the way Hugging Face saves them.

Two families, the two that MoE checkpoints ship:
- `make_bpe_tokenizer`: byte-level BPE (GPT-2 / Llama-3 / Qwen2 style pre-tokenizer), trained with
  the `tokenizers` library on a built-in text sample.
- `make_spm_tokenizer`: a SentencePiece-style (Llama / Mixtral) tokenizer: BPE on "▁"-escaped text
  with byte fallback (<0x00>..<0xFF>), as HF's tokenizer.json represents Llama's tokenizer.model.

Both write tokenizer.json, tokenizer_config.json (special tokens, add_bos/add_eos, a ChatML chat
template) and special_tokens_map.json. Vocabularies stay under 512 entries so that tiny models stay
tiny; `vocab_size` of the returned spec is what a model config needs at least.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from converters.tokenizer import PRE_TOKENIZER_REGEXES

# ChatML, the template our bundled models use; llama.cpp recognises it (by "<|im_start|>") among
# its built-in templates, so llama_chat_apply_template renders it without a Jinja engine.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text: English prose with contractions, code-ish punctuation, numbers, whitespace runs and
# a little non-Latin text, so that the merges cover what the tests tokenize.
SAMPLE_TEXT = """\
The quick brown fox jumps over the lazy dog. It's the dog's fault, isn't it? We'll see; they'd
said they're sure I'm right and you've been told. The weather today is 21 degrees, and 3.14 is
pi; 1000000 is a million, 2024-06-01 is a date.   Three spaces here, and	tabs	too.
def main(argv):
    for i in range(10):
        print("hello, world!", i * 2 + 1)
    return {"key": [1, 2, 3], 'other': None}
Café, naïve, résumé, Zürich, São Paulo, Ångström. Привет, как дела? Γειά σου κόσμε.
日本語のテキストと中文文本。한국어 문장도 있습니다. Emoji: 🙂 🚀 ✅ 🦙
Mixture of experts models route each token to a few experts; the router picks the top k.
A language model predicts the next token from the previous tokens, one at a time.
"""


@dataclass(frozen=True)
class TinyTokenizer:
    """What a test or a tiny-model builder needs to know about the tokenizer it wrote."""

    path: Path          # the checkpoint directory holding tokenizer.json
    kind: str           # "bpe" or "spm"
    pre: str            # llama.cpp's tokenizer.ggml.pre the converter should detect ("default" for spm)
    vocab_size: int     # tokens including added special tokens (ids 0..vocab_size-1)
    bos_id: int | None
    eos_id: int
    pad_id: int | None


def _corpus() -> list[str]:
    # Repetition gives the frequent pairs enough weight to be merged within a small vocab.
    return SAMPLE_TEXT.splitlines(keepends=True) * 8


def _write_configs(
    directory: Path,
    tokenizer: Tokenizer,
    *,
    bos: str | None,
    eos: str,
    unk: str | None,
    pad: str | None,
    add_bos: bool,
    chat_template: str,
) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(tok.content)): {
            "content": tok.content,
            "lstrip": tok.lstrip,
            "normalized": tok.normalized,
            "rstrip": tok.rstrip,
            "single_word": tok.single_word,
            "special": tok.special,
        }
        for tok in tokenizer.get_added_tokens_decoder().values()
    }
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    config = {
        # Load tokenizer.json verbatim (no class-specific rebuilding of the pipeline).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": chat_template,
        **specials,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    special_map = {k: v for k, v in specials.items() if v is not None}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def make_bpe_tokenizer(
    directory: Path, *, pre: str = "qwen2", vocab_size: int = 384, chat_template: str = CHATML_TEMPLATE
) -> TinyTokenizer:
    """Byte-level BPE with the pre-tokenizer llama.cpp calls `pre` ("gpt-2", "starcoder", or a
    regex one: "llama-bpe", "qwen2", ...).

    Special tokens follow Qwen2: <|endoftext|> (eos, pad), <|im_start|>, <|im_end|>; no BOS.
    """
    if not 300 <= vocab_size <= 512:
        raise ValueError(f"vocab_size {vocab_size}: byte-level BPE needs 256 bytes + merges, keep it <= 512")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    # The GPT-2 pre-tokenizer is ByteLevel's own regex (StarCoder isolates digits first); the
    # others are a Split before ByteLevel.
    if pre == "gpt-2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "starcoder":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre in PRE_TOKENIZER_REGEXES:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEXES[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise ValueError(f"pre {pre!r}: expected 'gpt-2', 'starcoder' or one of {sorted(PRE_TOKENIZER_REGEXES)}")
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    _write_configs(
        directory, tokenizer, bos=None, eos="<|endoftext|>", unk=None, pad="<|endoftext|>",
        add_bos=False, chat_template=chat_template,
    )
    return TinyTokenizer(
        path=directory, kind="bpe", pre=pre, vocab_size=tokenizer.get_vocab_size(),
        bos_id=None, eos_id=tokenizer.token_to_id("<|endoftext|>"), pad_id=tokenizer.token_to_id("<|endoftext|>"),
    )


def make_spm_tokenizer(
    directory: Path, *, vocab_size: int = 448, chat_template: str = CHATML_TEMPLATE, metaspace: bool = False
) -> TinyTokenizer:
    """A Llama/Mixtral-style tokenizer: <unk>=0, <s>=1, </s>=2, byte pieces <0x00>..<0xFF>, then
    "▁"-prefixed pieces, with <|im_start|>/<|im_end|> added for the ChatML template; adds BOS.

    Spaces become "▁" through the normalizer (Prepend + Replace, as Mixtral's tokenizer.json has
    it) or, with `metaspace`, through a Metaspace pre-tokenizer (prepend_scheme "first", the form
    of newer conversions; it prefixes only the text's first section, not text after a special
    token as llama.cpp does).

    SentencePiece's BPE merges whichever adjacent pair forms the highest-scoring piece; HF expresses
    that as a merge list holding every pair (a, b) whose concatenation is in the vocabulary, ranked
    by the piece's score (HF's own SentencePiece conversion does the same). The `tokenizers` trainer
    records only the merge that first created each piece, so we re-derive the complete list.
    """
    n_fixed = 3 + 256
    if not n_fixed + 64 <= vocab_size <= 512:
        raise ValueError(f"vocab_size {vocab_size}: needs {n_fixed} fixed pieces + >= 64 learned, <= 512")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    # 1. Learn pieces on "▁"-escaped words (SentencePiece never merges across a word boundary).
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_fixed - 2, show_progress=False, limit_alphabet=120)
    learner.train_from_iterator(_corpus(), trainer=trainer)
    learned = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])  # id order = creation order

    # 2. Lay out the vocabulary as Llama does; a piece's id order is its score order.
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in learned:
        vocab.setdefault(piece, len(vocab))
    merges = [
        (piece[:cut], piece[cut:])
        for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1])[n_fixed:]
        for cut in range(1, len(piece))
        if piece[:cut] in vocab and piece[cut:] in vocab
    ]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if metaspace:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<unk>", "<s>", "</s>")])
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<|im_start|>", "<|im_end|>")])
    # HF Llama tokenizers add BOS through the post-processor.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    _write_configs(
        directory, tokenizer, bos="<s>", eos="</s>", unk="<unk>", pad=None, add_bos=True,
        chat_template=chat_template,
    )
    _write_sentencepiece_model(directory / "tokenizer.model", vocab, n_fixed)
    return TinyTokenizer(
        path=directory, kind="spm", pre="default", vocab_size=tokenizer.get_vocab_size(),
        bos_id=1, eos_id=2, pad_id=None,
    )


def _proto_field(number: int, wire: int, payload: bytes | int) -> bytes:
    """One protobuf field: varint (wire 0), length-delimited (2) or 32-bit (5)."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(int(payload))
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def _write_sentencepiece_model(path: Path, vocab: dict[str, int], n_fixed: int) -> None:
    """The same vocabulary as a SentencePiece ModelProto (tokenizer.model), as Llama-family
    checkpoints ship next to tokenizer.json: pieces with scores (higher merges first) and types
    (1 normal, 2 unknown, 3 control, 6 byte), a BPE trainer spec with byte fallback, and a
    normalizer that adds the "▁" prefix and keeps whitespace runs."""
    import struct

    pieces = b""
    for piece, token_id in sorted(vocab.items(), key=lambda kv: kv[1]):
        kind = 2 if token_id == 0 else 3 if token_id < 3 else 6 if token_id < n_fixed else 1
        score = 0.0 if token_id < n_fixed else float(n_fixed - token_id)
        body = _proto_field(1, 2, piece.encode()) + _proto_field(2, 5, struct.pack("<f", score)) + _proto_field(3, 0, kind)
        pieces += _proto_field(1, 2, body)
    trainer = _proto_field(3, 0, 2) + _proto_field(35, 0, 1)  # model_type BPE, byte_fallback
    normalizer = _proto_field(1, 2, b"identity") + _proto_field(3, 0, 1) + _proto_field(4, 0, 0)
    path.write_bytes(pieces + _proto_field(2, 2, trainer) + _proto_field(3, 2, normalizer))
