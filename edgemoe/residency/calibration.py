"""What calibration measures once per shard set and the policies read at start-up, kept in one
JSON file beside the shard set (`edgemoe calibrate` writes it):
- norms: ||E_i|| per layer and expert (swap's Eq. 1, static's "largest norm");
- usage: how often each expert was in the unmasked top-k on calibration text (static's "most used");
- sensitivity: s_l per layer for adaptive gating, and how it was estimated.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from edgemoe.errors import ShardSetError
from edgemoe.residency.importance import expert_norm_from_shard

FILE_NAME = "calibration.json"
FORMAT, VERSION = "edgemoe.calibration", 1


@dataclass(frozen=True)
class Calibration:
    norms: Mapping[int, np.ndarray]                 # layer -> (n_expert,)
    usage: Mapping[int, np.ndarray] | None = None   # layer -> (n_expert,) counts
    sensitivity: Mapping[int, float] | None = None  # layer -> s_l
    sensitivity_method: str | None = None           # "isolated", "one-pass" or "proxy"
    tokens: int = 0                                 # calibration tokens behind usage/sensitivity

    def save(self, shards_dir: str | Path) -> Path:
        doc = {"format": FORMAT, "version": VERSION, "tokens": self.tokens,
               "norms": {str(l): [float(v) for v in n] for l, n in self.norms.items()}}
        if self.usage is not None:
            doc["usage"] = {str(l): [int(v) for v in u] for l, u in self.usage.items()}
        if self.sensitivity is not None:
            doc["sensitivity"] = {str(l): float(s) for l, s in self.sensitivity.items()}
            doc["sensitivity_method"] = self.sensitivity_method
        path = Path(shards_dir) / FILE_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)   # never a half-written file beside the shards
        return path

    @classmethod
    def load(cls, shards_dir: str | Path) -> "Calibration":
        path = Path(shards_dir) / FILE_NAME
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ShardSetError(f"{path}: no calibration; run `edgemoe calibrate` first") from None
        except (OSError, ValueError) as exc:
            raise ShardSetError(f"{path}: unreadable calibration ({exc})") from None
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ShardSetError(f"{path}: expected format {FORMAT} version {VERSION}, got "
                                f"{doc.get('format')!r} version {doc.get('version')!r}")
        table = lambda key, dtype: ({int(l): np.asarray(v, dtype=dtype)
                                     for l, v in doc[key].items()} if key in doc else None)
        sens = doc.get("sensitivity")
        return cls(norms=table("norms", np.float64), usage=table("usage", np.int64),
                   sensitivity={int(l): float(s) for l, s in sens.items()} if sens else None,
                   sensitivity_method=doc.get("sensitivity_method"), tokens=doc.get("tokens", 0))


def compute_norms(shards) -> dict[int, np.ndarray]:
    """||E_i|| of every expert of a ShardSet (reads and dequantizes each shard once)."""
    norms = {l: np.zeros(shards.n_expert) for l in shards.expert_layers}
    for shard in shards.experts():
        norms[shard.layer][shard.expert] = expert_norm_from_shard(shard)
    return norms
