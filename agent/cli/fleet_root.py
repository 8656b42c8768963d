"""``edgeserve fleet root init|rotate``: write the fleet's trust root and its rotations.

A root is a signed envelope (``fleet/canonical.py``) written as its exact canonical
bytes, so the file is what gets installed on devices (``fleet.root``) and published.

- ``init`` writes version 1. A device trusts v1 because it was installed there, so v1
  needs no signatures; with ``--sign-key`` it is signed too, and then those signatures
  must meet its own threshold (checked before writing).
- ``rotate`` writes version N+1 of ``--root``, signed by every ``--sign-key``; it runs the
  device's own check (a threshold of the old keys and of the new ones) on the result and
  writes nothing when that would refuse it. With ``--broker`` it then publishes the file
  retained on ``P/root/<N+1>`` and ``P/root`` (devices walk ``P/root/<version>`` forward
  one version at a time, ``fleet/roots.py``); exit 3 when the broker is not reachable.

Neither overwrites an existing file. Exit codes: 0 written, 2 usage, unreadable or bad
key/root files, or a rotation the devices would refuse.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeserve.archive.signing import load_private_key, load_public_key
from edgeserve.cli.common import add_command
from edgeserve.cli.exits import UsageError
from edgeserve.errors import DocumentRefused
from edgeserve.fleet.canonical import MAX_DOCUMENT_BYTES
from edgeserve.fleet.documents import Root, format_time, parse_root, parse_time
from edgeserve.fleet.verifier import (
    key_id_of,
    public_key_text,
    sign,
    to_bytes,
    verify_root_rotation,
    verify_self_signed_root,
)

if TYPE_CHECKING:
    from edgeserve.fleet.link import FleetLink

DEFAULT_EXPIRES = "365d"
_AGE = re.compile(r"(\d{1,6})([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_expires(text: str, now: datetime, option: str = "--expires") -> datetime:
    """``30d``, ``12h``, ``90m``, ``45s`` from ``now``, or an absolute ``2027-01-01T00:00:00Z``;
    to the second, and in the future."""
    match = _AGE.fullmatch(text.strip())
    if match:
        moment = now + timedelta(seconds=int(match[1]) * _UNIT_S[match[2]])
    else:
        try:
            moment = parse_time(text.strip(), option)
        except DocumentRefused:
            raise UsageError(
                f"{option}: expected an age such as 365d or 12h, or a time such as "
                f"2027-01-01T00:00:00Z, got {text!r}"
            ) from None
    moment = moment.replace(microsecond=0)
    if moment <= now:
        raise UsageError(f"{option}: {format_time(moment)} is not in the future")
    return moment


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key",
        action="append",
        required=True,
        metavar="FILE.pub",
        help="a public key of this root version (from edgeserve keygen; repeatable)",
    )
    parser.add_argument(
        "--threshold",
        type=int,
        required=True,
        metavar="K",
        help="how many of the keys must sign a document",
    )
    parser.add_argument(
        "--expires",
        default=DEFAULT_EXPIRES,
        metavar="AGE|TIME",
        help=f"365d, 12h, or 2027-01-01T00:00:00Z (default {DEFAULT_EXPIRES})",
    )
    parser.add_argument(
        "-o", "--out", required=True, type=Path, metavar="FILE", help="where to write the root"
    )


def _init_options(parser: argparse.ArgumentParser) -> None:
    _common_options(parser)
    parser.add_argument(
        "--sign-key",
        action="append",
        default=[],
        metavar="FILE.key",
        help="also sign v1 with this private key of the root (repeatable; optional)",
    )


def _rotate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root", required=True, type=Path, metavar="FILE", help="the current root (version N)"
    )
    _common_options(parser)
    parser.add_argument(
        "--sign-key",
        action="append",
        required=True,
        metavar="FILE.key",
        help="a private key of version N or N+1 (repeatable; both thresholds must be met)",
    )
    from edgeserve.cli.fleet import broker_options  # noqa: PLC0415 - cli/fleet imports us

    broker_options(parser, required=False)


def _init(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    signed = _root_signed(args, 1, now)
    keys = [load_private_key(Path(p)) for p in args.sign_key]
    _check_signers(args.sign_key, [key_id_of(k) for k in keys], set(signed["keys"]), "the root")
    data = to_bytes(sign(signed, keys))
    if keys:
        verify_self_signed_root(data)
    return _write(args.out, data, Root.from_signed(signed), len(keys))


def _rotate(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    current = parse_root(_read(args.root))
    signed = _root_signed(args, current.version + 1, now)
    keys = [load_private_key(Path(p)) for p in args.sign_key]
    known = set(signed["keys"]) | set(current.keys)
    _check_signers(args.sign_key, [key_id_of(k) for k in keys], known, "the old or the new root")
    data = to_bytes(sign(signed, keys))
    try:
        new = verify_root_rotation(current, data, trusted_time=now)
    except DocumentRefused as exc:
        raise UsageError(f"devices would refuse this rotation: {exc}") from None
    if args.broker is not None:
        from edgeserve.cli.fleet import parse_broker_url  # noqa: PLC0415 - as above

        parse_broker_url(args.broker)  # a usage error before anything is written
    written = _write(args.out, data, new, len(keys))
    if args.broker is not None:
        _publish(args, data, new.version)
    return written


def _publish(args: argparse.Namespace, data: bytes, version: int) -> None:
    from edgeserve.cli.fleet_control import with_link  # noqa: PLC0415 - it imports us

    topics = [f"{args.topic_prefix}/root/{version}", f"{args.topic_prefix}/root"]

    async def publish(link: FleetLink) -> None:
        for topic in topics:
            await link.publish(topic, data, qos=1, retain=True)

    asyncio.run(with_link(args, "root-rotate", publish))
    print(f"published root v{version} on {' and '.join(topics)}")


def _root_signed(args: argparse.Namespace, version: int, now: datetime) -> dict[str, Any]:
    keys = {}
    for path in args.key:
        public = load_public_key(Path(path))
        keys[key_id_of(public)] = public_key_text(public)
    if not 1 <= args.threshold <= len(keys):
        raise UsageError(
            f"--threshold: must be 1..{len(keys)} (the number of distinct --key), "
            f"got {args.threshold}"
        )
    return {
        "type": "root",
        "version": version,
        "keys": keys,
        "threshold": args.threshold,
        "expires": format_time(parse_expires(args.expires, now)),
    }


def _check_signers(paths: list[str], keyids: list[str], known: set[str], what: str) -> None:
    for path, keyid in zip(paths, keyids, strict=True):
        if keyid not in known:
            raise UsageError(f"--sign-key {path}: not a key of {what} (keyid {keyid[:16]})")


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as src:
            return src.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"--root: cannot read {path}: {exc.strerror}") from None


def _write(path: Path, data: bytes, root: Root, signatures: int) -> int:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise UsageError(f"--out: {path} exists; refusing to overwrite a root") from None
    except OSError as exc:
        raise UsageError(f"--out: cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise UsageError(f"--out: cannot write {path}: {exc.strerror}") from None
    print(
        f"wrote {path}: root v{root.version}, {len(root.keys)} key(s), threshold "
        f"{root.threshold}, expires {format_time(root.expires)}, {signatures} signature(s)",
        file=sys.stdout,
    )
    return 0


Run = Callable[[argparse.Namespace], int]
ACTIONS: dict[str, tuple[Run, str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "init": (
        _init,
        "Write version 1 of the fleet's trust root (install it on devices as fleet.root).",
        "edgeserve fleet root init --key a.pub --key b.pub --threshold 2 -o root.json",
        _init_options,
    ),
    "rotate": (
        _rotate,
        "Write the next root version, signed by a threshold of the old and of the new keys.",
        "edgeserve fleet root rotate --root root.json --key b.pub --key c.pub --threshold 2 "
        "--sign-key a.key --sign-key b.key --sign-key c.key -o root-2.json",
        _rotate_options,
    ),
}


def root_options(parser: argparse.ArgumentParser) -> None:
    """``fleet root``'s own actions (its parser already carries the fleet epilog)."""
    actions = parser.add_subparsers(
        title="root commands", metavar="ACTION", dest="root_command", required=True
    )
    for name, (_, text, example, options) in ACTIONS.items():
        sub = add_command(actions, name, text, example)
        sub.epilog = parser.epilog
        options(sub)


def run_root(args: argparse.Namespace) -> int:
    return ACTIONS[args.root_command][0](args)
