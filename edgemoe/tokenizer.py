"""The runtime tokenizer: libllama's own vocabulary code, loaded vocab-only from the base GGUF.

No Hugging Face code at run time: the converter wrote the tokenizer into tokenizer.ggml.* keys and
libllama tokenizes exactly as llama.cpp would for the same file (which is what our parity tests
compare against HF). `Vocab` owns one `llama_model` handle loaded with vocab_only=True (no
weights, no compute buffers) and frees it on close().

Chat templates: llama.cpp does not run Jinja; llama_chat_apply_template recognises a fixed list
of well-known templates by their text (ChatML by "<|im_start|>", Llama-2/Mistral by "[INST]", ...)
and renders them natively. Our bundled model uses ChatML for that reason. A template llama.cpp does
not recognise is rendered with jinja2 (a dependency of llama-cpp-python) the way transformers'
apply_chat_template renders it.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import gguf

from edgemoe import _lib
from edgemoe.errors import EdgeMoeError, ShardSetError

GGUF_MAGIC = b"GGUF"
LLAMA_TOKEN_NULL = -1
_INT32_MIN = -(2**31)

# ggml_log_level
_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5

llama_token = ctypes.c_int32
_log_callback_t = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_progress_callback_t = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_float, ctypes.c_void_p)


class llama_model_params(ctypes.Structure):
    """include/llama.h `struct llama_model_params` (llama-cpp-python 0.3.36's libllama)."""

    _fields_ = [
        ("devices", ctypes.c_void_p),
        ("tensor_buft_overrides", ctypes.c_void_p),
        ("n_gpu_layers", ctypes.c_int32),
        ("split_mode", ctypes.c_int),
        ("load_mode", ctypes.c_int),
        ("lazy_mode", ctypes.c_int),
        ("main_gpu", ctypes.c_int32),
        ("tensor_split", ctypes.POINTER(ctypes.c_float)),
        ("progress_callback", _progress_callback_t),
        ("progress_callback_user_data", ctypes.c_void_p),
        ("kv_overrides", ctypes.c_void_p),
        ("vocab_only", ctypes.c_bool),
        ("check_tensors", ctypes.c_bool),
        ("use_extra_bufts", ctypes.c_bool),
        ("no_host", ctypes.c_bool),
        ("no_alloc", ctypes.c_bool),
        ("load_mtp", ctypes.c_bool),
    ]


class llama_chat_message(ctypes.Structure):
    _fields_ = [("role", ctypes.c_char_p), ("content", ctypes.c_char_p)]


class _Api:
    """The libllama functions this module calls, with their C signatures."""

    def __init__(self) -> None:
        lib = _lib.llama()
        p, i32, b, sz = ctypes.c_void_p, ctypes.c_int32, ctypes.c_bool, ctypes.c_size_t
        char_p = ctypes.c_char_p
        buf_p = ctypes.POINTER(ctypes.c_char)
        tok_p = ctypes.POINTER(llama_token)

        def bind(name: str, restype: Any, *argtypes: Any) -> Any:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, list(argtypes)
            return fn

        self.backend_init = bind("llama_backend_init", None)
        # The log callback travels as a plain pointer so that any previous one can be restored.
        self.log_get = bind("llama_log_get", None, ctypes.POINTER(p), ctypes.POINTER(p))
        self.log_set = bind("llama_log_set", None, p, p)
        self.model_default_params = bind("llama_model_default_params", llama_model_params)
        self.model_load_from_file = bind("llama_model_load_from_file", p, char_p, llama_model_params)
        self.model_free = bind("llama_model_free", None, p)
        self.model_get_vocab = bind("llama_model_get_vocab", p, p)
        self.model_chat_template = bind("llama_model_chat_template", char_p, p, char_p)
        self.model_meta_val_str = bind("llama_model_meta_val_str", i32, p, char_p, buf_p, sz)
        self.vocab_n_tokens = bind("llama_vocab_n_tokens", i32, p)
        self.vocab_bos = bind("llama_vocab_bos", llama_token, p)
        self.vocab_eos = bind("llama_vocab_eos", llama_token, p)
        self.vocab_eot = bind("llama_vocab_eot", llama_token, p)
        self.vocab_is_eog = bind("llama_vocab_is_eog", b, p, llama_token)
        self.vocab_is_control = bind("llama_vocab_is_control", b, p, llama_token)
        self.vocab_get_add_bos = bind("llama_vocab_get_add_bos", b, p)
        self.vocab_get_add_eos = bind("llama_vocab_get_add_eos", b, p)
        self.vocab_get_text = bind("llama_vocab_get_text", char_p, p, llama_token)
        self.tokenize = bind("llama_tokenize", i32, p, char_p, i32, tok_p, i32, b, b)
        self.token_to_piece = bind("llama_token_to_piece", i32, p, llama_token, buf_p, i32, i32, b)
        self.chat_apply_template = bind(
            "llama_chat_apply_template", i32, char_p, ctypes.POINTER(llama_chat_message), sz, b, buf_p, i32
        )


_api: _Api | None = None
_api_lock = threading.Lock()
_load_lock = threading.Lock()
_errors: list[str] = []  # libllama's error lines since the last clear, for our exception messages
_log_state = {"level": 0}


@_log_callback_t
def _log(level: int, text: bytes | None, _user: Any) -> None:
    # Installed while a vocabulary loads, which logs every metadata key at INFO: show warnings,
    # keep errors for the exception that reports the failed load (not printed twice).
    if level == _LOG_CONT:
        level = _log_state["level"]
    _log_state["level"] = level
    if text is None or level < _LOG_WARN:
        return
    message = text.decode("utf-8", errors="replace")
    if level < _LOG_ERROR:
        sys.stderr.write(message)
    elif message.strip():
        _errors.append(message.strip())


def api() -> _Api:
    """Bind libllama and initialise its backend, once."""
    global _api
    with _api_lock:
        if _api is None:
            bound = _Api()
            bound.backend_init()
            _api = bound
        return _api


def _check_gguf(path: Path) -> None:
    if not path.exists():
        raise ShardSetError(f"{path}: no such file")
    if not path.is_file():
        raise ShardSetError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ShardSetError(f"{path}: cannot read ({exc.strerror})") from exc
    if magic != GGUF_MAGIC:
        raise ShardSetError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")


class Vocab:
    """A model's tokenizer and chat template, read from a GGUF by libllama (vocab only).

    Use as a context manager or call close(); tokenize/detokenize may run from several threads.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        _check_gguf(self.path)
        self._api = api()
        self._model: int | None = None
        params = self._api.model_default_params()
        params.vocab_only = True
        # One load at a time, under our log callback (the process's own is restored after).
        with _load_lock:
            previous, previous_data = ctypes.c_void_p(), ctypes.c_void_p()
            self._api.log_get(ctypes.byref(previous), ctypes.byref(previous_data))
            _errors.clear()
            self._api.log_set(ctypes.cast(_log, ctypes.c_void_p), None)
            try:
                model = self._api.model_load_from_file(os.fsencode(self.path), params)
            finally:
                self._api.log_set(previous, previous_data)
        if not model:
            # The first error line is the specific one; later ones only report the failure.
            why = _errors[0] if _errors else "libllama gave no reason"
            raise ShardSetError(f"{self.path}: libllama could not load the vocabulary ({why})")
        self._model = model
        self._vocab = self._api.model_get_vocab(model)
        self.n_vocab: int = self._api.vocab_n_tokens(self._vocab)
        template = self._api.model_chat_template(model, None)
        self.chat_template: str | None = template.decode("utf-8", errors="replace") if template else None
        # Whether tokenize() adds a leading space to the text (SentencePiece's add_space_prefix):
        # asked of libllama itself rather than re-deriving its per-model defaults.
        probe = self.tokenize("a", add_special=False)
        self._space_prefix = b"".join(self._piece(t, True, 0) for t in probe).startswith(b" ")
        # libllama falls back to per-model default ids (11 for any BPE vocabulary) when the file
        # names no BOS/EOS; a token the file does not declare is no BOS/EOS for us.
        self._declared = {
            key: self._api.model_meta_val_str(model, key.encode(), None, 0) >= 0
            for key in (gguf.Keys.Tokenizer.BOS_ID, gguf.Keys.Tokenizer.EOS_ID)
        }

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        model, self._model = self._model, None
        if model:
            self._api.model_free(model)

    def __enter__(self) -> Vocab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Interpreter shutdown may have torn down ctypes already; close() is the real API.
        try:
            self.close()
        except Exception:
            pass

    def _handle(self) -> int:
        if not self._model:
            raise EdgeMoeError(f"{self.path}: vocabulary is closed")
        return self._vocab

    # -- special tokens ------------------------------------------------------------------------

    @staticmethod
    def _opt(token: int) -> int | None:
        return None if token == LLAMA_TOKEN_NULL else int(token)

    @property
    def bos(self) -> int | None:
        token = self._api.vocab_bos(self._handle())
        return self._opt(token) if self._declared[gguf.Keys.Tokenizer.BOS_ID] else None

    @property
    def eos(self) -> int | None:
        token = self._api.vocab_eos(self._handle())
        return self._opt(token) if self._declared[gguf.Keys.Tokenizer.EOS_ID] else None

    @property
    def eot(self) -> int | None:
        return self._opt(self._api.vocab_eot(self._handle()))

    @property
    def add_bos(self) -> bool:
        return bool(self._api.vocab_get_add_bos(self._handle()))

    @property
    def add_eos(self) -> bool:
        return bool(self._api.vocab_get_add_eos(self._handle()))

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT and the other tokens llama.cpp treats as a stop."""
        return 0 <= token < self.n_vocab and bool(self._api.vocab_is_eog(self._handle(), token))

    def is_control(self, token: int) -> bool:
        self._check_ids([token])
        return bool(self._api.vocab_is_control(self._handle(), token))

    def token_text(self, token: int) -> str:
        """The token as stored in the vocabulary (e.g. 'Ġthe', '▁the', '<0x0A>')."""
        self._check_ids([token])
        return self._api.vocab_get_text(self._handle(), token).decode("utf-8", errors="replace")

    def _check_ids(self, tokens: Sequence[int]) -> None:
        # libllama indexes its token table unchecked (or aborts); never pass it a bad id.
        for t in tokens:
            if not 0 <= t < self.n_vocab:
                raise ValueError(f"token id {t} is outside the vocabulary (0..{self.n_vocab - 1})")

    # -- text <-> tokens -----------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text to token ids. add_special: prepend BOS / append EOS as the model's metadata asks.
        parse_special: text such as "<|im_start|>" becomes that control token (chat prompts)."""
        vocab = self._handle()
        data = text.encode("utf-8")
        if len(data) >= 2**31 - 1:
            raise ValueError(f"text of {len(data)} bytes is too long to tokenize")
        capacity = len(data) + 8
        while True:
            buf = (llama_token * capacity)()
            n = self._api.tokenize(vocab, data, len(data), buf, capacity, add_special, parse_special)
            if n == _INT32_MIN:
                raise ValueError(f"text of {len(data)} bytes gives more tokens than fit in an int32")
            if n >= 0:
                return list(buf[:n])
            capacity = -n

    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        """The bytes one token renders to; may be part of a UTF-8 character (byte tokens), so
        stream through an incremental UTF-8 decoder. special: render control tokens' text."""
        self._check_ids([token])
        return self._piece(token, special, lstrip=0)

    def _piece(self, token: int, special: bool, lstrip: int) -> bytes:
        vocab = self._handle()
        capacity = 32
        while True:
            buf = ctypes.create_string_buffer(capacity)
            n = self._api.token_to_piece(vocab, token, buf, capacity, lstrip, special)
            if n >= 0:
                return buf.raw[:n]
            capacity = -n

    def detokenize(self, tokens: Sequence[int], skip_special: bool = False) -> str:
        """Token ids to text, the exact inverse of tokenize (as HF's decode(ids,
        skip_special_tokens=skip_special) without clean_up_tokenization_spaces): control tokens
        (BOS, <|im_start|>, ...) are rendered as their text unless skip_special.

        Built from the pieces rather than llama_detokenize, which for some pre-tokenizers (GPT-2)
        also removes the space before punctuation, so that its text differs from what streaming
        the same tokens shows."""
        tokens = [int(t) for t in tokens]
        self._check_ids(tokens)
        vocab = self._handle()
        if skip_special:
            tokens = [t for t in tokens if not self._api.vocab_is_control(vocab, t)]
        # The space a SentencePiece vocabulary puts before the text is not part of it.
        pieces = [self._piece(t, not skip_special, lstrip=int(i == 0 and self._space_prefix)) for i, t in enumerate(tokens)]
        return b"".join(pieces).decode("utf-8", errors="replace")

    # -- chat ----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        template: str | None = None,
    ) -> str:
        """Render OpenAI-style messages ({"role", "content"}) into the prompt text; tokenize it
        with parse_special=True. `template` overrides the GGUF's (a Jinja text or a llama.cpp
        template name such as "chatml")."""
        template = template if template is not None else self.chat_template
        if template is None:
            raise EdgeMoeError(f"{self.path}: the model has no chat template (tokenizer.chat_template)")
        pairs = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: expected a mapping with string 'role' and 'content', got {m!r}")
            pairs.append((m["role"].encode("utf-8"), m["content"].encode("utf-8")))
        chat = (llama_chat_message * max(len(pairs), 1))(*[llama_chat_message(r, c) for r, c in pairs])
        tmpl = template.encode("utf-8")
        capacity = 2 * sum(len(r) + len(c) for r, c in pairs) + 256
        while True:
            buf = ctypes.create_string_buffer(capacity)
            n = self._api.chat_apply_template(tmpl, chat, len(pairs), add_generation_prompt, buf, capacity)
            if n < 0:  # not one of llama.cpp's built-in templates
                return self._render_jinja(template, messages, add_generation_prompt)
            if n <= capacity:
                return buf.raw[:n].decode("utf-8", errors="replace")
            capacity = n

    def _render_jinja(self, template: str, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        """Render the way transformers' apply_chat_template does (sandboxed, trim/lstrip blocks),
        within bounds: output size, time, string and list repetition; include/import/extends
        find nothing. A template that breaks a bound or fails is one EdgeMoeError."""
        import jinja2

        def raise_exception(message: str) -> None:
            raise EdgeMoeError(f"{self.path}: chat template: {message}")

        limit = _TEMPLATE_MAX_OUTPUT + 8 * sum(len(str(m.get("content", ""))) for m in messages)
        env = _BoundedSandbox(limit, trim_blocks=True, lstrip_blocks=True,
                              extensions=["jinja2.ext.loopcontrols"], loader=jinja2.DictLoader({}))
        env.globals["raise_exception"] = raise_exception
        specials = {
            name: self.token_to_piece(tok).decode("utf-8", errors="replace") if tok is not None else ""
            for name, tok in (("bos_token", self.bos), ("eos_token", self.eos))
        }
        deadline = time.monotonic() + _TEMPLATE_SECONDS
        previous = sys.gettrace()

        def tracer(frame, event, arg):
            if time.monotonic() > deadline:
                raise _TemplateBound(f"took more than {_TEMPLATE_SECONDS:g} s")
            return tracer

        parts, size = [], 0
        try:
            compiled = env.from_string(template)
            sys.settrace(tracer)
            try:
                for piece in compiled.generate(messages=[dict(m) for m in messages],
                                               add_generation_prompt=add_generation_prompt, **specials):
                    size += len(piece)
                    if size > limit:
                        raise _TemplateBound(f"output exceeds {limit} characters")
                    parts.append(piece)
            finally:
                sys.settrace(previous)
        except EdgeMoeError:
            raise
        except _TemplateBound as exc:
            raise EdgeMoeError(f"{self.path}: chat template refused: it {exc}") from None
        except jinja2.TemplateError as exc:
            raise EdgeMoeError(f"{self.path}: chat template cannot be rendered: {exc}") from None
        except (RecursionError, MemoryError) as exc:
            raise EdgeMoeError(f"{self.path}: chat template refused: {type(exc).__name__}") from None
        except Exception as exc:  # noqa: BLE001 - a template is data: whatever it raises is its fault
            raise EdgeMoeError(f"{self.path}: chat template cannot be rendered: "
                               f"{type(exc).__name__}: {str(exc)[:200]}") from None
        return "".join(parts)


# Bounds on rendering a Jinja chat template from a model file.
_TEMPLATE_MAX_OUTPUT = 1 << 20    # characters, plus 8x the messages' own length
_TEMPLATE_SECONDS = 5.0


class _TemplateBound(Exception):
    pass


def _sandbox_class():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """No `*` or `**` that builds more than the output allows ('ab' * 10**9, 9**9**9)."""

        intercepted_binops = frozenset(["*", "**"])

        def __init__(self, limit: int, **kw):
            super().__init__(**kw)
            self.limit = limit

        def call_binop(self, context, operator, left, right):
            if operator == "**":
                if isinstance(right, (int, float)) and abs(right) > 64:
                    raise _TemplateBound(f"computes a power of {right}")
                return left ** right
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * n > self.limit:
                        raise _TemplateBound(f"repeats {len(seq)} items {n} times")
            return left * right

    return BoundedSandbox


def _BoundedSandbox(limit: int, **kw):
    return _sandbox_class()(limit, **kw)
