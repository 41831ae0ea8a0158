"""Memory budget arithmetic: parse the one knob, and turn it into expert slots per layer.

Two kinds of budget exist:
- absolute ("2GiB", "1.5GB", "512MiB"): bounds the whole process, so base weights, KV cache and
  compute buffers are paid first and the rest becomes expert slots;
- relative ("50%"): that fraction of the experts' bytes may be resident; the rest of the process
  is whatever it must be. This is how budgets are compared across models.

A budget below the smallest configuration that can run (base + KV + compute + top-k slots in every
expert layer) is refused before anything is loaded, with that minimum in the message.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from edgemoe.errors import BudgetError

# Decimal units are powers of 1000, binary (Ki/Mi/Gi/Ti) powers of 1024. A bare K/M/G/T is read as
# binary, as `docker --memory 2g` and `free -h` do, because memory is counted in pages.
_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*|%)\s*$")


@dataclass(frozen=True)
class Budget:
    """A parsed --memory-budget: exactly one of `bytes` (absolute) or `fraction` (relative)."""
    bytes: int | None = None
    fraction: float | None = None

    @property
    def relative(self) -> bool:
        return self.fraction is not None

    def __str__(self) -> str:
        if self.relative:
            return f"{self.fraction * 100:g}% of expert bytes"
        return format_bytes(self.bytes)


def parse_budget(text: str) -> Budget:
    """'2GiB', '1.5GB', '512MiB', '3g', '1000000', '50%' -> Budget. Raises BudgetError."""
    m = _BUDGET_RE.match(str(text))
    if not m:
        raise BudgetError(f"memory budget {text!r}: expected a size such as 2GiB, 1.5GB, 512MiB "
                          f"or a percentage of expert bytes such as 50%")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        if not 0.0 < value <= 100.0:
            raise BudgetError(f"memory budget {text!r}: a percentage must be in (0, 100]")
        return Budget(fraction=value / 100.0)
    scale = _UNITS.get(unit.lower())
    if scale is None:
        raise BudgetError(f"memory budget {text!r}: unknown unit {unit!r}; expected one of "
                          f"B, KB, MB, GB, TB, KiB, MiB, GiB, TiB or %")
    n = int(value * scale)
    if n <= 0:
        raise BudgetError(f"memory budget {text!r}: must be more than 0 bytes")
    return Budget(bytes=n)


def format_bytes(n: float) -> str:
    """Binary units, three significant figures: 1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class MemoryNeeds:
    """What the process holds besides expert slots, and what one expert costs in each layer."""
    base_bytes: int                  # base.gguf tensors kept resident (embeddings, attention, routers)
    kv_bytes: int                    # KV cache at the chosen context size
    # ggml compute buffers (graph allocator's reservation); None: not measured yet (they are
    # known only once an engine has built its graphs, so a refusal before loading is a lower bound)
    compute_bytes: int | None
    expert_bytes: Mapping[int, int]  # layer -> bytes of one expert slot (gate + up + down)
    n_expert: int
    n_expert_used: int               # top-k: every expert layer needs at least k slots
    # Bytes of the one read in flight (reads are serialised): edgemoe.pool reads an expert into
    # its thread's host buffer before copying it into its slot, and without O_DIRECT the page
    # cache the read filled lives until it is dropped. None: twice the largest expert.
    read_bytes: int | None = None
    # The process before any model memory: interpreter, numpy, the ggml libraries, tokenizer.
    # The engine passes process_baseline_bytes() taken before it loads anything.
    runtime_bytes: int = 0

    @property
    def io_bytes(self) -> int:
        if self.read_bytes is not None:
            return self.read_bytes
        return 2 * max(self.expert_bytes.values())

    @property
    def fixed_bytes(self) -> int:
        return (self.runtime_bytes + self.base_bytes + self.kv_bytes + (self.compute_bytes or 0)
                + self.io_bytes)

    @property
    def expert_bytes_total(self) -> int:
        return self.n_expert * sum(self.expert_bytes.values())

    @property
    def minimum_bytes(self) -> int:
        """The smallest absolute budget that can run: top-k slots in every expert layer."""
        return self.fixed_bytes + self.n_expert_used * sum(self.expert_bytes.values())

    @property
    def minimum_fraction(self) -> float:
        return self.n_expert_used / self.n_expert


def process_baseline_bytes() -> int:
    """Resident bytes of this process now (call before loading a model): MemoryNeeds.runtime_bytes.
    Rounded up to a MiB, so that the minimum a refusal states does not move with the
    allocator's jitter between runs."""
    import psutil

    mib = 1 << 20
    return -(-int(psutil.Process().memory_info().rss) // mib) * mib


@dataclass(frozen=True)
class SlotPlan:
    slots: Mapping[int, int]   # layer -> number of expert slots
    slot_bytes: int            # bytes the slots take together (substitute slots included)
    total_bytes: int           # slots + fixed parts (what an absolute budget must cover)
    substitutes: Mapping[int, int] | None = None   # layer -> substitute slots (low-bit tier)

    @property
    def uniform(self) -> bool:
        return len(set(self.slots.values())) <= 1


def expert_allowance(budget: Budget, needs: MemoryNeeds) -> int:
    """Bytes the budget leaves for expert slots, refusing budgets below the minimum."""
    if budget.relative:
        if budget.fraction + 1e-12 < needs.minimum_fraction:
            raise BudgetError(
                f"memory budget {budget} is below the minimum of "
                f"{needs.minimum_fraction * 100:.4g}% (top-{needs.n_expert_used} of "
                f"{needs.n_expert} experts resident in every layer)")
        return int(budget.fraction * needs.expert_bytes_total)
    if budget.bytes < needs.minimum_bytes:
        raise BudgetError(
            f"memory budget {format_bytes(budget.bytes)} ({budget.bytes} bytes) is below the minimum "
            f"of {'at least ' if needs.compute_bytes is None else ''}"
            f"{format_bytes(needs.minimum_bytes)} ({needs.minimum_bytes} bytes): runtime "
            f"{format_bytes(needs.runtime_bytes)} + base "
            f"{format_bytes(needs.base_bytes)} + KV {format_bytes(needs.kv_bytes)} + "
            f"{compute_text(needs)} + reads {format_bytes(needs.io_bytes)} + "
            f"{needs.n_expert_used} expert slots per layer "
            f"{format_bytes(needs.n_expert_used * sum(needs.expert_bytes.values()))}")
    return budget.bytes - needs.fixed_bytes


def compute_text(needs: MemoryNeeds) -> str:
    if needs.compute_bytes is None:
        return "compute buffers (not measured before loading)"
    return f"compute {format_bytes(needs.compute_bytes)}"


def substitute_split(allowance: int, needs: MemoryNeeds,
                     substitute_bytes: Mapping[int, int]) -> tuple[dict[int, int], int] | None:
    """How much of an expert allowance goes to the substitute tier: ({layer: substitute
    slots}, bytes left for full slots). Every expert's low-bit copy when top-k full slots per
    layer still fit beside them, else the same smaller count in every layer; None when not even
    one substitute per layer fits beside top-k full slots."""
    floor = needs.n_expert_used * sum(needs.expert_bytes.values())
    per_round = sum(substitute_bytes[l] for l in needs.expert_bytes)
    count = min(needs.n_expert, (allowance - floor) // per_round) if allowance > floor else 0
    if count < 1:
        return None
    return {l: int(count) for l in needs.expert_bytes}, allowance - count * per_round


def uniform_slots(budget: Budget, needs: MemoryNeeds, allowance: int | None = None) -> SlotPlan:
    """The same slot count in every layer (as many as fit, at most n_expert); bytes left over
    after that give one more slot to layers in order, so nothing that fits is wasted.
    allowance: the bytes for full slots, when not all the budget leaves (substitutes)."""
    if allowance is None:
        allowance = expert_allowance(budget, needs)
    per_round = sum(needs.expert_bytes.values())
    count = min(needs.n_expert, allowance // per_round)
    slots = {layer: count for layer in needs.expert_bytes}
    left = allowance - count * per_round
    if count < needs.n_expert:
        for layer, nbytes in needs.expert_bytes.items():
            if nbytes <= left:
                slots[layer] += 1
                left -= nbytes
    return make_plan(slots, needs)


def make_plan(slots: Mapping[int, int], needs: MemoryNeeds,
              substitutes: Mapping[int, int] | None = None,
              substitute_bytes: Mapping[int, int] | None = None) -> SlotPlan:
    """A SlotPlan for a given per-layer allocation (e.g. from the DP), with its byte totals."""
    slot_bytes = sum(slots[layer] * needs.expert_bytes[layer] for layer in needs.expert_bytes)
    if substitutes:
        slot_bytes += sum(n * substitute_bytes[l] for l, n in substitutes.items())
    return SlotPlan(slots=dict(slots), slot_bytes=slot_bytes,
                    total_bytes=slot_bytes + needs.fixed_bytes,
                    substitutes=dict(substitutes) if substitutes else None)

