"""The ``edgeserve`` command: parse, dispatch through one table, map errors to exit codes.

Each command is a module with ``register(commands)`` (its parser) and ``run(args)`` (a
thin call into the library). The chosen command is ``args.command``; no option shares a
namespace key with the dispatch. Exit codes live in ``exits``; no error path prints a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from edgeserve import __version__
from edgeserve.cli import demo, fleet, keygen, models, package, predict, serve, status
from edgeserve.cli.exits import EPILOG, ExitCode, describe, exit_code_for

COMMANDS: dict[str, ModuleType] = {
    "serve": serve,
    "package": package,
    "keygen": keygen,
    "predict": predict,
    "demo": demo,
    "models": models,
    "status": status,
    "fleet": fleet,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (argparse's own exits included)."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # here, not at interpreter exit, where it could not be caught
        return code
    except BrokenPipeError:  # the reader went away (`edgeserve models list | head -1`)
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse printed
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    try:
        return int(COMMANDS[args.command].run(args))
    except BrokenPipeError:
        raise
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the CLI's one boundary
        code = exit_code_for(exc)
        if code is not ExitCode.INTERRUPTED:
            print(f"edgeserve: error: {describe(exc)}", file=sys.stderr)
        return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeserve",
        description="Inference agent for edge devices: TorchScript models over KServe v2 gRPC.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgeserve {__version__}")
    commands = parser.add_subparsers(
        title="commands", metavar="COMMAND", dest="command", required=True
    )
    for module in COMMANDS.values():
        module.register(commands)
    return parser
