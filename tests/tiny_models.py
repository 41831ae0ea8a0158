"""Tiny random Mixture-of-Experts checkpoints built offline with transformers.

`make_tiny_checkpoint(arch, dir)` writes config.json, safetensors (hub tensor names, as
save_pretrained writes them) and a tokenizer from tests/tiny_tokenizers.py whose size is the
model's vocabulary. Converter tests and runtime parity tests share these models.
Weights are drawn with a wider spread than transformers' default (initializer_range 0.02) so
that logits are far from ties and greedy continuations are a meaningful comparison.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tiny_tokenizers import make_bpe_tokenizer, make_spm_tokenizer

# Architectures whose llama.cpp graph computes another model than transformers' on the same
# weights (phimoe: RMSNorm for LayerNorm, softmax top-2 for sparsemixer; see
# test_parity_llamacpp.py): llama.cpp is no oracle for them.
LLAMACPP_GRAPH_DIFFERS = ("phimoe",)

VOCAB_SIZE = 384  # used with tokenizer=None (tensor-only checkpoints)

# Shared shape of every tiny model: hidden 64, 2 layers, 4 experts, top-2, 4 heads of 16.
_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    tie_word_embeddings=False,
)

_PER_ARCH = {
    "mixtral": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                    rope_theta=10000.0),
    "qwen2_moe": dict(intermediate_size=128, moe_intermediate_size=64,
                      shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                      use_sliding_window=False, rope_theta=10000.0),
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[], head_dim=16, use_sliding_window=False,
                      rope_theta=10000.0),
    # llama.cpp's olmoe graph normalises K over the whole n_embd, so no grouped-query attention;
    # the hub config's eos id (50279) lies outside a tiny vocabulary.
    "olmoe": dict(intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                  num_key_value_heads=4, norm_topk_prob=False, rope_theta=10000.0,
                  pad_token_id=1, eos_token_id=2),
    # Granite's multipliers away from 1 so that their GGUF keys are exercised.
    "granitemoe": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                       embedding_multiplier=2.0, residual_multiplier=0.5,
                       attention_multiplier=0.2, logits_scaling=1.5, rope_theta=10000.0),
    # Every optional bias present; a jitter epsilon large enough that sparsemixer keeps some
    # experts beside the chosen one in its softmax and drops others.
    # LongRoPE as Phi-3.5-MoE has it (short factors within the original context).
    "phimoe": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                   attention_bias=True, lm_head_bias=True, router_jitter_noise=0.1,
                   rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                    "original_max_position_embeddings": 64,
                                    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
                                    "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
                                    "short_mscale": 1.2, "long_mscale": 1.2}),
    # DeepSeek-V2-Lite's layout (q without low rank) and the full model's (q_lora_rank set): a
    # dense first layer, two shared experts, a routed scaling factor. Its q/kv low-rank norms use
    # eps 1e-6 whatever rms_norm_eps says, and llama.cpp uses rms_norm_eps for them: keep both.
    "deepseek_v2": dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4,
                        n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
                        num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=32,
                        q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16,
                        v_head_dim=32, routed_scaling_factor=1.5, rms_norm_eps=1e-6,
                        rope_theta=10000.0),
}
# The full model's layout also has its YaRN RoPE (mscale = mscale_all_dim, as published).
_PER_ARCH["deepseek_v2_q_lora"] = {
    **_PER_ARCH["deepseek_v2"], "model_type": "deepseek_v2", "q_lora_rank": 32,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                        "original_max_position_embeddings": 64, "beta_fast": 32,
                        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}
# gpt-oss with plain RoPE (the published models use YaRN) and a window of 8 tokens, so that the
# sliding layers of a 32-token sequence do forget.
_PER_ARCH["gpt_oss"] = dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                            head_dim=16, sliding_window=8,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


# Every tiny model the tests run: one entry above per architecture (or layout of one).
ARCHS = tuple(_PER_ARCH)


def model_type(arch: str) -> str:
    """transformers' model type of a tiny arch (a layout variant names its model's)."""
    return _PER_ARCH[arch].get("model_type", arch)


def expert_count_key(arch: str) -> str:
    """The config field that sets the number of routed experts of a tiny arch."""
    return next(k for k in ("num_local_experts", "num_experts", "n_routed_experts")
                if k in _PER_ARCH[arch])


def _config(arch: str, vocab_size: int, overrides: dict):
    import transformers

    kwargs = {**_COMMON, **_PER_ARCH[arch], "vocab_size": vocab_size, **overrides}
    kwargs.pop("model_type", None)
    return transformers.AutoConfig.for_model(model_type(arch), **kwargs)


def _tokenizer(kind: str | None, out: Path) -> int | None:
    """Save the tokenizer into `out`; returns its vocabulary size (None without a tokenizer)."""
    builder = {"bpe": make_bpe_tokenizer, "spm": make_spm_tokenizer, None: None}[kind]
    if builder is None:
        return None
    builder(out)
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(out))


def make_tiny_checkpoint(arch: str, out: str | Path, seed: int = 0, dtype: str = "float32",
                         tokenizer: str | None = "bpe", max_shard_size: str | None = None,
                         **config_overrides) -> Path:
    """A random `arch` checkpoint in `out` (created). `dtype` is float32, bfloat16 or float16;
    `max_shard_size` (e.g. "200KB") splits the weights over several files with an index;
    `config_overrides` replace config fields (e.g. hidden_size=256 to exercise K-quants)."""
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {ARCHS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_vocab = _tokenizer(tokenizer, out) or VOCAB_SIZE
    config = _config(arch, n_vocab, config_overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(getattr(torch, dtype)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def make_tiny_shards(arch: str, root: str | Path, qtype: str = "F32", seed: int = 0,
                     **config_overrides) -> Path:
    """A tiny random `arch` checkpoint (root/{arch}_hf) converted with every matrix in `qtype`
    into the shard set root/{arch}, which is returned."""
    import converters

    root = Path(root)
    ckpt = make_tiny_checkpoint(arch, root / f"{arch}_hf", seed=seed, **config_overrides)
    converters.convert(ckpt, root / arch, expert_type=qtype, dense_type=qtype, progress=False)
    return root / arch


def load_reference(checkpoint: str | Path):
    """The float32 transformers model of a checkpoint, for parity tests."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return model.eval()


def config_of(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / "config.json").read_text())


def cached_checkpoint(root: str | Path, arch: str, **kwargs) -> Path:
    """make_tiny_checkpoint into `root`, built once per distinct arguments (test modules share
    checkpoints this way within one pytest run without a conftest)."""
    key = hashlib.sha256(json.dumps([arch, kwargs], sort_keys=True).encode()).hexdigest()[:12]
    out = Path(root) / f"{arch}-{key}"
    done = out / ".complete"
    if not done.exists():
        make_tiny_checkpoint(arch, out, **kwargs)
        done.touch()
    return out


def greedy_tokens(engine, prompt, n: int, records: list | None = None) -> list[int]:
    """n greedy tokens after `prompt` straight from an engine (argmax of its logits, no
    sampler), appending each decode step's telemetry record (engine.last_step) to `records`."""
    row = engine.eval(prompt, all_logits=False)[-1]
    out = []
    for _ in range(n):
        out.append(int(row.argmax()))
        row = engine.eval([out[-1]])[-1]
        if records is not None:
            records.append(engine.last_step)
    return out
