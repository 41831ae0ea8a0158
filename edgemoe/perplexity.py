"""Perplexity of a model on a text, in llama-perplexity's protocol, decoded as a chat decodes.

The token stream is cut into non-overlapping windows of n_ctx tokens (the first token of each
replaced by BOS when the vocabulary adds one). Each window starts from an empty KV cache: its
first half is evaluated as one prompt, then the rest is decoded token by token, in order, and
the logits at positions n_ctx/2 .. n_ctx-2 score the tokens that follow them (n_ctx/2 - 1 per
window, as llama-perplexity scores). Decoding one token per step, rather than teacher-forcing
the second half in one batch, lets a residency policy adapt to the text as it would in a chat,
so a lossy policy's figures here are the figures a user meets.

Against a reference run (`save_logits` of the full model, then `kl_base` under a budget) each
scored position also gives the KL divergence from the reference distribution and whether the
top-1 token agrees. Log-probabilities are stored as float16, both sides are compared after the
same rounding, so identical logits give KL exactly 0 and 100% agreement.

The logits file is a zip of .npy members (np.load reads it): `tokens` int32 (the evaluated
tokens, n_chunk * n_ctx), `n_ctx` int64, `logprobs` float16 (n_scored, n_vocab) log-softmax of
every scored position, written and read one row at a time, and `nll` float64 (n_scored,) the
negative log-likelihood of each scored token (the reference's perplexity, unrounded).
"""
from __future__ import annotations

import math
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgemoe.errors import EdgeMoeError


@dataclass
class KLStats:
    """Against a reference run on the same tokens."""
    mean_kl: float
    kl_err: float            # standard error of the mean
    agreement: float         # fraction of scored positions whose top-1 token agrees
    agreement_err: float
    base_ppl: float
    ppl_ratio: float         # this run's PPL / the reference's


@dataclass
class PerplexityResult:
    n_ctx: int
    n_chunk: int
    n_scored: int
    ppl: float
    ppl_err: float
    experts_per_token: float   # experts computed per (scored token, MoE layer)
    n_expert_used: int         # the model's top-k
    seconds: float             # wall time of the evaluation
    decode_seconds: float      # of which the token-by-token second halves
    chunk_ppl: list[float] = field(default_factory=list)   # running estimate after each window
    kl: KLStats | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def n_windows(n_tokens: int, n_ctx: int, n_chunks: int | None = None) -> int:
    """How many windows of n_ctx tokens the text gives (at most n_chunks)."""
    n = n_tokens // n_ctx
    return n if n_chunks is None or n_chunks < 0 else min(n, n_chunks)


def _log_softmax(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    x -= x.max()
    return x - math.log(np.exp(x).sum())


class _NpyRowWriter:
    """One .npy member of a zip, written row by row (the shape is known up front)."""

    def __init__(self, zf: zipfile.ZipFile, name: str, shape: tuple[int, int], dtype) -> None:
        self._f = zf.open(name, "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                  "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(self._f, header)
        self.dtype = np.dtype(dtype)
        self.rows_left = shape[0]

    def write(self, row: np.ndarray) -> None:
        if self.rows_left <= 0:
            raise EdgeMoeError("internal: more rows than announced in the logits file")
        self._f.write(np.ascontiguousarray(row, dtype=self.dtype).tobytes())
        self.rows_left -= 1

    def close(self) -> None:
        self._f.close()


class LogitsWriter:
    """The logits file of a reference run (see the module docstring)."""

    def __init__(self, path: str | Path, tokens: np.ndarray, n_ctx: int, n_rows: int,
                 n_vocab: int) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        try:
            self._zf = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED)
        except OSError as exc:
            raise EdgeMoeError(f"{self.path}: cannot write the logits ({exc.strerror})") from None
        with self._zf.open("tokens.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(tokens, dtype=np.int32))
        with self._zf.open("n_ctx.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(n_ctx, dtype=np.int64))
        self._rows = _NpyRowWriter(self._zf, "logprobs.npy", (n_rows, n_vocab), np.float16)
        self._nll: list[float] = []

    def write(self, logprobs16: np.ndarray, nll: float) -> None:
        self._rows.write(logprobs16)
        self._nll.append(nll)

    def close(self, complete: bool = True) -> None:
        """Finish the file (renamed into place only when every row was written)."""
        self._rows.close()
        with self._zf.open("nll.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(self._nll, dtype=np.float64))
        self._zf.close()
        if complete and self._rows.rows_left == 0:
            self._tmp.replace(self.path)
        else:
            self._tmp.unlink(missing_ok=True)


class LogitsReader:
    """Reads a logits file's rows in order, checking it matches the run comparing against it."""

    def __init__(self, path: str | Path, tokens: np.ndarray, n_ctx: int, n_rows: int,
                 n_vocab: int) -> None:
        self.path = Path(path)
        try:
            self._zf = zipfile.ZipFile(self.path)
            names = set(self._zf.namelist())
            missing = {"tokens.npy", "n_ctx.npy", "logprobs.npy", "nll.npy"} - names
            if missing:
                raise EdgeMoeError(f"{self.path}: not a logits file of `edgemoe perplexity "
                                   f"--save-logits` (missing {', '.join(sorted(missing))})")
            with self._zf.open("tokens.npy") as f:
                base_tokens = np.lib.format.read_array(f)
            with self._zf.open("n_ctx.npy") as f:
                base_ctx = int(np.lib.format.read_array(f))
            with self._zf.open("nll.npy") as f:
                self.nll = np.lib.format.read_array(f)
            self._f = self._zf.open("logprobs.npy")
            version = np.lib.format.read_magic(self._f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(self._f)
        except (OSError, zipfile.BadZipFile, ValueError) as exc:
            raise EdgeMoeError(f"{self.path}: unreadable logits file ({exc})") from None
        if base_ctx != n_ctx:
            raise EdgeMoeError(f"{self.path}: saved with a context of {base_ctx} tokens, this run "
                               f"uses {n_ctx}; use the same -c")
        if len(shape) != 2 or shape[1] != n_vocab or dtype != np.float16 or fortran:
            raise EdgeMoeError(f"{self.path}: logprobs are {dtype} {list(shape)}, expected float16 "
                               f"[rows, {n_vocab}] (a model with another vocabulary?)")
        k = min(len(base_tokens), len(tokens))
        if shape[0] < n_rows or len(self.nll) < n_rows or k < len(tokens) or not np.array_equal(base_tokens[:k], tokens[:k]):
            raise EdgeMoeError(f"{self.path}: saved on other tokens ({len(base_tokens)} tokens, "
                               f"{shape[0]} scored) than this run ({len(tokens)}, {n_rows}); use "
                               "the same text, tokenizer and -c, and no more --chunks")
        self.n_vocab = n_vocab
        self._row_bytes = n_vocab * 2

    def read(self) -> np.ndarray:
        raw = self._f.read(self._row_bytes)
        if len(raw) != self._row_bytes:
            raise EdgeMoeError(f"{self.path}: truncated logits file")
        return np.frombuffer(raw, dtype=np.float16)

    def close(self) -> None:
        self._f.close()
        self._zf.close()


def _renormalized(logp16: np.ndarray) -> np.ndarray:
    """float16 log-probabilities as float64, renormalised (rounding moved their sum off 1)."""
    x = logp16.astype(np.float64)
    return x - (x.max() + math.log(np.exp(x - x.max()).sum()))


def _experts_run(engine, n_layers: int) -> int:
    """Experts computed over every MoE layer by the engine's last (one-token) step (the
    policy's telemetry record of it)."""
    return int(engine.last_step["experts_run"])


def evaluate(engine, tokens: Sequence[int], n_ctx: int, bos: int | None = None,
             n_chunks: int | None = None, save_logits: str | Path | None = None,
             kl_base: str | Path | None = None,
             progress: Callable[[int, int, float, float], None] | None = None) -> PerplexityResult:
    """Perplexity of `engine` on `tokens` in windows of `n_ctx` (see the module docstring).

    bos: the token that replaces each window's first (None: the first is left as it is);
    n_chunks: evaluate at most this many windows; save_logits / kl_base: write a reference
    logits file / compare with one; progress(i, n_chunk, running_ppl, seconds_this_window) is
    called after each window."""
    if n_ctx < 4:
        raise EdgeMoeError(f"context {n_ctx}: perplexity needs at least 4 tokens per window")
    if n_ctx > engine.n_ctx:
        raise EdgeMoeError(f"context {n_ctx} exceeds the engine's n_ctx={engine.n_ctx}")
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    n_chunk = n_windows(toks.size, n_ctx, n_chunks)
    if n_chunk == 0:
        raise EdgeMoeError(f"the text is {toks.size} tokens; perplexity with a context of {n_ctx} "
                           f"needs at least {n_ctx} (use a longer text or a smaller -c)")
    first = n_ctx // 2
    per_window = n_ctx - first - 1
    n_rows = n_chunk * per_window
    used = toks[:n_chunk * n_ctx].astype(np.int32)
    n_vocab = engine.n_vocab
    n_layers = len(engine.hparams.expert_layers)

    writer = (LogitsWriter(save_logits, used, n_ctx, n_rows, n_vocab)
              if save_logits is not None else None)
    reader = None
    try:
        reader = (LogitsReader(kl_base, used, n_ctx, n_rows, n_vocab)
                  if kl_base is not None else None)
        nll = nll2 = 0.0
        kl_sum = kl_sq = 0.0
        agree = 0
        count = 0
        experts = 0
        chunk_ppl: list[float] = []
        t_start = time.perf_counter()
        decode_seconds = 0.0
        for i in range(n_chunk):
            t0 = time.perf_counter()
            window = used[i * n_ctx:(i + 1) * n_ctx].copy()
            if bos is not None:
                window[0] = bos
            engine.reset()
            engine.eval(window[:first], logits_from=first)   # no rows: none is scored
            t1 = time.perf_counter()
            for pos in range(first, n_ctx - 1):
                logits = engine.eval(window[pos:pos + 1])[0]
                experts += _experts_run(engine, n_layers)
                logp = _log_softmax(logits)
                target = int(window[pos + 1])
                nll += -logp[target]
                nll2 += logp[target] ** 2
                count += 1
                if writer is None and reader is None:
                    continue
                lp16 = logp.astype(np.float16)
                if writer is not None:
                    writer.write(lp16, -logp[target])
                if reader is not None:
                    base16 = reader.read()
                    base, cur = _renormalized(base16), _renormalized(lp16)
                    kl = max(0.0, float(np.dot(np.exp(base), base - cur)))
                    kl_sum += kl
                    kl_sq += kl * kl
                    agree += int(np.argmax(base16) == np.argmax(lp16))
            decode_seconds += time.perf_counter() - t1
            chunk_ppl.append(math.exp(nll / count))
            if progress is not None:
                progress(i, n_chunk, chunk_ppl[-1], time.perf_counter() - t0)
        seconds = time.perf_counter() - t_start
    except BaseException:
        if writer is not None:
            writer.close(complete=False)
        raise
    finally:
        if reader is not None:
            reader.close()
    if writer is not None:
        writer.close()

    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    ppl_err = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    kl_stats = None
    if reader is not None:
        mean_kl = kl_sum / count
        kl_var = kl_sq / count - mean_kl * mean_kl
        frac = agree / count
        base_ppl = math.exp(float(reader.nll[:count].mean()))
        kl_stats = KLStats(
            mean_kl=mean_kl,
            kl_err=math.sqrt(kl_var / (count - 1)) if kl_var > 0 and count > 1 else 0.0,
            agreement=frac,
            agreement_err=math.sqrt(frac * (1 - frac) / (count - 1)) if count > 1 else 0.0,
            base_ppl=base_ppl, ppl_ratio=ppl / base_ppl)
    return PerplexityResult(n_ctx=n_ctx, n_chunk=n_chunk, n_scored=count, ppl=ppl,
                            ppl_err=ppl_err, experts_per_token=experts / (count * n_layers),
                            n_expert_used=engine.hparams.n_expert_used, seconds=seconds,
                            decode_seconds=decode_seconds, chunk_ppl=chunk_ppl, kl=kl_stats)
