"""Expert slots per layer: AdapMoE's dynamic programme over per-layer cost curves.

cost[l][c] is what layer l costs per token with c slots, for any additive cost: expected demand
loads (ondemand, from `loads_table`), redirected choices (swap/static), or seconds. The DP picks
c_l per layer minimising sum_l cost[l][c_l] subject to sum_l c_l * expert_bytes[l] <= allowance
and top-k <= c_l <= n_expert. Uniform allocation is one point of that search space, so the DP is
never worse; it is better when layers differ (some concentrate on few experts, some do not).
"""
from __future__ import annotations

import itertools
import math
from functools import reduce
from typing import Mapping

import numpy as np

from edgemoe.errors import BudgetError
from edgemoe.residency.replay import simulate_layer
from edgemoe.residency.traces import RoutingTrace

_MAX_UNITS = 200_000   # DP states per layer; beyond this, byte sizes are rounded up (safe side)


def loads_table(trace: RoutingTrace, k: int, n_prefetch: int = 0,
                sensitivity: Mapping[int, float] | None = None,
                threshold: float | None = None) -> dict[int, np.ndarray]:
    """Demand loads per token for every layer and slot count, replaying the trace through the
    ondemand policy itself (replay.simulate_layer); loads that fill a
    free slot are not counted (a larger cache would otherwise pay for filling itself).
    Returns layer -> (n_expert + 1,) array; entries below k are inf (cannot run)."""
    table = {}
    for layer in trace.layers:
        s_l = sensitivity[layer] if threshold is not None else None
        wanted = trace.wanted(layer, k, s_l, threshold)
        predicted = trace.predicted_ids(layer, k) if n_prefetch else None
        cost = np.full(trace.n_expert + 1, np.inf)
        for c in range(k, trace.n_expert + 1):
            st = simulate_layer(wanted, c, predicted, n_prefetch)
            cost[c] = st.steady_misses / st.tokens   # filling c slots from cold is no cost
        table[layer] = cost
    return table


def _units(expert_bytes: Mapping[int, int], allowance: int) -> tuple[dict[int, int], int]:
    unit = reduce(math.gcd, expert_bytes.values())
    unit = max(unit, math.ceil(allowance / _MAX_UNITS))
    return {l: math.ceil(b / unit) for l, b in expert_bytes.items()}, allowance // unit


def allocate_slots(cost: Mapping[int, np.ndarray], expert_bytes: Mapping[int, int],
                   allowance: int, k: int) -> dict[int, int]:
    """The DP. cost[l] is indexed by slot count (0..n_expert); expert_bytes[l] is one slot's size;
    allowance the bytes available for slots. Raises BudgetError if top-k slots do not fit."""
    layers = sorted(cost)
    size, cap = _units(expert_bytes, allowance)
    # best[u] = least total cost of the layers so far using at most u units.
    best = np.zeros(cap + 1)
    choices = []
    for l in layers:
        n_max = len(cost[l]) - 1
        nxt = np.full(cap + 1, np.inf)
        pick = np.full(cap + 1, -1, dtype=np.int32)
        for c in range(k, n_max + 1):
            used = c * size[l]
            if used > cap or not np.isfinite(cost[l][c]):
                continue
            cand = np.full(cap + 1, np.inf)
            cand[used:] = best[: cap + 1 - used] + cost[l][c]
            # Strictly better only: among equal costs the fewer slots (found first) stays.
            better = cand < nxt - 1e-12
            nxt[better] = cand[better]
            pick[better] = c
        choices.append(pick)
        best = nxt
    if not np.isfinite(best[cap]):
        need = sum(k * expert_bytes[l] for l in layers)
        raise BudgetError(f"{allowance} bytes for expert slots cannot hold top-{k} slots in every "
                          f"layer ({need} bytes)")
    slots, u = {}, cap
    for l, pick in zip(reversed(layers), reversed(choices)):
        c = int(pick[u])
        slots[l] = c
        u -= c * size[l]
    return dict(sorted(slots.items()))


def brute_force_allocation(cost: Mapping[int, np.ndarray], expert_bytes: Mapping[int, int],
                           allowance: int, k: int) -> tuple[dict[int, int], float]:
    """Every allocation tried (small cases only): the DP's reference."""
    layers = sorted(cost)
    best, arg = np.inf, None
    ranges = [range(k, len(cost[l])) for l in layers]
    for combo in itertools.product(*ranges):
        if sum(c * expert_bytes[l] for c, l in zip(combo, layers)) > allowance:
            continue
        total = sum(cost[l][c] for c, l in zip(combo, layers))
        if total < best - 1e-12:
            best, arg = total, dict(zip(layers, combo))
    return arg, best


def total_cost(cost: Mapping[int, np.ndarray], slots: Mapping[int, int]) -> float:
    return float(sum(cost[l][slots[l]] for l in cost))
