"""Train edgemoe's bundled model: a tiny qwen3_moe on Shakespeare and Python source.

Deterministic (seeded; every batch is drawn from a generator seeded by the step number, so a
resumed run sees the same batches) and budgeted by steps. Writes checkpoints to --work-dir and,
at the end, the Hugging Face checkpoint (save_pretrained, float32) with its tokenizer to --out.

Routing objective, besides next-token cross-entropy (see the model card for what was measured):
- a Switch-style balance loss per layer, computed over the whole mixed-domain batch
  (--balance-scope batch) rather than per sequence, so experts may specialise by domain while the
  load stays balanced overall;
- a mutual-information term between 64-token windows and experts (as in Mod-Squad, Chen et al.
  2023): the entropy of each window's mean routing distribution minus the entropy of the batch's,
  i.e. windows should concentrate on few experts while all experts stay in use. This is the
  locality that SwapMoE's virtual experts exploit;
- a router z-loss (ST-MoE) keeping router logits small.

    /work/venv/bin/python scripts/train_bundled.py --steps 3000 --out models/edgemoe-tiny-shakespy
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prepare_corpus  # noqa: E402
import routing_stats  # noqa: E402

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, which llama.cpp recognises by its <|im_start|> marker.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPEECH = re.compile(r"^([A-Z][A-Z0-9'\- ]*):\n(.+)", re.S)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1234
    vocab_size: int = 2048
    n_layer: int = 4
    n_embd: int = 192
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 48
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 128           # moe_intermediate_size
    seq_len: int = 256
    batch: int = 16               # sequences per step, half from each domain
    chat_share: float = 0.125     # of the Shakespeare sequences, the share drawn as ChatML dialogue
    steps: int = 400
    lr: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.1
    balance_scope: str = "batch"  # "batch" or "sequence"
    balance_coef: float = 0.1
    mi_coef: float = 0.05
    z_coef: float = 1e-3
    window: int = 64
    eval_every: int = 50


# ---------------------------------------------------------------- tokenizer and data

def train_tokenizer(corpus: prepare_corpus.Corpus, vocab_size: int):
    """Byte-level BPE with GPT-2's pre-tokenizer regex, trained on both domains' training split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    texts = [d.text for domain in prepare_corpus.DOMAINS for d in corpus.train[domain]]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=None, additional_special_tokens=[IM_START, IM_END],
                                   chat_template=CHAT_TEMPLATE, model_max_length=4096)


def chat_dialogues(docs: list[prepare_corpus.Document]) -> list[str]:
    """ChatML dialogues from consecutive speeches: one speech is the user turn, the reply the next.

    Teaches the chat template and to end a turn with <|im_end|>; the text stays Shakespeare."""
    out = []
    for doc in docs:
        speeches = [m.group(2).strip() for block in doc.text.split("\n\n")
                    if (m := _SPEECH.match(block.strip()))]
        for i in range(0, len(speeches) - 3, 4):
            turns = zip(("user", "assistant", "user", "assistant"), speeches[i:i + 4])
            out.append("".join(f"{IM_START}{role}\n{text}{IM_END}\n" for role, text in turns))
    return out


def encode_texts(tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return np.asarray(ids, dtype=np.int32)


def sample_batch(streams: dict[str, np.ndarray], cfg: TrainConfig, step: int) -> torch.Tensor:
    """(batch, seq_len + 1) token windows; each sequence from one stream, the batch mixing domains."""
    rng = np.random.default_rng([cfg.seed, step])
    n_py = cfg.batch // 2
    n_chat = round((cfg.batch - n_py) * cfg.chat_share)
    sources = ["python"] * n_py + ["chat"] * n_chat + ["shakespeare"] * (cfg.batch - n_py - n_chat)
    rows = []
    for name in sources:
        s = streams[name]
        start = int(rng.integers(0, len(s) - cfg.seq_len - 1))
        rows.append(s[start:start + cfg.seq_len + 1])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


# ---------------------------------------------------------------- model and losses

def build_model(cfg: TrainConfig, tokenizer):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    mcfg = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head_kv,
        head_dim=cfg.head_dim, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        num_experts=cfg.n_expert, num_experts_per_tok=cfg.n_expert_used, moe_intermediate_size=cfg.n_ff_exp,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        router_aux_loss_coef=cfg.balance_coef, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    torch.manual_seed(cfg.seed)
    return Qwen3MoeForCausalLM(mcfg)


def routing_losses(router_logits, cfg: TrainConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over layers of (balance, window-expert mutual information term, z-loss)."""
    bal, mi, z = [], [], []
    for logits in router_logits:  # each (batch*seq_len, n_expert)
        logits = logits.float()
        probs = torch.softmax(logits, dim=-1)
        sel = torch.topk(logits, cfg.n_expert_used, dim=-1).indices
        onehot = torch.zeros_like(probs).scatter_(1, sel, 1.0)  # (tokens, n_expert), no gradient
        if cfg.balance_scope == "batch":
            f, p = onehot.mean(0) / cfg.n_expert_used, probs.mean(0)
            bal.append(cfg.n_expert * (f * p).sum())
        else:
            f = onehot.view(batch, -1, cfg.n_expert).mean(1) / cfg.n_expert_used
            p = probs.view(batch, -1, cfg.n_expert).mean(1)
            bal.append(cfg.n_expert * (f * p).sum(-1).mean())
        pw = probs.view(batch, -1, cfg.window, cfg.n_expert).mean(2)  # (batch, n_window, n_expert)
        h_window = -(pw * torch.log(pw + 1e-9)).sum(-1).mean()
        pg = probs.mean(0)
        h_global = -(pg * torch.log(pg + 1e-9)).sum()
        mi.append(h_window - h_global)
        z.append(torch.logsumexp(logits, dim=-1).pow(2).mean())
    return torch.stack(bal).mean(), torch.stack(mi).mean(), torch.stack(z).mean()


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, cfg: TrainConfig):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# ---------------------------------------------------------------- evaluation during training

@torch.no_grad()
def quick_eval(model, heldout: dict[str, np.ndarray], cfg: TrainConfig, n_tokens: int) -> str:
    model.eval()
    evals, parts = [], []
    for domain, stream in heldout.items():
        ev = routing_stats.evaluate_stream(model, stream[:n_tokens], cfg.seq_len)
        evals.append(ev)
        parts.append(f"{domain} ppl {math.exp(ev.nll_sum / ev.n_predicted):.2f}")
    layers = [routing_stats.layer_routing([ev.selections[i] for ev in evals], cfg.n_expert, cfg.window)
              for i in range(cfg.n_layer)]
    gaps = [100 * (lr.window_best_half - lr.global_best_half) for lr in layers]
    ents = [lr.entropy_bits for lr in layers]
    model.train()
    return (" | ".join(parts) + f" | entropy {' '.join(f'{e:.2f}' for e in ents)}"
            f" | (b)-(c) {' '.join(f'{g:.1f}' for g in gaps)} mean {np.mean(gaps):.1f}")


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, n_new: int = 60) -> str:
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.train()
    return tokenizer.decode(out[0], skip_special_tokens=False)


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "edgemoe-tiny-shakespy")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/edgemoe-train"))
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per domain at each eval")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; on a machine shared with other jobs 1 can be several times faster")
    ap.add_argument("--export-only", action="store_true", help="write --out from the last checkpoint and stop")
    args = ap.parse_args()
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print("config", json.dumps(asdict(cfg)), flush=True)

    from transformers import PreTrainedTokenizerFast

    corpus = prepare_corpus.load_corpus(args.cache_dir)
    tok_dir = args.work_dir / f"tokenizer-{cfg.vocab_size}"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        t0 = time.time()
        tokenizer = train_tokenizer(corpus, cfg.vocab_size)
        tokenizer.save_pretrained(tok_dir)
        print(f"tokenizer trained in {time.time() - t0:.1f}s", flush=True)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    streams = {d: encode_texts(tokenizer, [x.text for x in corpus.train[d]], eos_id) for d in prepare_corpus.DOMAINS}
    streams["chat"] = encode_texts(tokenizer, chat_dialogues(corpus.train["shakespeare"]), eos_id)
    heldout = {d: encode_texts(tokenizer, [x.text for x in corpus.heldout[d]], eos_id) for d in prepare_corpus.DOMAINS}
    for name, s in streams.items():
        print(f"train stream {name}: {len(s)} tokens", flush=True)

    model = build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}", flush=True)
    opt = make_optimizer(model, cfg)
    ckpt = args.work_dir / "ckpt.pt"
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] == asdict(cfg):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            step = state["step"]
            print(f"resumed at step {step}", flush=True)
    model.train()
    t_last, tok_last = time.time(), 0
    while step < cfg.steps and not args.export_only:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = sample_batch(streams, cfg, step)
        out = model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
        ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(),
                                               batch[:, 1:].reshape(-1))
        bal, mi, z = routing_losses(out.router_logits, cfg, cfg.batch)
        loss = ce + cfg.balance_coef * bal + cfg.mi_coef * mi + cfg.z_coef * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tok_last += batch[:, 1:].numel()
        if step % 25 == 0:
            dt = time.time() - t_last
            print(f"step {step} ce {ce.item():.3f} bal {bal.item():.3f} mi {mi.item():.3f} z {z.item():.2f} "
                  f"lr {lr_at(step - 1, cfg):.2e} {tok_last / dt:.0f} tok/s", flush=True)
            t_last, tok_last = time.time(), 0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            print(f"eval step {step}: {quick_eval(model, heldout, cfg, args.eval_tokens)}", flush=True)
            torch.save({"config": asdict(cfg), "model": model.state_dict(), "opt": opt.state_dict(), "step": step},
                       ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
            t_last, tok_last = time.time(), 0

    print("ROMEO sample:", repr(greedy(model, tokenizer, "ROMEO:\n")), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    # Raw text ends at <|endoftext|>, a chat turn at <|im_end|>: generation stops at either.
    model.generation_config.eos_token_id = [eos_id, tokenizer.convert_tokens_to_ids(IM_END)]
    model.save_pretrained(args.out)  # float32: the converter's reference weights, exactly
    tokenizer.save_pretrained(args.out)
    (args.out / "training_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    print(f"saved to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
