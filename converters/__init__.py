"""Convert Mixture-of-Experts checkpoints into edgemoe shard sets, and back into one GGUF.

    convert(src, out)   HF safetensors directory or stock llama.cpp GGUF -> shard set (docs/FORMAT.md)
    export(shards, gguf) shard set -> one stock GGUF with fused ffn_*_exps tensors
"""
from __future__ import annotations

from pathlib import Path


def make_plan(src: str | Path, expert_type: str = "Q4_K", dense_type: str = "Q8_0",
              substitute_type: str | None = None):
    """The conversion plan for `src` (validated, nothing written)."""
    src = Path(src)
    if src.is_file() or src.suffix == ".gguf":
        from converters.gguf_source import plan_gguf

        if substitute_type:
            from edgemoe.errors import ConvertError

            raise ConvertError(f"{src}: --substitute-type needs a safetensors checkpoint (a GGUF "
                               "source's experts are sliced, not requantized)")
        return plan_gguf(src)
    from converters.plan import plan_hf

    return plan_hf(src, expert_type, dense_type, substitute_type)


def convert(src: str | Path, out: str | Path, expert_type: str = "Q4_K",
            dense_type: str = "Q8_0", dry_run: bool = False, resume: bool = False,
            force: bool = False, progress: bool = True, substitute_type: str | None = None):
    """Convert `src` into a shard set in `out`; returns the Plan. With dry_run, writes nothing.

    A GGUF source keeps its tensors' types (experts are sliced, not requantized), so
    expert_type and dense_type apply to safetensors sources only. substitute_type: also write
    every expert at this (low-bit) type, the runtime's substitute tier (safetensors only)."""
    from edgemoe.errors import ConvertError

    if not Path(src).exists():
        raise ConvertError(f"{src}: no such file or directory")
    the_plan = make_plan(src, expert_type, dense_type, substitute_type)
    if not dry_run:
        from converters.writer import write_shard_set

        write_shard_set(the_plan, Path(out), resume=resume, force=force, progress=progress)
        _save_expert_norms(Path(out), overwrite=force)
    return the_plan


def _save_expert_norms(out: Path, overwrite: bool) -> None:
    """||E_i|| of every expert into calibration.json, which swap and static need: computed here
    (streamed with O_DIRECT, a block of rows at a time) so that the first budgeted run does not
    read every expert. The norms follow the shards as written; what `edgemoe calibrate` stored
    besides them is kept when a conversion is resumed (not when it is overwritten)."""
    import dataclasses

    from edgemoe.errors import ShardSetError
    from edgemoe.pool import read_span
    from edgemoe.residency.calibration import FILE_NAME, Calibration, compute_norms
    from edgemoe.shardset import ShardSet

    norms = compute_norms(ShardSet.open(out), read_span)
    cal = Calibration(norms=norms)
    if (out / FILE_NAME).exists() and not overwrite:
        try:
            cal = dataclasses.replace(Calibration.load(out), norms=norms)
        except ShardSetError:
            pass   # unreadable: replaced
    cal.save(out)


def export(shards: str | Path, out_gguf: str | Path, progress: bool = False) -> Path:
    """Reassemble a shard set into one GGUF that unmodified llama.cpp loads."""
    from converters.exporter import export_gguf

    return export_gguf(Path(shards), Path(out_gguf), progress=progress)
