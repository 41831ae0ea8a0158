"""`edgemoe` command line: one subcommand per verb, each defined next to the code it drives.

Every command module exposes `register(subparsers)`, which adds its parser and sets
`func` to a callable taking the parsed namespace and returning an exit code.
Modules are imported only when needed so `edgemoe --help` stays fast on a small board.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from edgemoe.errors import EdgeMoeError

def ranged(kind: type, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False):
    """An argparse `type`: a finite number of `kind` (int or float) within [lo, hi] (lo
    excluded with lo_open); anything else is refused with the allowed range."""
    if lo is not None and hi is not None:
        allowed = f"{lo}..{hi}"
    elif lo is not None:
        allowed = f"{'>' if lo_open else '>='} {lo}"
    else:
        allowed = f"<= {hi}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        ok = value == value and abs(value) != float("inf")
        ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
        ok = ok and (hi is None or value <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"{text} is out of range (allowed: {allowed})")
        return value

    parse.__name__ = kind.__name__
    return parse


def version_text() -> str:
    """`edgemoe --version`: this package and the llama.cpp build it drives."""
    from importlib import metadata

    from edgemoe import __version__, _lib

    try:
        llama = f"llama-cpp-python {metadata.version('llama_cpp_python')}"
    except metadata.PackageNotFoundError:
        llama = "llama.cpp"
    try:
        where = str(_lib.lib_dir())
    except EdgeMoeError as exc:
        where = f"not found: {exc}"
    return f"edgemoe {__version__} (llama.cpp from {llama}; libraries in {where})"


# (module, what it registers). Order is the order shown in --help.
COMMAND_MODULES = [
    "converters.cli",      # convert, export, verify
    "edgemoe.cli_run",     # run, chat, info
    "edgemoe.cli_budget",  # plan, calibrate
    "edgemoe.cli_perplexity",  # perplexity
    "edgemoe.cli_serve",   # serve
    "edgemoe.cli_devices", # devices
]


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line (what was wrong, where to look), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edgemoe",
        description="Convert Mixture-of-Experts checkpoints into per-expert GGUF shards and run "
        "them under a memory budget.",
    )
    parser.add_argument("--version", action="store_true",
                        help="print the version and the llama.cpp build it uses, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
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


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"edgemoe: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EdgeMoeError as exc:
        # one line whatever the message quotes from a file (control characters escaped)
        line = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(exc))
        print(f"edgemoe {args.command}: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edgemoe {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`edgemoe info ... | head`): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
