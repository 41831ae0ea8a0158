"""`edgemoe serve`: the OpenAI-compatible HTTP server and the web chat (edgemoe.server).

The HTTP stack (starlette, uvicorn) is the optional `server` extra; without it this command
says how to install it and nothing else in edgemoe needs it.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from edgemoe.cli import ranged
from edgemoe.cli_run import _add_model_args, open_model, report_residency
from edgemoe.errors import EdgeMoeError

SERVER_PACKAGES = ("starlette", "uvicorn")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP: OpenAI-compatible API and a web chat",
        description="Serve MODEL over HTTP: /v1/chat/completions and /v1/completions "
        "(streamed as server-sent events or whole), /v1/models, /health, /status, /metrics, "
        "and a web chat at /. One engine runs requests in turn; more than --queue waiting get "
        "429. Needs the server extra: pip install 'edgemoe[server]'.")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=ranged(int, 0, 65535), default=8080,
                   help="port to listen on, 0 = any free one (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("EDGEMOE_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on the API (default: "
                   "$EDGEMOE_API_KEY, else none)")
    p.add_argument("--alias", default=None, metavar="NAME",
                   help="model id clients see (default: the MODEL directory's name)")
    p.add_argument("--parallel", type=ranged(int, 1), default=1, metavar="N",
                   help="sequences generated at once (default and only value for now: 1; "
                   "requests queue and run in turn)")
    p.add_argument("--queue", type=ranged(int, 0), default=16, metavar="N",
                   help="requests that may wait behind the running one; more get 429 "
                   "(default: %(default)s)")
    p.add_argument("--max-tokens", type=ranged(int, 1), default=None, metavar="N",
                   help="the largest max_tokens a request may ask, and the default of chat "
                   "requests (default: the context size)")
    p.add_argument("--max-body", type=ranged(int, 1), default=1 << 20, metavar="BYTES",
                   help="largest request body (default: %(default)s)")
    p.set_defaults(func=cmd_serve)


def missing_server_packages() -> list[str]:
    return [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]


def cmd_serve(args: argparse.Namespace) -> int:
    missing = missing_server_packages()
    if missing:
        raise EdgeMoeError(f"the server needs {', '.join(missing)}: install the server extra "
                           "with pip install 'edgemoe[server]'")
    if args.parallel != 1:
        raise EdgeMoeError(f"--parallel {args.parallel}: the engine generates one sequence at "
                           "a time; requests queue (--queue) and run in turn")
    for name in ("queue", "max_body"):
        if getattr(args, name) < 1:
            raise EdgeMoeError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_tokens is not None and not 1 <= args.max_tokens <= args.ctx_size:
        raise EdgeMoeError(f"--max-tokens must be between 1 and the context size "
                           f"({args.ctx_size}), got {args.max_tokens}")
    from edgemoe.server import ServerConfig, serve

    with open_model(args) as model:
        policy = model.residency.policy_name
        config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                              alias=args.alias or Path(args.shards).resolve().name,
                              max_queue=args.queue, max_tokens=args.max_tokens,
                              max_body_bytes=args.max_body,
                              memory_budget=args.memory_budget, policy=policy)
        try:
            serve(model, config)
        finally:
            report_residency(model, args)
    return 0
