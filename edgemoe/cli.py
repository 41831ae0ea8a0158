"""`edgemoe` command line: one subcommand per verb, each defined next to the code it drives.

Every command module exposes `register(subparsers)`, which adds its parser and sets
`func` to a callable taking the parsed namespace and returning an exit code.
Modules are imported only when needed so `edgemoe --help` stays fast on a small board.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from edgemoe.errors import EdgeMoeError

# (module, what it registers). Order is the order shown in --help.
COMMAND_MODULES = [
    "converters.cli",      # convert, export, verify
    "edgemoe.cli_run",     # run, chat, info
    "edgemoe.cli_budget",  # plan, calibrate
    "edgemoe.cli_perplexity",  # perplexity
    "edgemoe.cli_serve",   # serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgemoe",
        description="Convert Mixture-of-Experts checkpoints into per-expert GGUF shards and run "
        "them under a memory budget.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A module of ours that is not written yet; anything else missing is a real error.
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EdgeMoeError as exc:
        print(f"edgemoe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edgemoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
