"""docs/RESULTS.md and its plots from the figures scripts/bench.py stored (nothing else goes in)."""
from __future__ import annotations

import math
from pathlib import Path

LOSS_LIMIT = 0.03
FRACTIONS = ("100%", "75%", "50%", "35%", "25%")
# Exact runners: their output must equal the full model's.
EXACT = ("full", "ondemand", "ondemand+prefetch", "prefetch0", "prefetch1", "prefetch2")
# Storage read rates of the emulated boards and their memory's theoretical peak bandwidth
# (datasheets: Raspberry Pi 5 LPDDR4X-4267 on a 32-bit bus, Jetson Orin Nano 8 GB LPDDR5 on
# 128 bits); sustained bandwidth is lower, so projections made with it are upper bounds.
BOARD_MEM_BPS = {"rpi5-sd": 17.1e9, "rpi5-nvme": 17.1e9, "jetson-orin-nano": 68e9}


def _profiles():
    from edge_emulate import PROFILES

    return PROFILES


def _pct(x, digits=1):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else \
        f"{100 * x:.{digits}f}%"


def _num(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


def _mib(x):
    return "–" if x is None else f"{x / 2**20:.2f}"


def _gib(x):
    return f"{x / 2**30:.2f} GiB"


def _table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _quality_of(results, runner: str, budget: str) -> dict | None:
    q = ((results.get("quality") or {}).get("figures") or {}).get("runners", {})
    # The exact ondemand runners share ondemand's (lossless) quality; the lossy ones
    # (+gating, +balanced, +fast) have their own row.
    name = "ondemand" if runner in ("ondemand", "ondemand+prefetch") else runner
    row = (q.get(name) or {}).get(budget)
    return row if row and "error" not in row else None


def _quality_cell(row) -> str:
    if row is None or not row.get("kl"):
        return "–"
    kl = row["kl"]
    return (f"PPL x{kl['ppl_ratio']:.3f}, agree {_pct(kl['agreement'])}, "
            f"KL {kl['mean_kl']:.3f}")


# -- sections ---------------------------------------------------------------------------------

def _header(results) -> list[str]:
    m = (results.get("machine") or {}).get("figures")
    lines = ["# edgemoe: results", "",
             "Every figure on this page was written by `scripts/bench.py` (the command is given "
             "with each section); rerun it to regenerate the page, `--quick` for a small "
             "version in minutes. Nothing here is typed by hand.", ""]
    if m:
        bw = m["bandwidth"]
        lines += [f"- Machine: {m['cpu']}, {m['cores']} cores, {_gib(m['ram'])} RAM, Linux "
                  f"{m['kernel']}; Python {m['python']}, llama-cpp-python "
                  f"{m['llama_cpp_python']}; edgemoe commit {m['commit']}; {m['date']}.",
                  f"- Memory bandwidth measured in the same run: {bw['read_bps'] / 1e9:.1f} GB/s "
                  f"read, {bw['copy_bps'] / 1e9:.1f} GB/s copy (read + write).",
                  f"- Load average when the machine section ran: "
                  f"{', '.join(f'{x:.1f}' for x in m['load'])} on {m['cores']} cores: "
                  + ("a loaded, shared host; speeds are taken with one thread per runner, "
                     "runners one after another, and are best read as ratios within a table."
                     if m["load"][0] > 0.5 * m["cores"] else "a quiet host."),
                  f"- Edge emulation (cgroup memory limit + read throttle): {m['emulation']}.",
                  "- The compute here is x86; only memory size and storage speed are emulated. "
                  "Each speed table projects the figure onto the real board (see *On a real "
                  "board*)."]
    lines.append("")
    lines.append("| section | mode | when | took | command |")
    lines.append("|---|---|---|---|---|")
    for name in ("machine", "routing", "quality", "speed", "large", "large_quality", "ablations"):
        s = results.get(name)
        if s is None:
            lines.append(f"| {name} | **not run** | – | – | `scripts/bench.py --sections {name}` |")
        else:
            mode = s.get("mode", "?") + (" (**partial**: cut short)" if s.get("partial") else "")
            lines.append(f"| {name} | {mode} | {s['when']} | "
                         f"{s['seconds'] / 60:.1f} min | `{s['command']}` |")
    if any((results.get(n) or {}).get("mode") == "quick" for n in results if n != "meta"):
        lines += ["", "**Sections marked quick ran on small models with short runs (the CI "
                  "check of this command); they are not the evaluation at real scale.**"]
    return lines + [""]


def _routing(results, out_dir: Path) -> list[str]:
    s = results.get("routing")
    lines = ["## Routing of the synthetic models against real routing", ""]
    if s is None:
        return lines + ["Not run.", ""]
    f = s["figures"]
    pub = f["published"]
    models = f.get("models", [])
    keys = [("reuse 1", "reuse of the previous token's experts", lambda m: m["all_layers"]["reuse"]["1"]),
            ("reuse 4", "... within 4 tokens", lambda m: m["all_layers"]["reuse"]["4"]),
            ("reuse 8", "... within 8 tokens", lambda m: m["all_layers"]["reuse"]["8"]),
            ("LRU 40%", "per-layer LRU hit, 40% of experts, after 64 tokens",
             lambda m: m["all_layers"]["lru_hit"]["0.4"]),
            ("touched 128", "experts layer 0 touches in 128 tokens",
             lambda m: m["layer0"]["touched"]["128"])]
    header = ["figure"] + [m["name"] for m in models] + ["Qwen3-30B-A3B, published"]
    rows = []
    for key, label, get in keys:
        lo, hi = pub[key]
        ref = f"{lo:.0f} of 128" if key.startswith("touched") else (
            f"{100 * lo:.0f}-{100 * hi:.0f}%")
        cells = [f"{get(m):.0f}" if key.startswith("touched") else _pct(get(m)) for m in models]
        rows.append([label] + cells + [ref])
    lines += _table(header, rows) + [""]
    lines.append("Per-layer LRU hit rate by the share of experts resident (the whole curve):")
    lines.append("")
    fr = list(models[0]["all_layers"]["lru_hit"]) if models else []
    lines += _table(["model"] + [f"{100 * float(x):.0f}%" for x in fr],
                    [[m["name"]] + [_pct(m["all_layers"]["lru_hit"][x]) for x in fr]
                     for m in models])
    lines.append("")
    ours = next((m for m in models if "48 x 128" in m["name"]), None) or next(
        (m for m in models if "routing" in m["name"]), None)
    if ours:
        checks = [("reuse 1", ours["all_layers"]["reuse"]["1"], (0.38, 0.47)),
                  ("reuse 8", ours["all_layers"]["reuse"]["8"], (0.75, 0.85)),
                  ("LRU 40%", ours["all_layers"]["lru_hit"]["0.4"], (0.88, 0.96))]
        held = all(lo <= v <= hi for _, v, (lo, hi) in checks)
        lines.append(f"The synthetic router ({ours['name']}) is "
                     + ("within" if held else "**outside**") + " the published ranges on all "
                     "three figures that size a cache (previous token 38-47%, within 8 tokens "
                     "75-85%, LRU with 40% of experts 88-96%): "
                     + ", ".join(f"{k} {_pct(v)}" for k, v, _ in checks) + ". "
                     f"Measured on the model itself over {ours['all_layers']['n_tokens']} tokens "
                     "of the bundled held-out text (windows of 512 tokens, each starting cold); "
                     "all benchmarks under a budget below use this routing.")
        lines.append("")
    em = f.get("exact_vs_masked")
    if em:
        lines.append(f"The synthetic routers read only residual dimensions no expert writes, so "
                     f"which experts ran cannot change the routing: on the small variant the "
                     f"exact (ondemand, 60%) and masked (full) runs chose the same experts in "
                     f"{_pct(em['identical_rows'])} of (token, layer) rows. The 30B shape is "
                     "measured under swap (masked routing shows the unmasked router) because "
                     "an exact run's batched prompts would read every expert again per batch.")
        lines.append("")
    if _plot_routing(models, out_dir / "routing.png"):
        lines += ["![LRU hit rate by resident share](results/routing.png)", ""]
    lines.append(f"Command: `{s['command']}` (section `routing`, {s['seconds'] / 60:.1f} min).")
    return lines + [""]


def _quality(results, out_dir: Path) -> list[str]:
    s = results.get("quality")
    lines = ["## Quality against the budget (bundled model, held-out text)", ""]
    if s is None:
        return lines + ["Not run.", ""]
    f = s["figures"]
    full = f["full"]
    lines.append(f"`edgemoe perplexity` on {f['chunks']} windows of {f['ctx']} tokens of the "
                 f"bundled model's held-out text (Shakespeare and Python alternating every "
                 f"~2000 characters), second halves decoded token by token so residency adapts "
                 f"as in a chat. Full model: PPL {full['ppl']:.4f} +/- {full['ppl_err']:.4f} "
                 f"over {full['n_scored']} scored tokens. Each cell: PPL ratio to full, top-1 "
                 "agreement with full, mean KL (nats); the budget is the share of expert bytes "
                 "allowed resident. Adaptive gating's T drops one expert in "
                 f"{100 * f['drop_rate']:.0f}% of calibration decisions "
                 f"(T = {_num(f['threshold'], '{:.4g}')}).")
    lines.append("")
    rows, exp_rows = [], []
    for runner, by_budget in f["runners"].items():
        cells, exps = [], []
        for b in FRACTIONS:
            r = by_budget.get(b)
            if r is None:
                cells.append("–")
                exps.append("–")
            elif "error" in r:
                cells.append("refused" if "needs every expert" in r["error"] or
                             "below the minimum" in r["error"] else "error")
                exps.append("–")
            else:
                kl = r["kl"]
                cells.append(f"x{kl['ppl_ratio']:.4f} · {_pct(kl['agreement'])} · "
                             f"{kl['mean_kl']:.4f}")
                t = r.get("telemetry") or {}
                exps.append(f"{r['experts_per_token']:.2f} · hit {_pct(t.get('hit_rate'))}")
        rows.append([runner] + cells)
        exp_rows.append([runner] + exps)
    lines += _table(["policy"] + list(FRACTIONS), rows) + [""]
    lines.append("Experts computed per token and layer (top-k is "
                 f"{full['n_expert_used']}) and expert hit rate:")
    lines.append("")
    lines += _table(["policy"] + list(FRACTIONS), exp_rows) + [""]
    # Statements the page owes its reader.
    od = f["runners"].get("ondemand", {})
    exact = [r for r in od.values() if "error" not in r]
    if exact:
        worst_kl = max(r["kl"]["mean_kl"] for r in exact)
        worst_agree = min(r["kl"]["agreement"] for r in exact)
        worst_ratio = max(abs(r["kl"]["ppl_ratio"] - 1) for r in exact)
        if worst_kl == 0 and worst_agree == 1 and worst_ratio < 1e-9:
            lines.append("ondemand **equals the full model** at every budget (KL 0, 100% "
                         "agreement, PPL ratio 1).")
        elif worst_kl < 1e-5 and worst_agree >= 0.999 and worst_ratio < 1e-4:
            lines.append(f"ondemand **equals the full model up to float rounding** at every "
                         f"budget (worst: mean KL {worst_kl:.1e}, agreement "
                         f"{_pct(worst_agree, 2)}, PPL ratio off by {worst_ratio:.1e}): where a "
                         "prompt needs more experts than a layer has slots, their outputs are "
                         "summed group by group, in another order than in one graph.")
        else:
            lines.append("ondemand **differs from the full model** beyond float rounding: a bug.")
    for runner, by_budget in f["runners"].items():
        r = by_budget.get("50%")
        if r and "error" not in r and r["kl"]["ppl_ratio"] - 1 > LOSS_LIMIT:
            lines.append(f"**{runner} loses {100 * (r['kl']['ppl_ratio'] - 1):.1f}% perplexity "
                         f"at 50% of expert bytes** (more than {100 * LOSS_LIMIT:.0f}%), with "
                         f"{_pct(r['kl']['agreement'])} top-1 agreement with the full model.")
    lines.append("")
    if _plot_quality(f, out_dir / "quality.png"):
        lines += ["![PPL ratio by budget](results/quality.png)", ""]
    lines.append(f"Command: `{s['command']}` (section `quality`, {s['seconds'] / 60:.1f} min).")
    return lines + [""]


def _full_bound(results, weights) -> float | None:
    """tok/s bound of decode at full memory: weight bytes touched per token over the memory
    read bandwidth measured by the machine section."""
    m = (results.get("machine") or {}).get("figures")
    if not m or not weights:
        return None
    return m["bandwidth"]["read_bps"] / weights["touched_per_token"]


def _speed_rows(results, rows: dict, budget: str, limit, profile: str | None = None,
                weights=None) -> list[list]:
    out = []
    for runner, r in rows.items():
        if runner == "plans" or not isinstance(r, dict):
            continue
        if "error" in r:
            out.append([runner, "failed: " + r["error"][-80:].replace("|", "/")] + ["–"] * 9)
            continue
        d = r.get("decode") or {}
        peak = r.get("peak")
        q = None if runner in EXACT or runner == "llama.cpp" else _quality_of(results, runner,
                                                                              budget)
        qcell = "exact" if runner in EXACT else ("–" if runner == "llama.cpp" else
                                                  _quality_cell(q))
        if runner == "full":
            bound = _full_bound(results, weights)
            frac = None if bound is None else r["tok_s"] / bound
        elif runner == "llama.cpp" or profile is None or profile not in _profiles():
            bound = frac = None
        else:
            bound, frac = _bound(r, profile)
        out.append([runner, _num(r.get("prefill_tok_s"), "{:.1f}"), _num(r["tok_s"], "{:.2f}"),
                    _mib(d.get("bytes_read_per_token")), _pct(d.get("hit_rate")),
                    _num(None if d.get("stall_seconds_per_token") is None else
                         1e3 * d["stall_seconds_per_token"], "{:.1f}"),
                    "–" if peak is None else f"{peak / 2**20:.0f}"
                    + ("" if runner == "full" else (" ≤" if peak <= limit else " **>**")),
                    _num(bound, "{:.1f}"), _pct(frac), qcell])
    return out


SPEED_HEADER = ["runner", "prefill tok/s", "decode tok/s", "read MiB/tok", "hit",
                "stall ms/tok", "cgroup peak MiB (vs limit)", "bound tok/s", "of bound",
                "quality vs full"]


def _speed(results, out_dir: Path) -> list[str]:
    s = results.get("speed")
    lines = ["## Speed against the budget on emulated boards (bundled model)", ""]
    if s is None:
        return lines + ["Not run.", ""]
    f = s["figures"]
    lines.append(f"scripts/bench_budget.py per budget: each runner a child process started cold "
                 f"in a memory cgroup whose limit is the budget (the runtime's fixed parts plus "
                 f"that share of expert bytes), storage read rate throttled to the profile's; "
                 f"12 prompt tokens, then {f['n']} tokens decoded one per step from the "
                 "held-out text (teacher-forced). llama.cpp is llama-cpp-python on the exported "
                 "GGUF with its default parameters in the same cgroup and thread count. A lossy "
                 "runner's quality (section above, same budget) is beside its speed. The bundled "
                 "model computes a token in well under a millisecond, so these figures measure "
                 "Python's per-token overhead and the host's load far more than storage or "
                 "memory: single runs on this shared host vary by 10x. Speed at real scale is in "
                 "the next section.")
    lines.append("")
    for budget, doc in f["budgets"].items():
        if "error" in doc:
            lines += [f"### {budget}: failed", "", "```", doc["error"], "```", ""]
            continue
        for profile, rows in doc["profiles"].items():
            lines.append(f"### {budget} of expert bytes, {profile} (limit "
                         f"{doc['budget_bytes'] / 2**20:.1f} MiB)")
            lines.append("")
            lines += _table(SPEED_HEADER, _speed_rows(results, rows, budget, doc["budget_bytes"],
                                                      profile, f.get("weights")))
            lines.append("")
    if _plot_speed(f, out_dir / "speed.png"):
        lines += ["![decode tok/s by budget](results/speed.png)", ""]
    lines.append("Bounds: full runs at full memory against the weight bytes it touches per token "
                 "over the memory bandwidth measured here; a runner under a budget against "
                 f"{BOUND_TEXT} On this tiny model Python's per-token overhead, not bytes, sets "
                 "the pace.")
    lines.append("")
    lines.append(f"Command: `{s['command']}` (section `speed`, {s['seconds'] / 60:.1f} min).")
    return lines + [""]


BOUND_TEXT = ("its physical bound: the longer of the time its misses' bytes per token take at "
              "the throttled read rate and its compute (its time per token less its stall), as "
              "if every read overlapped compute. No run can pass it (but for the throttle's "
              "burst allowance); the serial sum of the two, which overlapped reads (prefetch, "
              "the reading thread, swap's background swaps) do beat, is not a bound.")


def _bound(r: dict, profile: str) -> tuple[float | None, float | None]:
    """(bound tok/s, fraction reached) of an edgemoe run under a budget: the longer of the time
    its reads take at the throttled rate and its compute (the run's time per token less its
    stall), i.e. reads and compute perfectly overlapped."""
    d = r.get("decode") or {}
    if "tok_s" not in r or d.get("bytes_read_per_token") is None:
        return None, None
    t = 1 / r["tok_s"]
    compute = max(t - (d.get("stall_seconds_per_token") or 0.0), 0.0)
    bound_t = max(d["bytes_read_per_token"] / _profiles()[profile].read_bps, compute)
    if bound_t <= 0:
        return None, None
    return 1 / bound_t, bound_t / t


def _large(results, out_dir: Path) -> list[str]:
    s = results.get("large")
    lines = ["## Real shapes: Qwen3-30B-A3B at Q4_K under 8 GiB, OLMoE-1B-7B under 2 GiB", ""]
    if s is None:
        return lines + ["Not run (the full bench writes ~40 GB of models; "
                        "`scripts/bench.py --sections large`).", ""]
    for preset, doc in s["figures"].items():
        if "error" in doc:
            lines += [f"### {preset}: not run: {doc['error']}", ""]
            continue
        w = doc["weights"]
        lines.append(f"### {preset} shape, limit {doc['limit']}")
        lines.append("")
        lines.append(f"Synthetic weights of the real shape (scripts/make_synthetic.py --preset "
                     f"{preset}): base {_gib(w['base_bytes'])}, {w['n_expert_layers']} x "
                     f"{w['n_expert']} experts of {w['expert_bytes'] / 2**20:.2f} MiB, top-"
                     f"{w['k']}: {_gib(w['touched_per_token'])} of weights touched per token. "
                     "The full policy needs every expert resident and does not fit the limit.")
        lines.append("")
        speed = doc["speed"]
        if "error" in speed:
            lines += ["Speed runs failed:", "", "```", speed["error"], "```", ""]
            continue
        quality = {**doc.get("quality", {}), **(((results.get("large_quality") or {})
                                                  .get("figures") or {}).get(preset) or {})}
        for profile, rows in speed["profiles"].items():
            n = (speed.get("n_by_profile") or {}).get(profile, speed.get("n"))
            lines.append(f"#### {profile} (12 prompt tokens, {n} decoded)")
            lines.append("")
            table = []
            for runner, r in rows.items():
                if runner == "plans" or not isinstance(r, dict):
                    continue
                if "error" in r:
                    table.append([runner, "failed: " + r["error"][-80:]] + ["–"] * 8)
                    continue
                d = r.get("decode") or {}
                bound, frac = _bound(r, profile) if runner != "llama.cpp" else (None, None)
                disk = r.get("disk_read")
                q = quality.get(runner)
                qcell = ("exact" if runner in EXACT else "–" if runner == "llama.cpp" else
                         _quality_cell(q) if q and "error" not in q else
                         "**lossy: quality not measured yet**")
                table.append([runner, _num(r.get("prefill_tok_s"), "{:.2f}"),
                              _num(r["tok_s"], "{:.3f}"), _mib(d.get("bytes_read_per_token")),
                              _pct(d.get("hit_rate")),
                              _num(None if d.get("stall_seconds_per_token") is None else
                                   1e3 * d["stall_seconds_per_token"], "{:.0f}"),
                              "–" if disk is None else f"{disk / 2**30:.2f}",
                              _num(bound, "{:.3f}"), _pct(frac), qcell])
            lines += _table(["runner", "prefill tok/s", "decode tok/s", "read MiB/tok", "hit",
                             "stall ms/tok", "disk read GiB (whole run)", "bound tok/s",
                             "of bound", "quality vs exact"], table)
            lines.append("")
            lines += _large_verdict(preset, profile, rows)
    lines += ["The synthetic models' weights are random, so their perplexity is near or above "
              "the vocabulary size and means nothing as language quality; beside a lossy "
              "policy's speed, KL and top-1 agreement against the exact (ondemand) run under the "
              "same limit (one window of 128 tokens) measure how far the policy moves the "
              "output. A random model's near-flat logits make its top-1 fragile: the bundled "
              "model's quality table above is the language-quality measure.", "",
              f"The bound of an edgemoe run is {BOUND_TEXT} llama.cpp's reads are the "
              "cgroup's disk bytes over the whole run (prompt included).", ""]
    if _plot_large(s["figures"], out_dir / "large.png"):
        lines += ["![large shapes](results/large.png)", ""]
    lines.append(f"Command: `{s['command']}` (section `large`, {s['seconds'] / 60:.1f} min).")
    return lines + [""]


def _large_verdict(preset, profile, rows) -> list[str]:
    tok = {k: v["tok_s"] for k, v in rows.items() if isinstance(v, dict) and "tok_s" in v}
    exact = {k: v for k, v in tok.items() if k in EXACT and k != "full"}
    if not exact or "llama.cpp" not in tok:
        return []
    best = max(exact, key=exact.get)
    ratio = exact[best] / tok["llama.cpp"]
    _, frac = _bound(rows[best], profile)
    out = [f"Best exact policy: {best} at {exact[best]:.3f} tok/s = **{ratio:.2f}x llama.cpp** "
           f"({tok['llama.cpp']:.3f} tok/s) in the same cgroup"
           + (f", {_pct(frac)} of its bound" if frac is not None else "") + "."]
    if preset == "qwen3-30b-a3b" and profile == "rpi5-nvme":
        ok = ratio >= 3 and frac is not None and frac >= 0.5
        out.append(f"Target (>= 3x llama.cpp and within 2x of the bound): "
                   f"{'**met**' if ok else '**not met**'}.")
    return out + [""]


def _ablations(results) -> list[str]:
    s = results.get("ablations")
    lines = ["## Ablations (bundled model)", ""]
    if s is None:
        return lines + ["Not run.", ""]
    f = s["figures"]

    def qrow(label, r):
        if r is None or "error" in r:
            return [label, (r or {}).get("error", "–")[:80], "–", "–", "–", "–"]
        t = r.get("telemetry") or {}
        return [label, f"x{r['kl']['ppl_ratio']:.4f}", _pct(r["kl"]["agreement"]),
                f"{r['kl']['mean_kl']:.4f}", f"{r['experts_per_token']:.2f}",
                _pct(t.get("hit_rate"))]

    head = ["variant", "PPL ratio", "agreement", "KL", "experts/token", "hit"]
    lines += ["### Swap importance: Eq. 1 against usage counts (50%)", ""]
    lines += _table(head, [qrow(k, v) for k, v in f["importance"].items()]) + [""]
    lines += ["swap's figures vary from run to run: its background swaps race the decode, so "
              "which experts are resident when a token arrives is timing-dependent (compare "
              "the Eq. 1 row with swap at 50% in the quality table: the same setting).", ""]
    lines += ["### Swap interval in tokens (50%)", ""]
    lines += _table(head, [qrow(k, v) for k, v in f["swap_interval"].items()]) + [""]
    lines += ["### Slots per layer: planned (slot DP on the calibration trace) against uniform "
              "(35%)", ""]
    lines += _table(head, [qrow(f"{p} {k}", v) for p, d in f["slots"].items()
                           for k, v in d.items()]) + [""]
    lines += ["### Adaptive-gating threshold (ondemand, 35%)", ""]
    lines += _table(head, [qrow(f"T={v['threshold']:.4g} ({100 * float(k):.0f}% drop on "
                                "calibration)", v) for k, v in f["gating"].items()]) + [""]
    lines += ["### Prefetch depth (ondemand, 35%, speed)", ""]
    p = f["prefetch"]
    if "error" in p:
        lines += ["```", p["error"], "```"]
    else:
        for profile, rows in p["profiles"].items():
            lines.append(f"{profile}:")
            lines.append("")
            lines += _table(SPEED_HEADER, _speed_rows(results, rows, "35%", p["budget_bytes"],
                                                      profile))
            lines.append("")
    lines.append(f"Command: `{s['command']}` (section `ablations`, {s['seconds'] / 60:.1f} min).")
    return lines + [""]


def _board(results) -> list[str]:
    lines = ["## On a real board", "",
             "Storage and memory size are emulated for real (a cgroup limit counts RSS and page "
             "cache; the block device is throttled), so bytes read per token, hit rates and "
             "stalls are what a board with that storage would see. Compute is this x86 "
             "core's. A board's decode time per token is at least its reads at the storage "
             "rate plus the weights it touches in memory at its memory bandwidth: with the "
             "boards' theoretical peak bandwidth (sustained is lower, and an ARM core may be "
             "compute-bound first) the projections below are upper bounds.", ""]
    large = ((results.get("large") or {}).get("figures")) or {}
    rows = []
    for preset, doc in large.items():
        if "error" in doc or "error" in doc.get("speed", {}):
            continue
        w = doc["weights"]
        for profile, runs in doc["speed"]["profiles"].items():
            for runner, r in runs.items():
                if not isinstance(r, dict) or "tok_s" not in r or runner == "llama.cpp":
                    continue
                d = r.get("decode") or {}
                if d.get("bytes_read_per_token") is None:
                    continue
                mem_t = w["touched_per_token"] / BOARD_MEM_BPS[profile]
                read_t = d["bytes_read_per_token"] / _profiles()[profile].read_bps
                rows.append([preset, profile, runner, f"{r['tok_s']:.3f}",
                             f"{1 / (mem_t + read_t):.2f}"])
    if rows:
        lines += _table(["shape", "board", "runner", "decode tok/s here", "board, at most"],
                        rows)
    else:
        lines.append("(No large-shape runs yet.)")
    return lines + [""]


# -- plots ------------------------------------------------------------------------------------

def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def _save(plt, fig, path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_routing(models, path) -> bool:
    plt = _plt()
    if plt is None or not models:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in models:
        h = m["all_layers"]["lru_hit"]
        ax.plot([100 * float(x) for x in h], [100 * v for v in h.values()], marker="o",
                label=m["name"])
    ax.errorbar([40], [92.5], yerr=[[2.5], [2.5]], fmt="s", color="k",
                label="Qwen3-30B-A3B, published (90-95%)")
    ax.plot([100 * n / 512 for n in (31, 62, 93, 124, 171)], [43, 62, 72, 79, 85], "k--",
            label="512-expert top-10 model, real text, published")
    ax.set_xlabel("experts resident per layer (% of the layer's experts)")
    ax.set_ylabel("per-layer LRU hit rate (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _quality_lines(ax, runners) -> None:
    """Each runner's perplexity ratio to full by the share of expert bytes resident (x from
    100% down), on `ax` (the quality plot and the headline's left half)."""
    for runner, by_budget in runners.items():
        pts = sorted((float(b[:-1]), r["kl"]["ppl_ratio"]) for b, r in by_budget.items()
                     if "error" not in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=runner)
    ax.set_xlabel("expert bytes resident (%)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)


def _plot_quality(f, path) -> bool:
    plt = _plt()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    _quality_lines(ax, f["runners"])
    ax.axhline(1 + LOSS_LIMIT, color="grey", ls=":", label="+3%")
    ax.set_ylabel("perplexity / full")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _plot_speed(f, path) -> bool:
    plt = _plt()
    if plt is None:
        return False
    series: dict = {}
    for budget, doc in f["budgets"].items():
        for profile, rows in (doc.get("profiles") or {}).items():
            for runner, r in rows.items():
                if isinstance(r, dict) and "tok_s" in r:
                    series.setdefault(profile, {}).setdefault(runner, []).append(
                        (float(budget[:-1]), r["tok_s"]))
    if not series:
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, (profile, runners) in zip(axes[0], series.items()):
        for runner, pts in runners.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=runner)
        ax.set_title(profile)
        ax.set_xlabel("expert bytes resident (%)")
        ax.set_ylabel("decode tok/s")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(plt, fig, path)


def _plot_large(figs, path) -> bool:
    plt = _plt()
    if plt is None:
        return False
    groups = []
    for preset, doc in figs.items():
        if "error" in doc or "error" in doc.get("speed", {}):
            continue
        for profile, rows in doc["speed"]["profiles"].items():
            runs = {k: v for k, v in rows.items() if isinstance(v, dict) and "tok_s" in v}
            groups.append((f"{preset}\n{profile}", runs, profile))
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, (title, runs, profile) in zip(axes[0], groups):
        names = list(runs)
        ax.bar(range(len(names)), [runs[n]["tok_s"] for n in names], color="tab:blue",
               label="measured")
        bounds = [(_bound(runs[n], profile)[0] if n != "llama.cpp" else None) for n in names]
        ax.scatter([i for i, b in enumerate(bounds) if b], [b for b in bounds if b], color="k",
                   marker="_", s=300, label="bound")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("decode tok/s")
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _plot_headline(results, path) -> bool:
    """Quality by budget (bundled model) beside decode speed by runner on the 30B shape (or the
    bundled model's speed by budget when the large shapes have not run)."""
    plt = _plt()
    q = ((results.get("quality") or {}).get("figures"))
    if plt is None or not q:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    _quality_lines(a, q["runners"])
    a.set_title("quality: perplexity / full (bundled model)", fontsize=9)
    a.legend(fontsize=7)
    large = ((results.get("large") or {}).get("figures") or {}).get("qwen3-30b-a3b") or {}
    rows = ((large.get("speed") or {}).get("profiles") or {}).get("rpi5-nvme")
    if rows:
        names = [n for n, r in rows.items() if isinstance(r, dict) and "tok_s" in r]
        exact = [n in EXACT for n in names]
        colors = ["tab:green" if e else "grey" if n == "llama.cpp" else "tab:orange"
                  for n, e in zip(names, exact)]
        b.bar(range(len(names)), [rows[n]["tok_s"] for n in names], color=colors)
        b.set_xticks(range(len(names)))
        b.set_xticklabels([n if e or n == "llama.cpp" else f"{n} (lossy)"
                           for n, e in zip(names, exact)], rotation=30, ha="right", fontsize=7)
        b.set_title(f"Qwen3-30B-A3B shape, Q4_K, {large['limit']} limit, rpi5-nvme: decode tok/s",
                    fontsize=9)
    else:
        b.set_title("(large shapes not run yet)", fontsize=9)
    return _save(plt, fig, path)


def render(results: dict, out_dir: Path) -> str:
    lines = _header(results)
    notes = out_dir / "notes.md"        # circumstances of the runs, written by whoever ran them
    if notes.exists():
        lines += ["## Run notes", "", notes.read_text().strip(), ""]
    if _plot_headline(results, out_dir / "headline.png"):
        lines += ["![headline](results/headline.png)", ""]
    lines += _routing(results, out_dir)
    lines += _quality(results, out_dir)
    lines += _speed(results, out_dir)
    lines += _large(results, out_dir)
    lines += _ablations(results)
    lines += _board(results)
    return "\n".join(lines).rstrip() + "\n"
