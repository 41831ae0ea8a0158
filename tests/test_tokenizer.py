"""Tokenizers end to end: HF checkpoint -> add_tokenizer -> vocab-only GGUF -> libllama (Vocab),
checked against the HF tokenizer (transformers AutoTokenizer on the same files) as the oracle.

Tokenization through the GGUF equals HF's for BPE and SentencePiece, and the runtime takes its
tokenizer and chat template from the GGUF (no HF code at run time).
"""
from __future__ import annotations

import codecs
import ctypes
import json
import os
import random
import shutil
from pathlib import Path

import gguf
import pytest
from transformers import AutoTokenizer

import converters.tokenizer as tokenizer_module
from converters.tokenizer import (PRE_TOKENIZER_REGEXES, add_tokenizer, probe_digest,
                                  read_tokenizer)
from edgemoe.errors import ConvertError, EdgeMoeError, ShardSetError
from edgemoe.tokenizer import Vocab, llama_model_params
from tiny_tokenizers import CHATML_TEMPLATE, make_bpe_tokenizer, make_spm_tokenizer

TEST_STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! (Really?) [yes]; {no}: <maybe> \"quoted\" 'single' -- ... !!! ??? #$%&*+=/\\|~^`@",
    "3 33 333 3333 33333 1000000 3.14159 2024-06-01 0x1F 1e-5 -42",
    "a  b   c    d",
    "  leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows",
    "\ttab\t\tdouble tab \t mixed",
    " ",
    "\n",
    "日本語のテキストと中文文本。",
    "한국어 문장도 있습니다.",
    "Привет, как дела? Γειά σου κόσμε.",
    "Café naïve résumé Zürich São Paulo Ångström",
    "Emoji: 🙂 🚀 ✅ 🦙🦙 😶\u200d🌫️",
    "I'm sure it's theirs; we'll see, they'd said you've been told. DON'T SHOUT, I'LL GO. we'Ve a'lL",
    "def main(argv):\n    for i in range(10):\n        print(\"hi\", i * 2)\n",
    "mixed 日本 text with 🚀 and 123 numbers",
    "camelCaseWords, HTTPServer and getHTTPResponse; McDonald's",
    "end.\nnext!\n\n?\r\n;\n",
    "",
]

# Texts with special-token markup (a chat prompt): parsed into control tokens with parse_special.
SPECIAL_STRINGS = [
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
    "before<|im_end|>after <|im_start|> spaced",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 日本語? 🚀"},
    ],
]

BPE_PRES = ["gpt-2", "starcoder", *PRE_TOKENIZER_REGEXES]  # every pre-tokenizer the converter knows


def write_vocab_gguf(model_dir: Path, out: Path) -> Path:
    """A GGUF holding only metadata: what libllama needs to load a vocabulary."""
    writer = gguf.GGUFWriter(str(out), "llama")
    add_tokenizer(writer, model_dir)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


class Case:
    """One tokenizer: its checkpoint dir, the HF oracle and our Vocab over the converted GGUF."""

    def __init__(self, spec, gguf_path: Path):
        self.spec = spec
        self.hf = AutoTokenizer.from_pretrained(spec.path)
        self.vocab = Vocab(gguf_path)


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for pre in BPE_PRES:
        spec = make_bpe_tokenizer(root / f"bpe-{pre}", pre=pre)
        out[pre] = Case(spec, write_vocab_gguf(spec.path, root / f"bpe-{pre}.gguf"))
    spec = make_spm_tokenizer(root / "spm")
    out["spm"] = Case(spec, write_vocab_gguf(spec.path, root / "spm.gguf"))
    yield out
    for case in out.values():
        case.vocab.close()


def fuzz_strings(n: int, seed: int) -> list[str]:
    """Random mixes of the characters tokenizers get wrong: whitespace runs, apostrophes,
    digits, punctuation, multi-byte characters."""
    rng = random.Random(seed)
    alphabet = list("abcdeTHE xyz'sltvmdr 0123456789.,;:!?\"()[]{}-_/\\\n\t\r   ") + list("éüñßåø日本語한국Привет🚀🙂✅🦙")
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 48))) for _ in range(n)]


# --- tokenization equals HF's ------------------------------------------------------------------

@pytest.mark.parametrize("kind", [*BPE_PRES, "spm"])
def test_tokenize_matches_hf(cases, kind):
    case = cases[kind]
    for text in TEST_STRINGS + SPECIAL_STRINGS + fuzz_strings(150, seed=BPE_PRES.index(kind) if kind in BPE_PRES else 99):
        expected = case.hf.encode(text)  # adds BOS the way the checkpoint configures it
        assert case.vocab.tokenize(text, add_special=True, parse_special=True) == expected, repr(text)
        expected_plain = case.hf.encode(text, add_special_tokens=False)
        assert case.vocab.tokenize(text, add_special=False, parse_special=True) == expected_plain, repr(text)


@pytest.mark.parametrize("kind", ["qwen2", "spm"])
def test_parse_special_off_keeps_markup_as_text(cases, kind):
    case = cases[kind]
    text = SPECIAL_STRINGS[0]
    control = {case.hf.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    parsed = case.vocab.tokenize(text, add_special=False, parse_special=True)
    plain = case.vocab.tokenize(text, add_special=False, parse_special=False)
    assert control <= set(parsed)
    assert not control & set(plain)
    assert case.vocab.detokenize(plain) == text


def test_detected_pre_tokenizers(cases):
    for kind, case in cases.items():
        meta = read_tokenizer(case.spec.path)
        assert (meta.model, meta.pre) == (("llama", "default") if kind == "spm" else ("gpt2", kind))


def test_metaspace_pre_tokenizer(cases, tmp_path):
    """The same SentencePiece vocabulary with its spaces marked by a Metaspace pre-tokenizer
    instead of normalizers converts to the same GGUF vocabulary and tokenizes plain text as HF.
    Two HF Metaspace behaviours have no GGUF key, so llama.cpp differs on them and they are not
    compared: no "▁" is prepended to text already starting with a space, nor (prepend_scheme
    "first") to text after a special token."""
    spec = make_spm_tokenizer(tmp_path / "metaspace", metaspace=True)
    meta, reference = read_tokenizer(spec.path), read_tokenizer(cases["spm"].spec.path)
    assert (meta.tokens, meta.token_types, meta.scores, meta.add_space_prefix) == (
        reference.tokens, reference.token_types, reference.scores, True)
    hf = AutoTokenizer.from_pretrained(spec.path)
    with Vocab(write_vocab_gguf(spec.path, tmp_path / "metaspace.gguf")) as vocab:
        for text in TEST_STRINGS + fuzz_strings(100, seed=5):
            if text[:1].isspace():
                continue
            assert vocab.tokenize(text) == hf.encode(text), repr(text)


def test_sentencepiece_model_file(cases, tmp_path):
    """A checkpoint with only tokenizer.model (SentencePiece's protobuf) and tokenizer_config.json
    gives the same vocabulary as its tokenizer.json and tokenizes as HF does."""
    case = cases["spm"]
    model_dir = tmp_path / "model-only"
    model_dir.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(case.spec.path / name, model_dir / name)
    from_model, from_json = read_tokenizer(model_dir), read_tokenizer(case.spec.path)
    assert from_model.tokens == from_json.tokens
    assert from_model.token_types == from_json.token_types
    assert (from_model.bos_id, from_model.eos_id, from_model.eot_id, from_model.add_bos) == (
        from_json.bos_id, from_json.eos_id, from_json.eot_id, from_json.add_bos)
    with Vocab(write_vocab_gguf(model_dir, tmp_path / "model-only.gguf")) as vocab:
        for text in TEST_STRINGS + SPECIAL_STRINGS + fuzz_strings(100, seed=11):
            assert vocab.tokenize(text, parse_special=True) == case.hf.encode(text), repr(text)


def test_bad_sentencepiece_model(cases, tmp_path):
    model_dir = tmp_path / "bad"
    model_dir.mkdir()
    good = (cases["spm"].spec.path / "tokenizer.model").read_bytes()
    (model_dir / "tokenizer.model").write_bytes(good[: len(good) // 2])
    with pytest.raises(ConvertError, match=r"tokenizer.model: truncated SentencePiece model"):
        read_tokenizer(model_dir)
    (model_dir / "tokenizer.model").write_bytes(b"\x0f" * 64)
    with pytest.raises(ConvertError, match=r"tokenizer.model: not a SentencePiece model"):
        read_tokenizer(model_dir)
    # trainer_spec.model_type = 1 (unigram) appended: the last value of a field wins
    (model_dir / "tokenizer.model").write_bytes(good + b"\x12\x02\x18\x01")
    with pytest.raises(ConvertError, match=r"tokenizer.model: SentencePiece model type 1 is not supported"):
        read_tokenizer(model_dir)


@pytest.mark.parametrize("arch, kind", [("qwen2_moe", "bpe"), ("mixtral", "spm")])
def test_converted_shard_set_tokenizes_like_hf(tmp_path, arch, kind):
    """Through the real converter: base.gguf (our Vocab) and the exported single GGUF (llama-cpp-
    python's own Llama, vocab only) both tokenize as HF does."""
    import llama_cpp

    import converters
    from converters.exporter import export_gguf
    from tiny_models import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(arch, tmp_path / "ckpt", tokenizer=kind)
    converters.convert(ckpt, tmp_path / "shards", expert_type="Q8_0", dense_type="Q8_0", progress=False)
    exported = export_gguf(tmp_path / "shards", tmp_path / "model.gguf")
    hf = AutoTokenizer.from_pretrained(ckpt)
    reference = llama_cpp.Llama(str(exported), vocab_only=True, verbose=False)
    with Vocab(tmp_path / "shards" / "base.gguf") as vocab:
        assert vocab.apply_chat_template(CONVERSATIONS[1]) == hf.apply_chat_template(
            CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)
        for text in TEST_STRINGS + SPECIAL_STRINGS:
            expected = hf.encode(text)
            assert vocab.tokenize(text, parse_special=True) == expected, repr(text)
            assert reference.tokenize(text.encode(), add_bos=vocab.add_bos, special=True) == expected, repr(text)


@pytest.mark.parametrize("kind", ["gpt-2", "qwen2", "spm"])
def test_specials_agree_with_gguf_py(cases, kind):
    """gguf-py's own reader of checkpoint special tokens (gguf.SpecialVocab, used by llama.cpp's
    converter) as a second oracle for the special ids, add_bos/add_eos, merges and template."""
    path = cases[kind].spec.path
    theirs = gguf.SpecialVocab(path, load_merges=True)
    ours = read_tokenizer(path)
    ours_ids = {"bos": ours.bos_id, "eos": ours.eos_id, "unk": ours.unk_id, "pad": ours.pad_id}
    assert theirs.special_token_ids == {k: v for k, v in ours_ids.items() if v is not None}
    for flag in ("bos", "eos"):
        assert theirs.add_special_token.get(flag, False) == getattr(ours, f"add_{flag}")
    assert theirs.chat_template == ours.chat_template
    if kind != "spm":
        assert tuple(theirs.merges) == ours.merges


def test_saved_by_transformers_converts_the_same(cases, tmp_path):
    """A checkpoint re-saved by transformers (its own file layout, chat_template.jinja) converts to
    the same tokenizer."""
    for kind in ("qwen2", "spm"):
        case = cases[kind]
        resaved = tmp_path / kind
        case.hf.save_pretrained(resaved)
        with Vocab(write_vocab_gguf(resaved, tmp_path / f"{kind}.gguf")) as vocab:
            assert vocab.chat_template == case.vocab.chat_template
            for text in TEST_STRINGS:
                assert vocab.tokenize(text, parse_special=True) == case.hf.encode(text), repr(text)


# --- special tokens ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["qwen2", "spm"])
def test_special_tokens(cases, kind):
    case, hf = cases[kind], cases[kind].hf
    vocab = case.vocab
    assert vocab.n_vocab == len(hf) == case.spec.vocab_size
    assert vocab.bos == hf.bos_token_id  # None for the BPE one: it has no BOS
    assert vocab.add_bos == (kind == "spm")
    assert vocab.add_eos is False
    assert vocab.eos == hf.eos_token_id
    assert vocab.eot == hf.convert_tokens_to_ids("<|im_end|>")
    assert vocab.is_eog(vocab.eos) and vocab.is_eog(vocab.eot)
    assert not vocab.is_eog(hf.convert_tokens_to_ids("<|im_start|>"))
    assert vocab.is_control(vocab.eot)
    assert not vocab.is_eog(-1) and not vocab.is_eog(vocab.n_vocab)


def test_vocab_padded_to_model_vocab_size(cases, tmp_path):
    """Models often have more embedding rows than tokens; the extra ids become unused tokens."""
    src = cases["qwen2"].spec.path
    model_dir = tmp_path / "padded"
    shutil.copytree(src, model_dir)
    n = cases["qwen2"].spec.vocab_size
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": n + 5}))
    meta = read_tokenizer(model_dir)
    assert meta.n_vocab == n + 5
    assert meta.tokens[n:] == tuple(f"[PAD{i}]" for i in range(n, n + 5))
    assert set(meta.token_types[n:]) == {gguf.TokenType.UNUSED}
    with Vocab(write_vocab_gguf(model_dir, tmp_path / "padded.gguf")) as vocab:
        assert vocab.n_vocab == n + 5
        assert vocab.tokenize(TEST_STRINGS[2]) == cases["qwen2"].hf.encode(TEST_STRINGS[2])


# --- detokenization and streaming -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt-2", "llama-bpe", "qwen2", "spm"])
def test_detokenize_round_trip(cases, kind):
    case = cases[kind]
    for text in TEST_STRINGS + fuzz_strings(100, seed=7):
        ids = case.vocab.tokenize(text, add_special=False)
        assert case.vocab.detokenize(ids) == text, repr(text)
        with_special = case.vocab.tokenize(text, add_special=True, parse_special=True)
        assert case.vocab.detokenize(with_special) == case.hf.decode(with_special), repr(text)
        assert case.vocab.detokenize(with_special, skip_special=True) == case.hf.decode(
            with_special, skip_special_tokens=True
        ), repr(text)


@pytest.mark.parametrize("kind", ["qwen2", "spm"])
def test_token_pieces_stream_utf8(cases, kind):
    """Concatenated pieces are the text's bytes; multi-byte characters split over byte tokens come
    out whole from an incremental UTF-8 decoder."""
    vocab = cases[kind].vocab
    text = "🐘 日本語 naïve 🚀 ꙮ"  # the elephant and ꙮ are not in the training text: byte pieces
    ids = vocab.tokenize(text, add_special=False)
    pieces = [vocab.token_to_piece(t) for t in ids]

    def is_utf8(piece: bytes) -> bool:
        try:
            piece.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(is_utf8(p) for p in pieces)
    # SentencePiece pieces carry the word's space; the first one is the prefix added to the text.
    prefix = " " if kind == "spm" else ""
    assert b"".join(pieces).decode("utf-8") == prefix + text
    decoder = codecs.getincrementaldecoder("utf-8")()
    streamed = [decoder.decode(p) for p in pieces]
    assert "".join(streamed) == prefix + text
    assert "\ufffd" not in "".join(streamed)
    assert vocab.token_to_piece(vocab.eot) == b"<|im_end|>"
    assert vocab.token_to_piece(vocab.eot, special=False) == b""


# --- chat templates ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["qwen2", "spm"])
def test_chatml_template_matches_hf(cases, kind):
    case = cases[kind]
    assert case.vocab.chat_template == CHATML_TEMPLATE
    for messages in CONVERSATIONS:
        for add_gen in (True, False):
            expected = case.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen)
            assert case.vocab.apply_chat_template(messages, add_generation_prompt=add_gen) == expected
            # and the prompt tokenizes to the same ids
            # (HF adds no BOS to a rendered chat: templates that want one write it themselves)
            ids = case.vocab.tokenize(expected, add_special=False, parse_special=True)
            assert ids == case.hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_gen, return_dict=False)


def test_unrecognised_template_rendered_with_jinja(cases):
    """llama.cpp only knows built-in templates; any other Jinja template renders as HF would."""
    case = cases["qwen2"]
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}[[{{ m['content'] }}]]\n"
        "{% else %}### {{ m['role'] | upper }}: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### ASSISTANT:{% endif %}"
    )
    for messages in CONVERSATIONS:
        expected = case.hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        assert case.vocab.apply_chat_template(messages, template=template) == expected


def test_chat_template_errors(cases, tmp_path):
    vocab = cases["qwen2"].vocab
    with pytest.raises(ValueError, match="message 0"):
        vocab.apply_chat_template([{"role": "user"}])
    with pytest.raises(EdgeMoeError, match="chat template cannot be rendered"):
        vocab.apply_chat_template(CONVERSATIONS[0], template="{% for %}")
    with pytest.raises(EdgeMoeError, match="nope"):
        vocab.apply_chat_template(CONVERSATIONS[0], template="{{ raise_exception('nope') }}")
    model_dir = tmp_path / "no-template"
    shutil.copytree(cases["qwen2"].spec.path, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with Vocab(write_vocab_gguf(model_dir, tmp_path / "nt.gguf")) as bare:
        assert bare.chat_template is None
        with pytest.raises(EdgeMoeError, match="no chat template"):
            bare.apply_chat_template(CONVERSATIONS[0])


# --- runtime bad input ------------------------------------------------------------------------

def test_vocab_bad_files(tmp_path):
    with pytest.raises(ShardSetError, match="no such file"):
        Vocab(tmp_path / "missing.gguf")
    with pytest.raises(ShardSetError, match="not a file"):
        Vocab(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a model")
    with pytest.raises(ShardSetError, match="not a GGUF file"):
        Vocab(text)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00\x00")
    with pytest.raises(ShardSetError, match=r"truncated.gguf: libllama could not load the vocabulary \(.*header"):
        Vocab(truncated)
    no_tokenizer = tmp_path / "no_tokenizer.gguf"
    writer = gguf.GGUFWriter(str(no_tokenizer), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ShardSetError, match=r"no_tokenizer.gguf: libllama could not load the vocabulary \(.*tokenizer.ggml.model"):
        Vocab(no_tokenizer)
    # an expert shard has no vocabulary (and an architecture libllama does not know)
    shard = tmp_path / "blk.0.0.gguf"
    writer = gguf.GGUFWriter(str(shard), "edgemoe.expert")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ShardSetError, match=r"blk.0.0.gguf: .*unknown model architecture: 'edgemoe.expert'"):
        Vocab(shard)


def test_vocab_bad_ids_and_close(cases, tmp_path):
    case = cases["qwen2"]
    vocab = case.vocab
    for bad in (-1, vocab.n_vocab, 2**31):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            vocab.token_to_piece(bad)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            vocab.detokenize([1, bad])
    # a second handle on the same file, closed: every call fails cleanly
    path = tmp_path / "again.gguf"
    write_vocab_gguf(case.spec.path, path)
    other = Vocab(path)
    other.close()
    other.close()  # idempotent
    with pytest.raises(EdgeMoeError, match="closed"):
        other.tokenize("hi")
    with Vocab(path) as scoped:
        assert scoped.tokenize("hi", add_special=False) == case.hf.encode("hi", add_special_tokens=False)
    with pytest.raises(EdgeMoeError, match="closed"):
        scoped.detokenize([1])


def test_vocab_from_threads(cases):
    """libllama's tokenizer is thread-safe; so are our buffers (one per call)."""
    from concurrent.futures import ThreadPoolExecutor

    vocab = cases["spm"].vocab
    texts = TEST_STRINGS * 10
    expected = [vocab.tokenize(t) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(vocab.tokenize, texts))
        text_back = list(pool.map(lambda ids: vocab.detokenize(ids, skip_special=True), got))
    assert got == expected
    assert text_back == texts


def test_model_params_layout_matches_llama_cpp():
    """Our ctypes mirror of struct llama_model_params, field by field, against llama-cpp-python's."""
    import llama_cpp

    theirs = llama_cpp.llama_model_params
    assert ctypes.sizeof(llama_model_params) == ctypes.sizeof(theirs)
    for name, _ in llama_model_params._fields_:
        assert getattr(llama_model_params, name).offset == getattr(theirs, name).offset, name


# --- converter bad input ---------------------------------------------------------------------

@pytest.fixture()
def bpe_dir(cases, tmp_path):
    model_dir = tmp_path / "ckpt"
    shutil.copytree(cases["qwen2"].spec.path, model_dir)
    return model_dir


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_convert_missing_and_corrupt_files(bpe_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConvertError, match="no tokenizer.json or tokenizer.model"):
        read_tokenizer(empty)
    (bpe_dir / "tokenizer.json").write_text('{"model": {"vocab": ')
    with pytest.raises(ConvertError, match=r"tokenizer.json: not valid JSON"):
        read_tokenizer(bpe_dir)
    (bpe_dir / "tokenizer.json").write_text("[1, 2]")
    with pytest.raises(ConvertError, match=r"tokenizer.json: expected a JSON object"):
        read_tokenizer(bpe_dir)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["model"].update(type="Unigram"), r"tokenizer model type 'Unigram' is not supported"),
        (lambda d: d.pop("model"), r"key 'model.vocab' missing"),
        (lambda d: d["model"].update(merges=[]), r"key 'model.merges' missing or empty"),
        (lambda d: d["model"]["merges"].append("a b c"), r"key 'model.merges': entry 'a b c'"),
        (lambda d: d["model"]["vocab"].update(x=-3), r"key 'model.vocab': token 'x' has invalid id -3"),
        (lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+"),
         r"pre-tokenizer .*matches none llama.cpp implements.*known: .*gpt-2.*qwen2"),
        (lambda d: d["pre_tokenizer"]["pretokenizers"].insert(0, {"type": "Whitespace"}),
         r"pre-tokenizer 'Whitespace' is not supported"),
        (lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True),
         r"ByteLevel pre-tokenizer with add_prefix_space=true is not supported"),
        (lambda d: d.update(pre_tokenizer=None), r"BPE without a ByteLevel pre-tokenizer"),
    ],
)
def test_convert_bad_tokenizer_json(bpe_dir, edit, message):
    edit_json(bpe_dir / "tokenizer.json", edit)
    with pytest.raises(ConvertError, match=r"tokenizer.json: " + message):
        read_tokenizer(bpe_dir)


def test_convert_bad_configs(bpe_dir):
    edit_json(bpe_dir / "tokenizer_config.json", lambda d: d.update(eos_token="<|nope|>"))
    with pytest.raises(ConvertError, match=r"tokenizer_config.json: key 'eos_token' names '<\|nope\|>', which is not in"):
        read_tokenizer(bpe_dir)
    edit_json(bpe_dir / "tokenizer_config.json", lambda d: d.update(eos_token="<|endoftext|>", add_bos_token="yes"))
    with pytest.raises(ConvertError, match=r"tokenizer_config.json: key 'add_bos_token' is 'yes', expected true or false"):
        read_tokenizer(bpe_dir)
    edit_json(bpe_dir / "tokenizer_config.json", lambda d: d.update(add_bos_token=True))
    with pytest.raises(ConvertError, match=r"add_bos_token is true but no bos_token"):
        read_tokenizer(bpe_dir)
    edit_json(bpe_dir / "tokenizer_config.json", lambda d: d.update(add_bos_token=False))
    (bpe_dir / "config.json").write_text(json.dumps({"vocab_size": 100}))
    with pytest.raises(ConvertError, match=r"config.json: key 'vocab_size' is 100, but the tokenizer uses ids up to 383"):
        read_tokenizer(bpe_dir)
    (bpe_dir / "config.json").write_text(json.dumps({"vocab_size": 384, "bos_token_id": 999}))
    edit_json(bpe_dir / "tokenizer_config.json", lambda d: d.pop("bos_token"))
    with pytest.raises(ConvertError, match=r"config.json: key 'bos_token_id' is 999, expected an id < 384"):
        read_tokenizer(bpe_dir)


# DeepSeek LLM's pre-tokenizer, a chain of splits, as llama.cpp spells it (src/llama-vocab.cpp,
# LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM); its vocabulary comes from llama.cpp's tokenizer test files.
DEEPSEEK_LLM_SPLITS = [
    '[\r\n]',
    ('\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af'
     '\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1'
     '\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8'
     '-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-'
     '\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-'
     '\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-'
     '\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-'
     '\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149'
     '\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d'
     '\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13'
     '-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3'
     '\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df'
     '\U0001e900-\U0001e943]+'),
    '\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+',
    '\\s+$',
    '[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+',
    '\\p{N}+',
]
LLAMA_CPP_SRC = Path(os.environ.get("LLAMA_CPP_SRC",
                                    "/tmp/x/llama_cpp_python-0.3.36/vendor/llama.cpp"))


def deepseek_llm_checkpoint(vocab_gguf: Path, out: Path) -> Path:
    """DeepSeek LLM's tokenizer.json rebuilt from llama.cpp's vocab GGUF of it: byte-level BPE
    with its merges and chain of splits, BOS put first by the post-processor."""
    r = gguf.GGUFReader(vocab_gguf)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    bos = tokens[r.fields["tokenizer.ggml.bos_token_id"].contents()]
    first = {"SpecialToken": {"id": bos, "type_id": 0}}
    data = {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, (t, kind) in enumerate(zip(tokens, types))
                         if kind == gguf.TokenType.CONTROL],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            *({"type": "Split", "pattern": {"Regex": x}, "behavior": "Isolated", "invert": False}
              for x in DEEPSEEK_LLM_SPLITS),
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [first, {"Sequence": {"id": "A", "type_id": 0}},
                                    first, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [tokens.index(bos)],
                                                    "tokens": [bos]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False,
                  "byte_fallback": False, "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": r.fields["tokenizer.ggml.merges"].contents()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": tokens[r.fields["tokenizer.ggml.eos_token_id"].contents()],
         "add_bos_token": True, "add_eos_token": False}))
    return out


def test_deepseek_pre_type_from_probe_digest(tmp_path, monkeypatch):
    """DeepSeek's chain of splits is no single regex llama.cpp implements; its pre-type is found
    as llama.cpp's converter finds it, by the digest of the ids of the probe text."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = LLAMA_CPP_SRC / "models" / "ggml-vocab-deepseek-llm.gguf"
    if not vocab.is_file():
        pytest.skip(f"llama.cpp's vocab test files not found under {LLAMA_CPP_SRC} "
                    "(set LLAMA_CPP_SRC)")
    ckpt = deepseek_llm_checkpoint(vocab, tmp_path / "deepseek-llm")
    # The rebuilt tokenizer is DeepSeek LLM's: it gives the ids llama.cpp's own test expects.
    texts = Path(f"{vocab}.inp").read_text().split("\n__ggml_vocab_test__\n")
    ids = [[int(x) for x in line.split()] for line in Path(f"{vocab}.out").read_text().split("\n")]
    hf = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert len(texts) > 40
    for text, want in zip(texts, ids):
        assert hf.encode(text, add_special_tokens=False).ids == want, repr(text)

    meta = read_tokenizer(ckpt)
    assert (meta.model, meta.pre) == ("gpt2", "deepseek-llm")
    # ... and llama.cpp, told so, tokenizes those texts as its test expects.
    with Vocab(write_vocab_gguf(ckpt, tmp_path / "deepseek-llm.gguf")) as gguf_vocab:
        for text, want in zip(texts, ids):
            assert gguf_vocab.tokenize(text, add_special=False) == want, repr(text)

    # Without llama.cpp's digests nothing identifies it, and the error says why.
    monkeypatch.setattr(tokenizer_module, "PRE_TOKENIZER_DIGESTS", {})
    with pytest.raises(ConvertError, match=f"probe digest {probe_digest(ckpt / 'tokenizer.json')}"
                                           " is none of llama.cpp's published ones"):
        read_tokenizer(ckpt)
