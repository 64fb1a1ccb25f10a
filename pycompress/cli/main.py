"""pycompress command line: one module per subcommand, wired here.

Each subcommand module defines ``add_parser(subparsers)`` (which sets
``func``) and a ``run(args) -> int``. Errors a user can fix are
``PycompressError``: printed on one line, exit code 2. Anything else is a bug:
one line too, with the traceback under ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from pycompress import __version__
from pycompress.errors import PycompressError

# The one list of subcommands (module names under pycompress.cli).
SUBCOMMANDS = ["convert", "info", "plan", "apply", "analyze", "compress", "demo", "export", "unpack", "bench", "agent"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pycompress",
        description="Compress ONNX models for deployment: decide per layer (PAC-BO, PFA), rewrite the graph, measure.",
    )
    parser.add_argument("--version", action="version", version=f"pycompress {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"pycompress.cli.{name}").add_parser(sub)
    return parser




def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except PycompressError as exc:
        if debug:
            traceback.print_exc()
        print(f"pycompress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pycompress: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse's own usage errors (exit code 2)
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    except OSError as exc:  # a file the user named: unreadable, a folder, a full disk, ...
        if debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pycompress: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("pycompress: error: out of memory (the input is too large for this machine)", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"pycompress: internal error: {type(exc).__name__}: {message} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
