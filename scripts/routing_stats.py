"""Held-out perplexity and routing locality of the bundled model.

For each domain's held-out token stream (the same number of tokens per domain), the model reads
consecutive chunks of ``--context`` tokens; every layer's router picks its top-k experts for each
token exactly as the model does (softmax, then top-k). Per layer it reports:

  (a) entropy, in bits, of expert usage over all held-out (token, expert) selections;
  (b) the share of selections served by the best half of the experts chosen afresh for every
      window of ``--window`` consecutive tokens (what virtual experts swapped per window can serve);
  (c) the same share when one best half is chosen for the whole held-out set (static pruning).

and, per domain, the perplexity of the model and of a unigram model fitted on that domain's
training tokens (add-one smoothed) with the same tokenizer.

    /work/venv/bin/python scripts/routing_stats.py --model models/edgemoe-tiny-shakespy
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prepare_corpus  # noqa: E402


@dataclass(frozen=True)
class DomainEval:
    n_predicted: int
    nll_sum: float                 # natural-log loss summed over predicted tokens
    selections: list[np.ndarray]   # per layer: (n_tokens, top_k) expert ids


@dataclass(frozen=True)
class LayerRouting:
    entropy_bits: float
    window_best_half: float        # (b), a fraction
    global_best_half: float        # (c), a fraction


def encode_documents(tokenizer, docs, eos_id: int) -> np.ndarray:
    """One token stream for a list of documents, each followed by the end-of-text token."""
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch([d.text for d in docs]):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return np.asarray(ids, dtype=np.int32)


@torch.no_grad()
def evaluate_stream(model, tokens: np.ndarray, context: int, batch: int = 8) -> DomainEval:
    """Teacher-forced loss and every layer's top-k routing over consecutive chunks of `tokens`."""
    top_k = model.config.num_experts_per_tok
    n_chunks = len(tokens) // context
    chunks = torch.from_numpy(tokens[: n_chunks * context].astype(np.int64)).view(n_chunks, context)
    nll_sum, n_predicted = 0.0, 0
    per_layer: list[list[np.ndarray]] = [[] for _ in range(model.config.num_hidden_layers)]
    for start in range(0, n_chunks, batch):
        ids = chunks[start:start + batch]
        out = model(input_ids=ids, output_router_logits=True, use_cache=False)
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        nll_sum += float(nll.sum())
        n_predicted += nll.numel()
        for layer, logits in enumerate(out.router_logits):
            # (batch*context, n_expert); top-k of the logits is top-k of the softmax
            per_layer[layer].append(torch.topk(logits.float(), top_k, dim=-1).indices.numpy())
    selections = [np.concatenate(parts, axis=0) for parts in per_layer]
    return DomainEval(n_predicted, nll_sum, selections)


def best_half_share(counts: np.ndarray) -> float:
    """Share of selections served by the n_expert/2 most used experts in `counts` (..., n_expert)."""
    half = counts.shape[-1] // 2
    top = np.sort(counts, axis=-1)[..., ::-1][..., :half].sum(axis=-1)
    return float(top.sum() / counts.sum())


def layer_routing(per_domain: list[np.ndarray], n_expert: int, window: int) -> LayerRouting:
    """(a), (b), (c) for one layer from each domain's (n_tokens, top_k) selections."""
    global_counts = np.zeros(n_expert, dtype=np.int64)
    window_counts = []
    for sel in per_domain:
        n_win = len(sel) // window
        onehot = np.zeros((n_win, n_expert), dtype=np.int64)  # (n_window, n_expert)
        win_ids = np.repeat(np.arange(n_win), window * sel.shape[1])
        np.add.at(onehot, (win_ids, sel[: n_win * window].reshape(-1)), 1)
        window_counts.append(onehot)
        global_counts += np.bincount(sel.reshape(-1), minlength=n_expert)
    p = global_counts / global_counts.sum()
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    return LayerRouting(entropy, best_half_share(np.concatenate(window_counts)), best_half_share(global_counts))


def unigram_nll(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Mean natural-log loss of an add-one smoothed unigram model fitted on `train_tokens`."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[eval_tokens].mean())


@dataclass(frozen=True)
class Report:
    perplexity: dict[str, float]
    unigram_perplexity: dict[str, float]
    layers: list[LayerRouting]
    n_tokens: int                  # evaluated tokens per domain
    n_expert: int


def measure(model, tokenizer, corpus, max_tokens: int, context: int, window: int) -> Report:
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    vocab = model.config.vocab_size
    streams = {d: encode_documents(tokenizer, corpus.heldout[d], eos_id) for d in prepare_corpus.DOMAINS}
    # Equal token counts per domain, so neither domain dominates the usage figures.
    n_tokens = min(max_tokens, *(len(s) for s in streams.values()))
    n_tokens -= n_tokens % context
    ppl, uni, evals = {}, {}, []
    for domain, stream in streams.items():
        ev = evaluate_stream(model, stream[:n_tokens], context)
        evals.append(ev)
        ppl[domain] = math.exp(ev.nll_sum / ev.n_predicted)
        train = encode_documents(tokenizer, corpus.train[domain], eos_id)
        uni[domain] = math.exp(unigram_nll(train, stream[:n_tokens], vocab))
    n_expert = model.config.num_experts
    layers = [layer_routing([ev.selections[layer] for ev in evals], n_expert, window)
              for layer in range(model.config.num_hidden_layers)]
    return Report(ppl, uni, layers, n_tokens, n_expert)


def format_report(rep: Report, window: int) -> str:
    lines = [f"held-out tokens per domain: {rep.n_tokens}",
             f"{'domain':12s} {'ppl':>9s} {'unigram ppl':>12s}"]
    for d in rep.perplexity:
        lines.append(f"{d:12s} {rep.perplexity[d]:9.2f} {rep.unigram_perplexity[d]:12.2f}")
    lines.append(f"target entropy >= {math.log2(rep.n_expert) - 0.3:.2f} bits; windows of {window} tokens")
    lines.append(f"{'layer':>5s} {'(a) bits':>9s} {'(b) window %':>13s} {'(c) global %':>13s} {'(b)-(c)':>8s}")
    for i, lr in enumerate(rep.layers):
        gap = 100 * (lr.window_best_half - lr.global_best_half)
        lines.append(f"{i:5d} {lr.entropy_bits:9.3f} {100 * lr.window_best_half:13.1f} "
                     f"{100 * lr.global_best_half:13.1f} {gap:8.1f}")
    mean_gap = 100 * np.mean([lr.window_best_half - lr.global_best_half for lr in rep.layers])
    lines.append(f"mean (b)-(c): {mean_gap:.1f} points; min entropy {min(l.entropy_bits for l in rep.layers):.3f} bits")
    return "\n".join(lines)


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "edgemoe-tiny-shakespy")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--max-tokens", type=int, default=65536, help="held-out tokens per domain")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    corpus = prepare_corpus.load_corpus(args.cache_dir)
    rep = measure(model, tokenizer, corpus, args.max_tokens, args.context, args.window)
    print(format_report(rep, args.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
