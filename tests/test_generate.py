"""The generation loop. Unit tests drive it with a scripted fake engine and vocabulary (so that
UTF-8 splits, stop strings and EOG can be placed exactly); the end-to-end tests at the bottom run
a real converted tiny model."""
from __future__ import annotations

import numpy as np
import pytest

from edgemoe.errors import ContextOverflow
from edgemoe.generate import FINISH_LENGTH, FINISH_STOP, Generator, _StopMatcher
from edgemoe.sampling import GREEDY, SamplingParams


class FakeVocab:
    """Token i renders as PIECES[i]; 0 is BOS, 1 is EOS."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces
        self.n_vocab = len(pieces)
        self.bos = 0
        self.eos = 1

    def tokenize(self, text, add_special=True, parse_special=False):
        # one token per character, looked up by its UTF-8 bytes; enough for prompts
        ids = [self.pieces.index(ch.encode()) for ch in text]
        return ([self.bos] if add_special else []) + ids

    def token_to_piece(self, token):
        return self.pieces[token]

    def is_eog(self, token):
        return token == self.eos


class FakeEngine:
    """Greedy decoding of this engine follows SCRIPT: after token t comes script[t]."""

    def __init__(self, n_vocab, script, n_ctx=64, n_batch=4):
        self.n_vocab = n_vocab
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.script = script
        self.n_past = 0
        self.calls: list[list[int]] = []

    def eval(self, tokens, *, logits_from=0):
        assert 0 < len(tokens) <= self.n_batch
        assert self.n_past + len(tokens) <= self.n_ctx
        self.calls.append(list(tokens))
        self.n_past += len(tokens)
        out = np.zeros((len(tokens), self.n_vocab), dtype=np.float32)
        for row, t in enumerate(tokens):
            out[row, self.script.get(t, 1)] = 10.0
        return out[logits_from:] if logits_from >= 0 else out[len(tokens) + logits_from:]

    def truncate(self, n):
        assert 0 <= n <= self.n_past
        self.n_past = n

    def reset(self):
        self.n_past = 0


PIECES = [b"<s>", b"</s>", b"a", b"b", b"\xc3", b"\xa9", b"Hel", b"lo ", b"wor", b"ld", b"!",
          b"\xf0\x9f", b"\x98\x80", b" "]
T = {p: i for i, p in enumerate(PIECES)}


def make(script, **kw):
    vocab = FakeVocab(PIECES)
    engine = FakeEngine(len(PIECES), script, **kw)
    return Generator(engine, vocab), engine


def chain(*pieces: bytes) -> dict[int, int]:
    """A script that, from prompt token 'a', emits the given pieces in order then EOS."""
    ids = [T[b"a"]] + [T[p] for p in pieces]
    return {a: b for a, b in zip(ids, ids[1:])} | {ids[-1]: T[b"</s>"]}


def test_utf8_split_across_tokens_is_streamed_whole():
    gen, _ = make(chain(b"\xc3", b"\xa9", b" ", b"\xf0\x9f", b"\x98\x80"))
    g = gen.generate("a", 20, GREEDY)
    pieces = list(g)
    assert "".join(pieces) == "é 😀"
    assert all("\ufffd" not in p for p in pieces)
    assert g.finish_reason == FINISH_STOP
    assert g.tokens[-1] == T[b"</s>"]  # EOS is recorded but not rendered


def test_incomplete_utf8_at_the_end_becomes_replacement_char():
    gen, _ = make(chain(b"b", b"\xc3"))
    g = gen.generate("a", 2, GREEDY)
    assert g.run() == "b\ufffd"
    assert g.finish_reason == FINISH_LENGTH


def test_stop_string_split_across_tokens_is_not_emitted():
    gen, _ = make(chain(b"Hel", b"lo ", b"wor", b"ld", b"!"))
    g = gen.generate("a", 20, GREEDY, stop=["o w"])
    pieces = list(g)
    assert "".join(pieces) == "Hell"
    assert g.finish_reason == FINISH_STOP
    assert len(g.tokens) == 3  # stopped as soon as "wor" completed the stop string


def test_held_back_prefix_is_released_when_it_is_not_a_stop():
    gen, _ = make(chain(b"Hel", b"lo ", b"wor", b"ld", b"!"))
    g = gen.generate("a", 20, GREEDY, stop=["lo x", "d?"])
    pieces = list(g)
    assert "".join(pieces) == "Hello world!"
    # a tail that could start "lo x" or "d?" is held until the next token rules it out
    assert pieces == ["He", "l", "lo wor", "l", "d!"]
    assert g.finish_reason == FINISH_STOP  # by EOS


def test_stop_matcher_earliest_stop_wins():
    m = _StopMatcher(("cd", "b"))
    assert m.feed("abcd") == ("a", True)


def test_max_tokens_gives_length():
    gen, _ = make({T[b"a"]: T[b"b"], T[b"b"]: T[b"b"]})
    g = gen.generate("a", 5, GREEDY)
    assert g.run() == "bbbbb"
    assert g.finish_reason == FINISH_LENGTH
    assert g.stats.n_generated == 5 and g.stats.n_decode_steps == 4


def test_prompt_that_does_not_fit_is_a_clear_error():
    gen, engine = make({}, n_ctx=8)
    with pytest.raises(ContextOverflow, match="8"):
        gen.generate("a" * 8, 4, GREEDY)  # 9 tokens with BOS
    assert engine.calls == []


def test_full_context_ends_with_length():
    gen, engine = make({T[b"a"]: T[b"b"], T[b"b"]: T[b"b"]}, n_ctx=8)
    g = gen.generate("aaa", None, GREEDY)  # 4 prompt tokens
    assert g.run() == "bbbbb"  # 4 fit in the cache, the 5th is sampled from the last logits
    assert g.finish_reason == FINISH_LENGTH
    assert engine.n_past == 8


def test_prefill_is_batched_and_a_shared_prefix_is_reused():
    gen, engine = make({T[b"a"]: T[b"b"], T[b"b"]: T[b"</s>"]}, n_batch=4)
    g = gen.generate("aaaaaaaaa", 10, GREEDY)  # BOS + 9 = 10 tokens
    assert g.run() == "b"
    assert [len(c) for c in engine.calls] == [4, 4, 2, 1]
    assert g.stats.n_prompt_evaluated == 10
    engine.calls.clear()
    # the next turn: the previous prompt + reply + more; only the new part is evaluated
    prompt = [0] + [T[b"a"]] * 9 + [T[b"b"], T[b"a"], T[b"a"]]
    g2 = gen.generate(prompt, 10, GREEDY)
    g2.run()
    assert engine.calls[0] == [T[b"a"], T[b"a"]]
    assert g2.stats.n_prompt_evaluated == 2


def test_same_prompt_twice_reevaluates_only_the_last_token():
    gen, engine = make({T[b"a"]: T[b"b"], T[b"b"]: T[b"</s>"]})
    first = gen.generate("aa", 10, GREEDY).run()
    engine.calls.clear()
    assert gen.generate("aa", 10, GREEDY).run() == first
    assert engine.calls[0] == [T[b"a"]]


def test_interrupted_generation_leaves_a_consistent_cache():
    gen, engine = make({T[b"a"]: T[b"b"], T[b"b"]: T[b"b"]})
    g = gen.generate("a", 50, GREEDY)
    it = iter(g)
    next(it)
    next(it)
    g.close()
    assert g.finish_reason is None
    # simulate an eval that ran after our bookkeeping (e.g. Ctrl-C between the two)
    engine.n_past += 1
    engine.calls.clear()
    g2 = gen.generate("ab", 3, GREEDY)
    assert g2.run() == "bbb"
    assert engine.n_past == len(g2.prompt_tokens) + 2


def test_sampled_generation_is_reproducible_with_a_seed():
    def run(seed):
        noise = np.random.default_rng(0)  # the same logits every run

        class NoisyEngine(FakeEngine):
            def eval(self, tokens, **kw):
                n = len(super().eval(tokens, **kw))
                return noise.normal(size=(n, self.n_vocab)).astype(np.float32)

        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        g = Generator(NoisyEngine(len(PIECES), {}), FakeVocab(PIECES)).generate("a", 12, params)
        g.run()
        return g.tokens

    assert run(42) == run(42)
    assert run(42) != run(7)


# ------------------------------------------------------------ end to end, real tiny model --

_CONVERTED: dict[str, object] = {}


def converted_tiny(tmp_path_factory, arch: str = "qwen3_moe"):
    """A tiny random checkpoint converted to a Q8_0 shard set, built once per test session
    (the API, CLI and chat tests import this)."""
    if arch not in _CONVERTED:
        import converters
        from tiny_models import make_tiny_checkpoint

        root = tmp_path_factory.mktemp(f"tiny_{arch}")
        make_tiny_checkpoint(arch, root / "ckpt")
        converters.convert(root / "ckpt", root / "shards", expert_type="Q8_0",
                           dense_type="Q8_0", progress=False)
        _CONVERTED[arch] = root / "shards"
    return _CONVERTED[arch]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from edgemoe.engine import Engine
    from edgemoe.tokenizer import Vocab

    shards = converted_tiny(tmp_path_factory)
    engine = Engine(shards, n_ctx=64, n_batch=16)
    vocab = Vocab(engine.base_path)
    yield Generator(engine, vocab)
    engine.close()
    vocab.close()


def test_greedy_generation_matches_teacher_forced_argmax(real):
    real.reset()
    g = real.generate("The history of", 12, GREEDY)
    g.run()
    assert len(g.tokens) >= 1
    # Oracle: one fresh batched evaluation of prompt + generated tokens; the argmax at each
    # position must be the token generated after it.
    real.reset()
    seq = g.prompt_tokens + g.tokens[:-1]
    logits = real.engine.eval(seq)  # (len(seq), n_vocab)
    real._cached = list(seq)
    assert np.argmax(logits[len(g.prompt_tokens) - 1:], axis=1).tolist() == g.tokens


def test_streamed_text_equals_libllama_detokenize(real):
    real.reset()
    g = real.generate("Hello", 40, SamplingParams(seed=3, temperature=1.2, top_k=0, min_p=0.0))
    pieces = list(g)
    produced = [t for t in g.tokens if not real.vocab.is_eog(t)]
    assert "".join(pieces) == real.vocab.detokenize(produced)


def test_reused_prefix_gives_the_same_continuation(real):
    real.reset()
    first = real.generate("Once upon a time", 10, GREEDY).run()
    again = real.generate("Once upon a time", 10, GREEDY)  # KV reused for all but one token
    assert again.run() == first
    assert again.stats.n_prompt_evaluated == 1


def test_stop_string_on_a_real_model(real):
    real.reset()
    full = real.generate("abc", 30, GREEDY).run()
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    g = real.generate("abc", 30, GREEDY, stop=[stop])
    assert g.run() == full[: full.index(stop)]
    assert g.finish_reason == FINISH_STOP


def test_context_limits_on_a_real_model(real):
    real.reset()
    with pytest.raises(ContextOverflow, match="64"):
        real.generate("word " * 100, 4, GREEDY)
    g = real.generate("a b c", None, GREEDY)
    g.run()
    # this seeded random model emits no EOS within 64 tokens, so the context fills
    assert g.finish_reason == FINISH_LENGTH
    assert real.engine.n_past == real.engine.n_ctx
    assert len(g.prompt_tokens) + len(g.tokens) == real.engine.n_ctx + 1


def test_zero_max_tokens_evaluates_nothing():
    gen, engine = make({})
    g = gen.generate("ab", 0, GREEDY)
    assert g.run() == "" and g.finish_reason == FINISH_LENGTH
    assert engine.calls == [] and g.stats.n_prompt_evaluated == 0
