"""Token sampling with llama.cpp's semantics, defaults and sampler order.

llama.cpp's default chain (common/common.h, common/sampling.cpp) is
    penalties -> top_k -> top_p -> min_p -> temperature -> dist
and we run the same steps in the same order, so that a setting means here what it means there:
- repetition penalty over the last `repeat_last_n` tokens of the context, prompt included (as
  llama.cpp's completion tool pushes the prompt into its sampler; llama-cpp-python counts only
  generated tokens): a positive logit is divided by the penalty, a non-positive one multiplied
  (dividing a negative logit would *raise* it);
- top_p and min_p look at the distribution *before* temperature (temperature comes last);
- temperature <= 0 keeps only the best token, which makes sampling greedy.

Every step works on a candidate list (token ids with their logits), the shape of llama.cpp's
llama_token_data_array, so each filter can shrink what the next one sees. A seeded numpy
Generator makes runs reproducible: the same seed with the same logits gives the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """What `edgemoe run --temp/--top-k/...` and the API's keyword arguments set.

    Defaults are llama.cpp's (common_params_sampling).
    """

    temperature: float = 0.8
    top_k: int = 40              # <= 0: the whole vocabulary
    top_p: float = 0.95          # 1.0: off
    min_p: float = 0.05          # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64      # 0: off, -1: the whole context
    seed: int | None = None      # None: a fresh seed from the OS each time

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (np.isfinite(self.repeat_penalty) and self.repeat_penalty > 0.0):
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat_last_n must be >= -1, got {self.repeat_last_n}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


GREEDY = SamplingParams(temperature=0.0)


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> None:
    """Penalise, in place, every token id that occurs in `recent` (each once, however often)."""
    if penalty == 1.0 or len(recent) == 0:
        return
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    seen = logits[ids]
    logits[ids] = np.where(seen <= 0.0, seen * penalty, seen / penalty)


def _sort_descending(ids: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-logits, kind="stable")
    return ids[order], logits[order]


def top_k(ids: np.ndarray, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k largest logits, sorted best first; k <= 0 keeps everything."""
    if k <= 0:
        return ids, logits
    k = min(k, logits.size)
    if k < logits.size:
        # argpartition first: sorting a 150k vocabulary every token costs more than the model
        # step on small models.
        part = np.argpartition(logits, logits.size - k)[logits.size - k:]
        ids, logits = ids[part], logits[part]
    return _sort_descending(ids, logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    return shifted / shifted.sum()


def top_p(ids: np.ndarray, logits: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the smallest best-first prefix whose probability mass reaches p (at least one)."""
    if p >= 1.0:
        return ids, logits
    ids, logits = _sort_descending(ids, logits)
    cum = np.cumsum(_softmax(logits))
    # First index where the running sum reaches p; float round-off can leave the total a hair
    # under 1.0, in which case everything is kept, as in llama.cpp.
    n_keep = int(np.searchsorted(cum, p, side="left")) + 1
    n_keep = min(n_keep, logits.size)
    return ids[:n_keep], logits[:n_keep]


def min_p(ids: np.ndarray, logits: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep tokens whose probability is at least p times the best token's."""
    if p <= 0.0:
        return ids, logits
    # p_i >= p * p_max  <=>  logit_i >= logit_max + log(p): no softmax needed.
    keep = logits >= logits.max() + np.log(p)
    return ids[keep], logits[keep]


class Sampler:
    """Picks the next token from a row of logits; holds the random state of one generation."""

    def __init__(self, params: SamplingParams = SamplingParams()) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._all_ids = np.arange(0, dtype=np.int64)  # 0..n_vocab-1, made once per vocab size

    def candidates(
        self, logits: np.ndarray, history: Sequence[int] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """The tokens left after the penalty and the top_k/top_p/min_p filters, with their
        (penalised) logits: what llama.cpp's chain holds just before temperature."""
        params = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1:
            raise ValueError(f"expected one row of logits (n_vocab,), got shape {logits.shape}")
        window = params.repeat_last_n
        if window != 0 and params.repeat_penalty != 1.0:
            recent = history if window < 0 else history[-window:]
            logits = logits.copy()  # the caller's row stays as it was
            apply_repeat_penalty(logits, recent, params.repeat_penalty)
        if self._all_ids.size != logits.size:
            self._all_ids = np.arange(logits.size, dtype=np.int64)
        ids = self._all_ids
        if params.greedy:
            # Every filter keeps the best token, and temperature <= 0 keeps only it.
            best = int(np.argmax(logits))
            return ids[best : best + 1], logits[best : best + 1]
        ids, logits = top_k(ids, logits, params.top_k)
        ids, logits = top_p(ids, logits, params.top_p)
        return min_p(ids, logits, params.min_p)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """`logits`: (n_vocab,) of the last position; `history`: every token in the context so
        far (prompt and generated), of which the last `repeat_last_n` are penalised."""
        ids, logits = self.candidates(logits, history)
        if self.params.greedy:
            return int(ids[0])
        probs = _softmax(logits / self.params.temperature)
        # Inverse-CDF draw: one uniform number per token keeps the stream of random numbers
        # independent of how many candidates survived the filters.
        u = self._rng.random()
        index = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
        return int(ids[min(index, ids.size - 1)])
