"""Open an engine under a memory budget with a residency policy: the one knob
`--memory-budget 2GiB|50%` plus `--policy full|swap|ondemand|static` turned into an Engine whose
expert pool has the right number of slots per layer and whose slots a policy drives.

Order of events, so that a budget below the minimum is refused before any expert is read:
1. the fixed parts known from the files (base tensors, KV cache at n_ctx, one read in flight, the
   process as it is now) are checked against the budget with top-k slots per layer;
2. for an absolute budget, a probe engine with top-k slots and no experts measures the compute
   buffers the scheduler reserves (they do not depend on the slot count); it is closed again;
3. slots per layer come from the plan file `edgemoe plan` wrote for this budget and policy, else
   from the routing trace `edgemoe calibrate` stored (the slot DP), else uniform;
4. the engine opens with those slots and no experts; the policy warms its experts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from edgemoe import arch as arch_registry
from edgemoe.errors import BudgetError, EdgeMoeError, ShardSetError
from edgemoe.gguf_header import GGUFHeader
from edgemoe.residency import calibration as calib
from edgemoe.residency.budget import (Budget, MemoryNeeds, SlotPlan, expert_allowance,
                                      format_bytes, make_plan, parse_budget, process_baseline_bytes,
                                      substitute_split, uniform_slots)
from edgemoe.residency.policies import FullPolicy, OnDemandPolicy, StaticPolicy, make_policy
from edgemoe.residency.sensitivity import QUALITIES, balanced_wait_threshold
from edgemoe.residency.telemetry import Telemetry, record
from edgemoe.shardset import ShardSet

POLICIES = ("full", "swap", "ondemand", "static")
PLAN_FILE = "plan.json"
TRACE_FILE = "routing_trace.npz"
_KV_BYTES = {"f16": 2, "f32": 4}
_PROBE_BYTES = 16 << 20   # what measuring the compute buffers may add to the process, at most


@dataclass(frozen=True)
class ResidencyConfig:
    """What the user asked for. memory_budget None and policy None: every expert resident (the
    full policy, as the engine runs without a budget)."""
    memory_budget: str | None = None
    policy: str | None = None
    adaptive_gating: float | None = None   # T of AdapMoE's rule (ondemand only)
    n_prefetch: int | None = None          # ondemand: predicted experts loaded per layer
                                           # (None: what `edgemoe plan` chose, else 1)
    swap_interval: int | None = None       # swap: tokens per importance window and
    swap_decay: float | None = None        # the previous windows' weight (None: the plan's
                                           # choice, else the calibration trace's, else 16, 0)
    substitutes: bool = True               # static/swap under a budget: keep the shard set's
                                           # low-bit substitutes resident (if it has them)
    # The chosen device's own memory (its base weights, KV cache, compute buffers and expert
    # slots), as a size; None: unbounded. The CPU's memory is memory_budget's.
    device_budget: str | None = None
    # ondemand's per-miss decisions: exact (every miss waits), balanced (waits for the misses
    # above the plan's or calibration's threshold), fast (never waits while a substitute or
    # another expert can run). None: exact; anything set implies ondemand.
    quality: str | None = None

    @property
    def policy_name(self) -> str:
        """A budget with no policy chooses swap; a policy with no budget runs at 100%."""
        budgeted = self.memory_budget is not None or self.device_budget is not None
        default = "ondemand" if self.quality is not None else "swap" if budgeted else "full"
        name = self.policy or default
        if name not in POLICIES:
            raise EdgeMoeError(f"policy {name!r}: expected one of {', '.join(POLICIES)}")
        if self.quality is not None:
            if self.quality not in QUALITIES:
                raise EdgeMoeError(f"quality {self.quality!r}: expected one of "
                                   f"{', '.join(QUALITIES)}")
            if name != "ondemand":
                raise EdgeMoeError(f"--quality chooses what the ondemand policy does on a "
                                   f"miss; it does not apply to --policy {name}")
        if self.adaptive_gating is not None and name != "ondemand":
            raise EdgeMoeError("--adaptive-gating applies to the ondemand policy only")
        return name

    @property
    def budget(self) -> Budget:
        return parse_budget(self.memory_budget if self.memory_budget is not None else "100%")

    def uses_substitutes(self, shards: ShardSet) -> bool:
        """Whether a budget keeps the shard set's substitutes resident: static and swap (unless
        --no-substitutes), ondemand at quality balanced or fast."""
        if not self.substitutes or shards.substitute_type is None:
            return False
        name = self.policy_name
        return name in ("static", "swap") or (name == "ondemand"
                                               and self.quality in ("balanced", "fast"))


def needs_from_files(shards: ShardSet, n_ctx: int, kv_type: str, compute_bytes: int | None = None,
                     runtime_bytes: int | None = None) -> MemoryNeeds:
    """MemoryNeeds from the shard set's headers alone (nothing loaded). The read in flight is
    the pool's (host buffer + page cache, without O_DIRECT, of one expert): base weights are
    used in place from the mapped base.gguf (its tensors are the base bytes, counted once)."""
    header = GGUFHeader(shards.base_path)
    shards.check_base_header(header)
    base = sum(t.n_bytes for t in header.tensors)
    model = arch_registry.get(shards.arch)
    hp = model.hparams_class.from_gguf(header, model, shards.base_path)
    shards.check_match(hp)
    expert_bytes = {l: shards.expert(l, 0).data_bytes for l in shards.expert_layers}
    kv = hp.n_layer * (hp.n_embd_kv + hp.n_embd_v) * n_ctx * _KV_BYTES[kv_type]
    return MemoryNeeds(base_bytes=base, kv_bytes=kv, compute_bytes=compute_bytes,
                       expert_bytes=expert_bytes, n_expert=shards.n_expert,
                       n_expert_used=shards.n_expert_used,
                       read_bytes=2 * max(expert_bytes.values()),
                       runtime_bytes=process_baseline_bytes() if runtime_bytes is None
                       else runtime_bytes)


@dataclass(frozen=True)
class PlanKey:
    """What a plan.json holds good for: the budget (its exact bytes or fraction; the printed
    form rounds), the context size and KV type (they size the fixed parts), and the device
    (its speed and placement). The policies are entries of one plan."""
    budget: str
    budget_bytes: int | None
    budget_fraction: float | None
    n_ctx: int
    kv_type: str
    device: str

    @classmethod
    def of(cls, budget: Budget, n_ctx: int, kv_type: str, device: str | None) -> "PlanKey":
        from edgemoe import ggml

        name = ggml.Backend.choose(ggml.list_devices(), device)["name"]
        return cls(str(budget), budget.bytes, budget.fraction, int(n_ctx), kv_type, name)

    def fields(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (f"budget {self.budget}, n_ctx {self.n_ctx}, KV {self.kv_type}, device "
                f"{self.device}")


_noted: set[tuple] = set()   # plan files already reported as not matching, once per process


def read_plan_file(shards_dir: Path, key: PlanKey, policy: str) -> dict | None:
    """What `edgemoe plan` chose for this key and policy, if it wrote it: {"slots":
    {layer: n}, "swap_interval": tokens or None, ...}. A plan made for another budget, context,
    KV type or device is ignored with a note on stderr (once)."""
    path = shards_dir / PLAN_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShardSetError(f"{path}: unreadable plan ({exc}); rerun `edgemoe plan`") from None
    if not isinstance(doc, dict):
        raise ShardSetError(f"{path}: not a plan (a JSON object); rerun `edgemoe plan`")
    planned = {name: doc.get(name) for name in key.fields()}
    if planned != key.fields():
        if (path, key) not in _noted:
            _noted.add((path, key))
            made = (f"budget {planned['budget']}, n_ctx {planned['n_ctx']}, KV "
                    f"{planned['kv_type']}, device {planned['device']}")
            print(f"edgemoe: note: {path} was planned for {made}; not used for {key.describe()} "
                  f"(rerun `edgemoe plan` for it)", file=sys.stderr)
        return None
    entry = doc.get("policies", {}).get(policy)
    if not entry:
        return None
    return {**entry, "slots": {int(l): int(n) for l, n in entry["slots"].items()}}


def prefetch_depth(shards: ShardSet, cfg: ResidencyConfig, key: PlanKey) -> int:
    """ondemand's prefetch depth: the user's, else the plan file's for this key, else 1."""
    if cfg.n_prefetch is not None:
        return cfg.n_prefetch
    planned = read_plan_file(shards.root, key, "ondemand")
    depth = (planned or {}).get("n_prefetch")
    return 1 if depth is None else int(depth)


def choose_slots(shards: ShardSet, cfg: ResidencyConfig, needs: MemoryNeeds,
                 key: PlanKey) -> SlotPlan:
    """Slots per layer under the budget: plan file, else the DP on the stored trace, else
    uniform. With a substitute tier, ondemand's split of the bytes between substitutes and
    full slots is the plan file's for its --quality, else the planner's on the calibration
    trace (tier_split), else budget.substitute_split's rule, which static and swap always use.
    Raises BudgetError (with the minimum) below the minimum."""
    budget, name = cfg.budget, cfg.policy_name
    allowance = expert_allowance(budget, needs)   # refuses below the minimum
    split = None
    if cfg.uses_substitutes(shards):
        sub_bytes = substitute_bytes(shards)
        if name == "ondemand":
            chosen = tier_split(shards, cfg, needs, key, allowance, sub_bytes)
            if chosen is not None:
                return chosen
        split = substitute_split(allowance, needs, sub_bytes)
    if split is not None:
        # The substitutes' bytes first; full slots share the rest (a plan file was made
        # without substitutes, so the trace's DP or uniform counts decide here).
        subs, allowance = split
        slots = None
        if (shards.root / TRACE_FILE).exists():
            from edgemoe.residency.planner import allocate_for
            from edgemoe.residency.traces import RoutingTrace

            trace = RoutingTrace.load(shards.root / TRACE_FILE)
            slots = allocate_for(name, trace, needs.n_expert_used, needs.expert_bytes, allowance)
        else:
            slots = uniform_slots(budget, needs, allowance).slots
        return make_plan(slots, needs, subs, sub_bytes)
    if name == "full":
        if allowance < needs.expert_bytes_total:
            raise BudgetError(
                f"policy full needs every expert resident ({needs.expert_bytes_total} bytes of "
                f"experts; {needs.fixed_bytes + needs.expert_bytes_total} bytes in all) but the "
                f"budget {budget} leaves {allowance} bytes for experts; use swap or ondemand")
        return make_plan({l: needs.n_expert for l in needs.expert_bytes}, needs)
    planned = read_plan_file(shards.root, key, name)
    slots = planned["slots"] if planned else None
    if slots is None and (shards.root / TRACE_FILE).exists():
        from edgemoe.residency.planner import allocate_for
        from edgemoe.residency.traces import RoutingTrace

        trace = RoutingTrace.load(shards.root / TRACE_FILE)
        sens = None
        if cfg.adaptive_gating is not None:
            sens = calib.Calibration.load(shards.root).sensitivity
        slots = allocate_for(name, trace, needs.n_expert_used, needs.expert_bytes, allowance,
                             prefetch_depth(shards, cfg, key), sensitivity=sens,
                             threshold=cfg.adaptive_gating)
    if slots is None:
        return uniform_slots(budget, needs)
    plan = make_plan(slots, needs)
    if plan.slot_bytes > allowance:
        raise BudgetError(f"{shards.root / PLAN_FILE}: its slots need {plan.slot_bytes} bytes, "
                          f"the budget {budget} leaves {allowance}; rerun `edgemoe plan`")
    return plan


def tier_split(shards: ShardSet, cfg: ResidencyConfig, needs: MemoryNeeds, key: PlanKey,
               allowance: int, sub_bytes: Mapping[int, int]) -> SlotPlan | None:
    """ondemand's substitutes and full slots at cfg.quality: what `edgemoe plan` chose for this
    key (plan.json's ondemand "tiers"), else planner.choose_tier_split on the calibration
    trace with a nominal speed model (a read as long as a token's compute: only `plan`
    measures them); None without a trace and sensitivities (the fixed rule decides)."""
    planned = (read_plan_file(shards.root, key, "ondemand") or {}).get("tiers", {})
    tier = planned.get(cfg.quality)
    if tier:
        subs = {int(l): int(n) for l, n in tier["substitutes"].items() if int(n) > 0}
        plan = make_plan({int(l): int(n) for l, n in tier["slots"].items()}, needs,
                         subs or None, sub_bytes)
        if plan.slot_bytes > allowance:
            raise BudgetError(f"{shards.root / PLAN_FILE}: its slots need {plan.slot_bytes} "
                              f"bytes, the budget {cfg.budget} leaves {allowance}; rerun "
                              "`edgemoe plan`")
        return plan
    if not (shards.root / TRACE_FILE).exists() or not (shards.root / calib.FILE_NAME).exists():
        return None
    cal = calib.Calibration.load(shards.root)
    if cal.sensitivity is None:
        return None
    from edgemoe.residency.planner import choose_tier_split, nominal_profile
    from edgemoe.residency.traces import RoutingTrace

    trace = RoutingTrace.load(shards.root / TRACE_FILE)
    if not set(needs.expert_bytes) <= set(trace.layers):
        return None
    split = choose_tier_split(trace, needs, allowance, sub_bytes,
                              nominal_profile(needs.expert_bytes), cfg.quality,
                              cal.sensitivity, wait_threshold(shards, cfg, key, cal),
                              prefetch_depth(shards, cfg, key), cal.usage)
    return make_plan(split.slots, needs, split.substitutes, sub_bytes)


def wait_threshold(shards: ShardSet, cfg: ResidencyConfig, key: PlanKey,
                   cal: calib.Calibration | None) -> float | None:
    """ondemand's wait threshold for cfg.quality: None (exact: no decisions), inf (fast), or
    balanced's: the plan file's for this key, else from the calibration trace
    (sensitivity.balanced_wait_threshold)."""
    if cfg.quality in (None, "exact"):
        return None
    if cal is None or cal.sensitivity is None:
        raise ShardSetError(f"{shards.root}: --quality {cfg.quality} weighs misses by per-layer "
                            "sensitivities; run `edgemoe calibrate` first")
    if cfg.quality == "fast":
        return math.inf
    planned = (read_plan_file(shards.root, key, "ondemand") or {}).get("wait_thresholds", {})
    if "balanced" in planned:
        return float(planned["balanced"])
    from edgemoe.residency.traces import RoutingTrace

    if not (shards.root / TRACE_FILE).exists():
        raise ShardSetError(f"{shards.root / TRACE_FILE}: no routing trace to choose --quality "
                            "balanced's threshold from; run `edgemoe calibrate` first")
    trace = RoutingTrace.load(shards.root / TRACE_FILE)
    return balanced_wait_threshold(cal.sensitivity, trace.probs, shards.n_expert_used)


def swap_schedule(shards: ShardSet, cfg: ResidencyConfig, key: PlanKey,
                  slots: Mapping[int, int], cal: calib.Calibration | None) -> dict:
    """swap's {"interval", "decay"}: the user's, else what `edgemoe plan` chose for this key,
    else the planner's choice on the stored calibration trace for these slots (reads taken to
    last one decode step each: only `plan` measures them), else the policy's defaults."""
    chosen: dict = {}
    planned = read_plan_file(shards.root, key, "swap") or {}
    if cfg.swap_interval is None and cfg.swap_decay is None and planned.get("swap_interval"):
        chosen = {"interval": int(planned["swap_interval"]),
                  "decay": float(planned.get("swap_decay") or 0.0)}
    elif (cfg.swap_interval is None or cfg.swap_decay is None) and cal is not None \
            and (shards.root / TRACE_FILE).exists():
        from edgemoe.residency.planner import SWAP_DECAYS, SWAP_INTERVALS, choose_swap_schedule
        from edgemoe.residency.traces import RoutingTrace

        trace = RoutingTrace.load(shards.root / TRACE_FILE)
        if set(slots) <= set(trace.layers) and set(slots) <= set(cal.norms):
            intervals = (cfg.swap_interval,) if cfg.swap_interval else SWAP_INTERVALS
            decays = (cfg.swap_decay,) if cfg.swap_decay is not None else SWAP_DECAYS
            s = choose_swap_schedule(trace, slots, shards.n_expert_used, cal.norms, len(slots),
                                     1.0, cal.usage, intervals, decays)
            chosen = {"interval": s.interval, "decay": s.decay}
    if cfg.swap_interval is not None:
        chosen["interval"] = cfg.swap_interval
    if cfg.swap_decay is not None:
        chosen["decay"] = cfg.swap_decay
    return chosen


def substitute_bytes(shards: ShardSet) -> dict[int, int]:
    """Bytes of one substitute slot per expert layer."""
    return {l: shards.expert(l, 0).substitute.data_bytes for l in shards.expert_layers}


def load_calibration(shards: ShardSet, need_norms: bool) -> calib.Calibration | None:
    """calibration.json beside the shards; when absent and norms are needed (swap, static),
    the norms are computed from the shards once (streamed with O_DIRECT: no page cache, one
    expert in memory at a time) and saved there."""
    from edgemoe.pool import read_span

    try:
        return calib.Calibration.load(shards.root)
    except ShardSetError:
        if not (shards.root / calib.FILE_NAME).exists() and need_norms:
            cal = calib.Calibration(norms=calib.compute_norms(shards, read_span))
            try:
                cal.save(shards.root)
            except OSError:
                pass  # a read-only shard set: recomputed next time
            return cal
        if need_norms:
            raise
        return None


def empty_policy(name: str, k: int, substitutes: bool = False):
    """A policy factory for an engine that is opened only to be measured (compute buffers):
    `name`'s routing shape, top-k slots per layer (and one substitute slot, for a pool with
    n_substitutes 1 per layer), nothing ever read (it never runs a step)."""
    def make(pool):
        slots = {l: k for l in pool.layers}
        if name == "ondemand":
            return OnDemandPolicy(pool, slots, pool.n_expert, k, n_prefetch=0,
                                  substitutes={l: 1 for l in pool.layers} if substitutes else None)
        return StaticPolicy(pool, slots, pool.n_expert, k,
                            scores={l: np.zeros(pool.n_expert) for l in pool.layers},
                            substitutes={l: 1 for l in pool.layers} if substitutes else None)
    return make


def refuse_early(shards: ShardSet, cfg: ResidencyConfig, n_ctx: int, kv_type: str = "f16"
                 ) -> None:
    """Refuse an absolute budget below the lower bound (the process now, the files' fixed parts
    and top-k slots) before anything else is loaded, the vocabulary included: a budget that
    small would be exceeded by loading it, before open_engine could say so."""
    if cfg.memory_budget is not None and not cfg.budget.relative and kv_type in _KV_BYTES:
        expert_allowance(cfg.budget, needs_from_files(shards, n_ctx, kv_type))


def device_fixed_bytes(shards_path, k: int, probe_policy, engine_kw: dict,
                       n_substitutes: dict[int, int] | None = None
                       ) -> tuple[int, dict[int, int] | None, dict[int, int] | None, str]:
    """(bytes, slot_bytes, substitute_bytes, device): what the chosen device holds besides
    expert slots (base weights, KV cache, compute buffers, measured on a probe engine with k
    slots per layer, and `n_substitutes` substitute slots, that reads nothing), the bytes of one
    slot and of one substitute slot per layer when the slots live there too (else None), and
    the device's name."""
    from edgemoe.engine import Engine

    with Engine(shards_path, n_slots=k, policy=probe_policy, measure_only=True,
                n_substitutes=n_substitutes, **engine_kw) as probe:
        backend = probe.backend
        if backend.on_host:
            raise BudgetError(f"--device-budget bounds a device's own memory; {probe.device} is "
                              "the CPU, whose memory --memory-budget bounds")
        pool = probe.pool
        slots_there = pool.buffer.buffer_type != backend.host_buffer_type
        fixed = probe.memory_by_place()["device"] - (pool.bytes_held() if slots_there else 0)
        slot_bytes = sub_bytes = None
        if slots_there:
            slot_bytes = {l: pool.expert_bytes(l) for l in pool.layers}
            if pool.substitutes:
                sub_bytes = {l: pool.expert_bytes(l, substitute=True) for l in pool.layers}
        return fixed, slot_bytes, sub_bytes, probe.device


def fit_device_budget(shards_path, budget: Budget, plan: SlotPlan, needs: MemoryNeeds,
                      policy: str, engine_kw: dict) -> SlotPlan:
    """`plan` cut down until the device's own memory fits `budget`: its fixed parts
    (device_fixed_bytes) plus the expert slots and substitute slots when they live there. As
    under a memory budget, the substitute tier comes first: as many substitutes per layer as fit
    beside top-k full slots (none when not even one does); then full slots are taken from the
    layers that have the most, one at a time. Refuses (BudgetError, with the minimum) a budget
    that cannot hold top-k slots per layer."""
    if budget.relative:
        raise BudgetError(f"device budget {budget}: give a size (4GiB, 512MiB), not a percentage")
    k = needs.n_expert_used
    probe_subs = {l: 1 for l in plan.substitutes} if plan.substitutes else None
    fixed, slot_bytes, sub_bytes, device = device_fixed_bytes(
        shards_path, k, empty_policy(policy, k, substitutes=bool(probe_subs)), engine_kw,
        probe_subs)
    per_round = sum(slot_bytes.values()) if slot_bytes else 0
    minimum = fixed + k * per_round
    if budget.bytes < minimum:
        raise BudgetError(
            f"device budget {format_bytes(budget.bytes)} is below the minimum of "
            f"{format_bytes(minimum)} on {device}: base weights, KV cache and compute buffers "
            f"there {format_bytes(fixed)}"
            + (f" + {k} expert slots per layer {format_bytes(k * per_round)}" if slot_bytes else ""))
    if not slot_bytes:
        return plan   # the device cannot run the experts: their slots are host memory
    room = budget.bytes - fixed
    subs = plan.substitutes
    if subs:
        count = min(max(subs.values()), (room - k * per_round) // sum(sub_bytes.values()))
        subs = {l: min(n, count) for l, n in subs.items()} if count >= 1 else None
        room -= sum(n * sub_bytes[l] for l, n in subs.items()) if subs else 0
    slots = dict(plan.slots)
    while sum(n * slot_bytes[l] for l, n in slots.items()) > room:
        layer = max(slots, key=lambda l: (slots[l], slot_bytes[l]))
        slots[layer] -= 1
    if not subs:
        return make_plan(slots, needs)
    return make_plan(slots, needs, subs, substitute_bytes(ShardSet.open(shards_path)))


def open_engine(shards_path: str | Path, cfg: ResidencyConfig, n_ctx: int = 2048,
                n_threads: int | None = None, device: str | None = None, n_batch: int = 512,
                kv_type: str = "f16", telemetry=None, n_outputs: int | None = 1,
                repack: bool = False):
    """An Engine under `cfg`; its policy (engine.policy) has loaded its experts. Returns the
    engine and the SlotPlan (None without a budget: every expert resident). Compute buffers are
    reserved for `n_outputs` rows of logits per batch (1: generation, which samples the last
    token). `repack`: expert slots in host memory in the CPU's repacked layouts (Engine)."""
    from edgemoe.engine import Engine

    name = cfg.policy_name
    kw = dict(n_ctx=n_ctx, n_threads=n_threads, device=device, n_batch=n_batch, kv_type=kv_type,
              n_outputs=n_outputs)
    if cfg.memory_budget is None and cfg.device_budget is None and name == "full":
        engine = Engine(shards_path, policy=lambda pool: FullPolicy(
            pool, pool.n_expert, pool.shards.n_expert_used, pool.layers, telemetry),
            repack=repack, **kw)
        return _warmed(engine), None
    if kv_type not in _KV_BYTES:
        raise EdgeMoeError(f"kv_type {kv_type!r}: expected one of {sorted(_KV_BYTES)}")
    budget = cfg.budget
    shards = ShardSet.open(shards_path)
    # Resolving the device loads the ggml backends: part of the process measured next.
    key = PlanKey.of(budget, n_ctx, kv_type, device)
    needs = needs_from_files(shards, n_ctx, kv_type)
    if not budget.relative:
        if budget.bytes < needs.runtime_bytes + _PROBE_BYTES:
            # Too small to measure even the compute buffers within it: refuse (below the lower
            # bound) before allocating anything.
            expert_allowance(budget, needs)
        # A probe engine measures the compute buffers; its KV cache and slots are never
        # touched, so it costs the process only graph metadata and the backend (less than
        # _PROBE_BYTES). The minimum a refusal states is then exact, not a lower bound.
        k = shards.n_expert_used
        subs = cfg.uses_substitutes(shards)   # two expert passes per layer
        with Engine(shards_path, n_slots=k, policy=empty_policy(name, k, subs),
                    n_substitutes={l: 1 for l in shards.expert_layers} if subs else None,
                    measure_only=True, **kw) as probe:
            compute = probe.memory()["compute"]
        # The process measured again: the probe started the backend, which stays for the real
        # engine (its own buffers went back when it closed).
        needs = needs_from_files(shards, n_ctx, kv_type, compute)
    plan = choose_slots(shards, cfg, needs, key)
    if cfg.device_budget is not None:
        plan = fit_device_budget(shards_path, parse_budget(cfg.device_budget), plan, needs,
                                 name, kw)
    cal = load_calibration(shards, need_norms=name in ("swap", "static"))
    options: dict = {}
    if telemetry is not None:
        options["telemetry"] = telemetry
    if name == "swap":
        options.update(swap_schedule(shards, cfg, key, plan.slots, cal))
        if cal is not None and cal.usage is not None:
            # Start from the experts calibration text used most (static's choice); swapping
            # then follows the text at hand.
            options["initial"] = {l: np.argsort(-cal.usage[l], kind="stable") for l in plan.slots}
    if name == "ondemand":
        options["n_prefetch"] = prefetch_depth(shards, cfg, key)
        if cfg.adaptive_gating is not None:
            if cal is None or cal.sensitivity is None:
                raise ShardSetError(f"{shards.root}: --adaptive-gating needs per-layer "
                                    "sensitivities; run `edgemoe calibrate` first")
            options.update(sensitivity=cal.sensitivity, threshold=cfg.adaptive_gating)
        if cfg.quality is not None:
            options["quality"] = cfg.quality
            options["wait_threshold"] = wait_threshold(shards, cfg, key, cal)
            if cfg.quality != "exact":
                options["sensitivity"] = cal.sensitivity
        if plan.substitutes and cal is not None:
            ranking = cal.usage if cal.usage is not None else cal.norms
            options["substitute_order"] = {l: np.argsort(-np.asarray(ranking[l]), kind="stable")
                                           for l in plan.slots}

    if plan.substitutes:
        options["substitutes"] = plan.substitutes

    def policy(pool):
        return make_policy(name, pool, plan.slots, shards.n_expert, shards.n_expert_used,
                           norms=cal.norms if cal else None,
                           usage=cal.usage if cal else None, **options)

    engine = _warmed(Engine(shards_path, n_slots=dict(plan.slots), policy=policy,
                            n_substitutes=plan.substitutes, repack=repack, **kw))
    engine.slot_plan = plan
    engine.memory_needs = needs
    return engine, plan


def _warmed(engine):
    """The engine with its policy's experts loaded (closed again if a read fails)."""
    try:
        engine.warm()
    except BaseException:
        engine.close()
        raise
    return engine


class StepLog(Telemetry):
    """Telemetry that also keeps every step's per-token record (`--stats-json`)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict] = []

    def token_done(self, n_tokens: int = 1) -> dict:
        rec = super().token_done(n_tokens)
        self.steps.append(rec)
        return rec


def add_residency_args(p) -> None:
    """The residency flags shared by run, chat and anything else that opens a model."""
    from edgemoe.cli import ranged

    p.add_argument("--memory-budget", default=None, metavar="SIZE|PCT",
                   help="bound the process (2GiB, 1.5GB, 512MiB) or the resident experts (50%%, "
                   "of the experts' bytes); below the minimum the model is refused before "
                   "loading, with the minimum stated")
    p.add_argument("--device-budget", default=None, metavar="SIZE",
                   help="bound the device's own memory (4GiB): its base weights, KV cache, "
                   "compute buffers and expert slots; with --device other than the CPU")
    p.add_argument("--policy", choices=POLICIES, default=None,
                   help="expert residency: full (all resident), swap (masked gating over a "
                   "resident set adapted in the background; the default with a budget), "
                   "ondemand (exact: misses loaded before the experts run), static (fixed set)")
    p.add_argument("--adaptive-gating", type=ranged(float, 0.0), default=None, metavar="T",
                   help="ondemand: run one expert fewer when s_l * w^2 < T (s_l from "
                   "`edgemoe calibrate`)")
    p.add_argument("--n-prefetch", type=ranged(int, 0), default=None, metavar="N",
                   help="ondemand: next-layer experts prefetched per layer, 0 = off (default: "
                   "what `edgemoe plan` chose for this budget, the fastest on this storage; "
                   "1 without a plan)")
    p.add_argument("--quality", choices=QUALITIES, default=None,
                   help="ondemand under a budget: what a missing expert costs. exact (every miss "
                   "waits for its read), balanced (waits for the misses that matter, by s_l * "
                   "w^2 against a threshold from `edgemoe plan` or `calibrate`; the others run "
                   "their low-bit substitute while the expert loads, or are dropped), fast "
                   "(never waits while a substitute or another chosen expert can run). Implies "
                   "--policy ondemand")
    p.add_argument("--swap-interval", type=ranged(int, 1), default=None, metavar="N",
                   help="swap: tokens per importance window (default: what `edgemoe plan` chose "
                   "for this budget, else the best on the calibration trace, else 16)")
    p.add_argument("--swap-decay", type=ranged(float, 0.0, 0.999), default=None, metavar="D",
                   help="swap: weight of the previous windows' importance, 0 = the window alone "
                   "(default: chosen with the interval)")
    p.add_argument("--no-substitutes", dest="substitutes", action="store_false",
                   help="static/swap: do not keep the shard set's low-bit expert substitutes "
                   "resident (`edgemoe convert --substitute-type`); by default a budget is "
                   "split between them and full-precision slots")
    p.add_argument("--stats-json", type=Path, default=None, metavar="FILE",
                   help="write residency telemetry (per run and per token) to FILE")


def residency_config(args) -> ResidencyConfig:
    return ResidencyConfig(memory_budget=args.memory_budget, policy=args.policy,
                           adaptive_gating=args.adaptive_gating, n_prefetch=args.n_prefetch,
                           swap_interval=getattr(args, "swap_interval", None),
                           swap_decay=getattr(args, "swap_decay", None),
                           substitutes=args.substitutes,
                           quality=getattr(args, "quality", None),
                           device_budget=getattr(args, "device_budget", None))


def residency_summary(engine) -> str:
    """The one line printed after every run."""
    policy = engine.policy
    quality = getattr(policy, "quality", None)
    return f"{policy.telemetry.summary()} [{policy.name}" + (
        f", quality {quality}]" if quality else "]")


def write_stats_json(engine, path: str | Path) -> None:
    """Per-run and per-token residency figures as JSON (the steps need a StepLog telemetry)."""
    policy = engine.policy
    t = policy.telemetry
    doc = {"policy": policy.name,
           "quality": getattr(policy, "quality", None),
           "slots": {str(l): n for l, n in sorted(policy.slots.items())},
           "substitutes": {str(l): t.n_slots for l, t in sorted(policy.sub_tables.items())},
           "memory": engine.memory(),
           "run": record(t.counters, t.resident_bytes),
           "steps": getattr(t, "steps", None)}
    try:
        Path(path).write_text(json.dumps(doc, indent=1))
    except OSError as exc:
        raise EdgeMoeError(f"{path}: cannot write the stats ({exc.strerror})") from None
