"""Pieces every command module shares: how a subcommand's parser is made, and ``[NAME=]FILE``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgeserve.cli.exits import EPILOG


def add_command(commands: Any, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with its help text, an example and the exit codes.

    Dispatch never rides on the namespace (no ``set_defaults``): the chosen command is
    ``args.command`` (and ``args.action`` below ``models``), looked up in a table.
    """
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help_text,
        description=f"{help_text}\n\nexample:\n  {example}",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def named_paths(values: list[str]) -> list[Path | tuple[str, Path]]:
    """``[NAME=]FILE`` arguments: a bare path, or (name, path)."""
    out: list[Path | tuple[str, Path]] = []
    for value in values:
        name, sep, path = value.partition("=")
        out.append((name, Path(path)) if sep else Path(value))
    return out
