#!/usr/bin/env python3
"""Perplexity of the residency policies at a budget on held-out text that alternates domains:
the quality half of "how fast, how good" (a lossy setting's speed is never reported alone).

    python scripts/quality_at_budget.py SHARDS --budgets 50% 25% --policies static swap

Builds the text from the bundled model's held-out split (scripts/prepare_corpus.py: documents no
training step saw), alternating Shakespeare and Python every --switch characters (so residency
has to follow topic changes, as in a chat that moves between them), writes it to --workdir, then
runs `edgemoe perplexity` (one thread) for the full model (saving its logits) and for every
policy and budget (KL and top-1 agreement against the full model), and prints one table:
policy, budget, perplexity, ratio to full, KL, top-1 agreement, experts per token, and from
the residency telemetry (--stats-json) waits, substitute runs and drops per token (prefill
included) and the hit rate.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def alternating_text(n_chars: int, switch: int, split: str = "heldout") -> str:
    """n_chars of held-out text (split="train": of training text, e.g. for `edgemoe
    calibrate --text`), switch characters of Shakespeare then of Python, and so on (each piece
    cut at a line end)."""
    from prepare_corpus import load_corpus

    corpus = load_corpus()
    streams = {d: "\n".join(doc.text for doc in getattr(corpus, split)[d])
               for d in ("shakespeare", "python")}
    pos = {d: 0 for d in streams}
    out, n, domain = [], 0, "shakespeare"
    while n < n_chars:
        text = streams[domain]
        end = text.find("\n", pos[domain] + switch)
        piece = text[pos[domain]:end + 1 if end >= 0 else None]
        pos[domain] += len(piece)
        out.append(piece)
        n += len(piece)
        domain = "python" if domain == "shakespeare" else "shakespeare"
    return "".join(out)


def perplexity(shards, text: Path, ctx: int, extra: list[str], out_json: Path) -> dict:
    stats = out_json.with_suffix(".stats.json")
    cmd = [sys.executable, "-m", "edgemoe", "perplexity", str(shards), "-f", str(text),
           "-c", str(ctx), "-t", "1", "--json", str(out_json), "--stats-json", str(stats),
           *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    out = json.loads(out_json.read_text())
    out["residency"] = json.loads(stats.read_text())["run"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards", type=Path)
    ap.add_argument("--budgets", nargs="+", default=["50%", "25%"])
    ap.add_argument("--policies", nargs="+", default=["static", "swap"],
                    help="policy names, or NAME:--flag=value,--flag=value for extra options")
    ap.add_argument("--chars", type=int, default=60_000, help="length of the text")
    ap.add_argument("--switch", type=int, default=1500, help="characters per domain piece")
    ap.add_argument("-c", "--ctx-size", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edgemoe-quality"))
    ap.add_argument("--write-calibration-text", type=Path, metavar="FILE",
                    help="only write --chars of alternating *training* text to FILE (for "
                    "`edgemoe calibrate --text`: usage counts from both domains) and exit")
    args = ap.parse_args()
    if args.write_calibration_text:
        args.write_calibration_text.write_text(alternating_text(args.chars, args.switch, "train"))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    text = args.workdir / "heldout_alternating.txt"
    text.write_text(alternating_text(args.chars, args.switch))
    base = args.workdir / "full_logits.npz"
    rows = [("full", "-", perplexity(args.shards, text, args.ctx_size,
                                      ["--save-logits", str(base)], args.workdir / "full.json"))]
    full_ppl = rows[0][2]["ppl"]
    for budget in args.budgets:
        for spec in args.policies:
            name, _, flags = spec.partition(":")
            extra = ["--memory-budget", budget, "--policy", name, "--kl-base", str(base)]
            extra += [f for f in flags.split(",") if f]
            tag = spec.replace(":", "_").replace(",", "_").replace("=", "").replace("-", "")
            rows.append((spec, budget, perplexity(args.shards, text, args.ctx_size, extra,
                                                  args.workdir / f"{tag}_{budget[:-1]}.json")))
    print(f"text: {text} ({len(text.read_text())} chars, alternating every {args.switch}); "
          f"context {args.ctx_size}")
    print(f"{'policy':28s} {'budget':>6s} {'PPL':>8s} {'vs full':>8s} {'KL':>7s} {'top-1':>6s} "
          f"{'exp/tok':>7s} {'waits':>6s} {'subst':>6s} {'drops':>6s} {'hit':>6s}")
    nan = float("nan")
    for spec, budget, r in rows:
        kl = r.get("kl") or {}
        res = r.get("residency") or {}
        print(f"{spec:28s} {budget:>6s} {r['ppl']:8.3f} {r['ppl'] / full_ppl - 1:+8.1%} "
              f"{kl.get('mean_kl', nan):7.4f} {kl.get('agreement', nan):6.3f} "
              f"{r['experts_per_token']:7.2f} " + " ".join(
                  f"{v:6.2f}" if v is not None else f"{'-':>6s}" for v in (
                      res.get("waits_per_token"), res.get("substitutes_per_token"),
                      res.get("drops_per_token"))) + (
                  f" {res['hit_rate']:6.1%}" if res.get("hit_rate") is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
