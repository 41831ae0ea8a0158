"""The Python API (edgemoe.Model) on a converted tiny model."""
from __future__ import annotations

import threading

import pytest

import edgemoe
from edgemoe.errors import ContextOverflow, EdgeMoeError, ShardSetError
from test_generate import converted_tiny


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return converted_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def model(shards):
    with edgemoe.Model(shards, n_ctx=256, n_batch=32) as m:
        yield m


def test_generate_whole_and_streamed_agree(model):
    text = model.generate("The cat", max_tokens=16, temperature=0)
    pieces = list(model.generate("The cat", max_tokens=16, temperature=0, stream=True))
    assert isinstance(text, str) and text
    assert "".join(pieces) == text
    assert len(pieces) > 1
    stats = model.last_stats
    assert stats.n_generated == 16 and stats.decode_tokens_per_second > 0


def test_seed_reproduces_sampling(model):
    kw = dict(max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = model.generate("Once", seed=11, **kw)
    b = model.generate("Once", seed=11, **kw)
    c = model.generate("Once", seed=12, **kw)
    assert a == b
    assert a != c


def test_create_completion_is_openai_shaped(model):
    out = model.create_completion("Hello", max_tokens=5, temperature=0)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert isinstance(out["created"], int) and out["model"] == model.name
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    n_prompt = len(model.tokenize("Hello"))
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 5,
                            "total_tokens": n_prompt + 5}
    chunks = list(model.create_completion("Hello", max_tokens=5, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len({c["id"] for c in chunks}) == 1


def test_create_chat_completion_uses_the_template(model):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."}]
    out = model.create_chat_completion(messages, max_tokens=8, temperature=0)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant"
    prompt = model.vocab.apply_chat_template(messages, add_generation_prompt=True)
    assert "<|im_start|>assistant" in prompt
    # the template's special tokens are parsed as tokens, not spelled out as text
    assert out["usage"]["prompt_tokens"] == len(model.tokenize(prompt, parse_special=True))
    assert out["usage"]["prompt_tokens"] < len(model.tokenize(prompt, parse_special=False))
    # the same reply, from the raw prompt, through generate's machinery
    chunks = list(model.create_chat_completion(messages, max_tokens=8, temperature=0,
                                               stream=True))
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]


def test_bad_messages_are_rejected(model):
    with pytest.raises(ValueError, match="messages"):
        model.create_chat_completion([{"role": "user"}])
    with pytest.raises(ValueError):
        model.create_chat_completion("hello")


def test_prompt_too_long_raises_before_streaming(model):
    with pytest.raises(ContextOverflow, match="256"):
        model.generate("token " * 400, max_tokens=4, stream=True)


def test_tokenize_detokenize_round_trip(model):
    ids = model.tokenize("Hello, world!", add_special=False)
    assert model.detokenize(ids) == "Hello, world!"


def test_threads_share_a_model_safely(model):
    expected = {p: model.generate(p, max_tokens=12, temperature=0) for p in ("red", "blue")}
    results: dict[str, list[str]] = {"red": [], "blue": []}
    errors: list[BaseException] = []

    def worker(prompt):
        try:
            for _ in range(3):
                results[prompt].append(model.generate(prompt, max_tokens=12, temperature=0))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in ("red", "blue")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert results == {p: [expected[p]] * 3 for p in expected}


def test_open_stream_blocks_a_second_request_in_the_same_thread(model):
    stream = model.generate("abc", max_tokens=20, temperature=0, stream=True)
    next(stream)
    with pytest.raises(EdgeMoeError, match="still open"):
        model.generate("abc", max_tokens=2)
    stream.close()
    assert model.generate("abc", max_tokens=2, temperature=0)


def test_interrupt_ends_a_request_before_its_next_token(model):
    asked = []

    def check():
        asked.append(len(asked))
        return len(asked) > 3

    model.interrupt_when(check)
    try:
        pieces = list(model.generate("The cat", max_tokens=16, temperature=0, stream=True))
    finally:
        model.interrupt_when(None)
    # asked before each decode step: three steps ran, the fourth was not evaluated
    assert model.last_stats.n_generated == 4 and model.last_stats.n_decode_steps == 3
    assert "".join(pieces) == model.generate("The cat", max_tokens=4, temperature=0)
    assert model.generate("The cat", max_tokens=16, temperature=0)  # served as usual after


def test_status_reports_memory_and_experts(model):
    model.generate("hi", max_tokens=3, temperature=0)
    s = model.status()
    assert s["memory_bytes"] == sum(s["memory"].values()) > 0
    assert s["rss_bytes"] > s["memory_bytes"]  # the process holds the backend buffers and more
    assert s["resident_experts"] == s["total_experts"] == 2 * 4
    assert s["hit_rate"] == 1.0  # every expert holds a slot under full routing


def test_close_and_context_manager(shards):
    m = edgemoe.Model(shards, n_ctx=64)
    with m:
        assert m.generate("x", max_tokens=2, temperature=0) is not None
    with pytest.raises(EdgeMoeError, match="closed"):
        m.generate("x", max_tokens=2)
    m.close()  # idempotent


def test_missing_shard_set_is_a_clear_error(tmp_path):
    with pytest.raises(ShardSetError, match="not a directory"):
        edgemoe.Model(tmp_path / "nope")


def test_greedy_text_matches_llama_cpp_python(shards, model, tmp_path):
    """The whole path (tokenize with BOS as the model asks, prefill, decode, stream text)
    against llama-cpp-python's Llama on the same weights exported as one GGUF."""
    pytest.importorskip("llama_cpp")
    import converters
    from llamacpp_ref import open_llama

    gguf = converters.export(shards, tmp_path / "model.gguf")
    llm = open_llama(gguf, n_ctx=128, n_threads=2, flash_attn=True)
    try:
        for prompt in ("The sea", "Hello world, hello", "Once upon a time"):
            tokens = llm.tokenize(prompt.encode(), add_bos=True, special=False)
            assert tokens == model.tokenize(prompt)
            reference = []
            for t in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
                if llm.token_eos() == t or len(reference) == 24:
                    break
                reference.append(t)
            # bytes joined, then decoded as we stream: invalid UTF-8 shows as U+FFFD
            # (llama-cpp-python's own create_completion drops such bytes instead)
            text = b"".join(llm.detokenize([t]) for t in reference).decode("utf-8", "replace")
            assert model.generate(prompt, max_tokens=24, temperature=0) == text
        messages = [{"role": "user", "content": "Hi there"}]
        prompt = model.chat_prompt(messages)
        assert model.tokenize(prompt, parse_special=True) == llm.tokenize(
            prompt.encode(), add_bos=True, special=True)
    finally:
        llm.close()
