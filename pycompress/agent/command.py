"""``pycompress agent`` / ``python -m pycompress.agent``: start the measuring agent on a device."""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from pycompress.agent.protocol import DEFAULT_PORT, ENV_TOKEN
from pycompress.agent.server import LOOPBACK, AgentSettings, log, serve
from pycompress.errors import PycompressError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"TCP port to listen on (default {DEFAULT_PORT}; 0: any free port, printed)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for the network)")
    p.add_argument("--token", default=None,
                   help=f"shared secret the host must send (default: ${ENV_TOKEN}; without either a random one "
                        "is generated and printed)")
    p.add_argument("--max-model-mb", type=float, default=512, help="largest model accepted, MiB (default 512)")
    p.add_argument("--max-data-mb", type=float, default=256,
                   help="largest input arrays of one request, MiB (default 256)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a read may wait mid-request (default 30)")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port < 65536:
        raise PycompressError(f"--port {args.port}: must be in 0..65535")
    if args.max_model_mb <= 0 or args.max_data_mb <= 0 or args.timeout <= 0:
        raise PycompressError("--max-model-mb, --max-data-mb and --timeout must be positive")
    token = args.token or os.environ.get(ENV_TOKEN)
    if not token:
        token = secrets.token_urlsafe(24)
        log(f"token (give it to the host as {ENV_TOKEN}): {token}")
    if args.host not in LOOPBACK:
        log(f"listening beyond this machine on {args.host}: only hosts with the token are served; "
            "the traffic is not encrypted (see docs/devices.md)")
    settings = AgentSettings(token=token, max_model_bytes=int(args.max_model_mb * (1 << 20)),
                             max_data_bytes=int(args.max_data_mb * (1 << 20)), timeout=args.timeout)
    try:
        serve(args.host, args.port, settings, announce=log)
    except OSError as exc:
        raise PycompressError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        log("pycompress agent: stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pycompress.agent",
                                     description="pycompress measuring agent: times ONNX models on this device "
                                                 "for a pycompress host (docs/devices.md)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except PycompressError as exc:
        print(f"pycompress agent: error: {exc}", file=sys.stderr)
        return 2
