"""`edgemoe perplexity`: llama-perplexity's command on a shard set, under any budget and policy.

    edgemoe perplexity MODEL -f wiki.test.raw -c 512 -t 1
    edgemoe perplexity MODEL -f text.txt --save-logits full.logits
    edgemoe perplexity MODEL -f text.txt --kl-base full.logits --memory-budget 50% --policy swap

The protocol is in edgemoe.perplexity; this module parses and prints.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgemoe.errors import EdgeMoeError


def register(subparsers) -> None:
    from edgemoe.cli_run import _add_model_args

    p = subparsers.add_parser(
        "perplexity", help="perplexity of a model on a text file (llama-perplexity's protocol)",
        description="Split the text into windows of -c tokens; in each, evaluate the first half "
        "as a prompt, then decode the rest token by token (so residency adapts as in a chat) and "
        "score the second half. Prints the running estimate per window and ends with "
        "'Final estimate: PPL = ... +/- ...'. With --save-logits from the full model and "
        "--kl-base under a budget: KL divergence and top-1 agreement with the full model.")
    _add_model_args(p)
    p.set_defaults(ctx_size=512)
    p.add_argument("-f", "--file", type=Path, required=True, metavar="TEXT",
                   help="text file to evaluate (UTF-8)")
    p.add_argument("--chunks", type=int, default=None, metavar="N",
                   help="evaluate at most N windows (default: all the text gives)")
    p.add_argument("--save-logits", type=Path, default=None, metavar="FILE",
                   help="write the log-probabilities of every scored position (float16) to "
                   "FILE, the reference for --kl-base")
    p.add_argument("--kl-base", type=Path, default=None, metavar="FILE",
                   help="compare with a --save-logits FILE of the same text and -c: mean KL "
                   "divergence, top-1 agreement and PPL ratio")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="also write the results as JSON to FILE")
    p.set_defaults(func=cmd_perplexity)


def _out(text: str, end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def cmd_perplexity(args: argparse.Namespace) -> int:
    from edgemoe import perplexity
    from edgemoe.cli_run import open_model, report_residency

    if args.ctx_size < 4:
        raise EdgeMoeError(f"-c {args.ctx_size}: perplexity needs a context of at least 4 tokens")
    if args.save_logits is not None and args.kl_base is not None \
            and args.save_logits.resolve() == args.kl_base.resolve():
        raise EdgeMoeError("--save-logits and --kl-base name the same file")
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeMoeError(f"{args.file}: cannot read the text ({exc})") from None
    with open_model(args) as model:
        vocab = model.vocab
        tokens = vocab.tokenize(text, add_special=True)
        bos = vocab.bos if vocab.add_bos else None
        n_chunk = perplexity.n_windows(len(tokens), args.ctx_size, args.chunks)
        print(f"perplexity: {len(tokens)} tokens; calculating perplexity over {n_chunk} chunks, "
              f"n_ctx={args.ctx_size}, batch_size={min(args.batch_size, args.ctx_size)}",
              file=sys.stderr)

        def progress(i, n, ppl, seconds):
            if i == 0:
                eta = seconds * n / 60
                print(f"perplexity: {seconds:.2f} seconds per pass - ETA {eta:.2f} minutes",
                      file=sys.stderr)
            _out(f"[{i + 1}]{ppl:.4f},", end="")

        res = perplexity.evaluate(model.engine, tokens, args.ctx_size, bos=bos,
                                  n_chunks=args.chunks, save_logits=args.save_logits,
                                  kl_base=args.kl_base, progress=progress)
        _out("")
        report_residency(model, args)
        doc = res.to_dict()
        doc.update(model=str(args.shards), text=str(args.file),
                   policy=model.engine.policy.name if model.engine.policy else "full",
                   memory_budget=args.memory_budget)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(doc, indent=1) + "\n")
        except OSError as exc:
            raise EdgeMoeError(f"{args.json}: cannot write the results ({exc.strerror})") from None
    _out(f"experts per token: {res.experts_per_token:.3f} per MoE layer (top-{res.n_expert_used});"
         f" {res.n_scored} tokens scored in {res.decode_seconds:.1f} s of decoding "
         f"({res.n_scored / max(res.decode_seconds, 1e-9):.2f} tok/s)")
    if args.save_logits is not None:
        _out(f"saved the log-probabilities of {res.n_scored} positions to {args.save_logits}")
    if res.kl is not None:
        kl = res.kl
        _out(f"Mean    KLD: {kl.mean_kl:10.6f} ± {kl.kl_err:10.6f}")
        _out(f"Same top p: {100 * kl.agreement:6.3f} ± {100 * kl.agreement_err:5.3f} %")
        _out(f"PPL ratio:  {kl.ppl_ratio:.6f} (base PPL {kl.base_ppl:.4f})")
    _out(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_err:.5f}")
    return 0
