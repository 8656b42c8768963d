"""``edgeserve keygen``: an Ed25519 key pair for signing archives."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgeserve.cli.common import add_command
from edgeserve.cli.exits import ExitCode, UsageError


def register(commands: Any) -> None:
    sub = add_command(
        commands,
        "keygen",
        "Create an Ed25519 key pair for signing archives.",
        "edgeserve keygen --out /etc/edgeserve/keys/release",
    )
    sub.add_argument(
        "--out",
        type=Path,
        required=True,
        help="path prefix: writes PREFIX.key (0600) and PREFIX.pub",
    )


def run(args: argparse.Namespace) -> int:
    from edgeserve.archive.signing import generate_key

    private, public = Path(f"{args.out}.key"), Path(f"{args.out}.pub")
    try:
        generate_key(private, public)
    except OSError as exc:  # the prefix's folder is missing or not writable
        raise UsageError(f"keygen: cannot write {exc.filename}: {exc.strerror}") from None
    print(f"wrote {private} (keep secret) and {public} (add to trust.keys)")
    return ExitCode.OK
