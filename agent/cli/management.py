"""Reaching a running daemon's management API: where it is, its token, and its errors.

Where the daemon is: ``--management ADDR``, else ``$EDGESERVE_MANAGEMENT``, else the first
``management.listen`` address of the config (``--config FILE``, else the defaults:
``unix://<run_dir>/management.sock``). A TCP address needs a token: ``--token-file``,
else ``$EDGESERVE_TOKEN_FILE``, else ``management.token_file`` of the config. A failed
call becomes the CLI's error family (``exits`` picks the exit code).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeserve.cli.exits import DaemonUnreachable
from edgeserve.errors import EdgeserveError, InvalidArgument, NotFound, PermissionDenied

if TYPE_CHECKING:
    from edgeserve.api.client import ClientError
    from edgeserve.api.management_client import ManagementClient
    from edgeserve.config import Config

ENV_ADDRESS = "EDGESERVE_MANAGEMENT"
ENV_TOKEN_FILE = "EDGESERVE_TOKEN_FILE"  # noqa: S105 (a variable's name, not a secret)
_SOCKET_NAME = "management.sock"


def client_options(parser: argparse.ArgumentParser, timeout: float = 120.0) -> None:
    parser.add_argument(
        "--management",
        metavar="ADDR",
        help=f"management address, unix:///path or 127.0.0.1:PORT (${ENV_ADDRESS})",
    )
    parser.add_argument("--config", type=Path, help="YAML config of the daemon (finds run_dir)")
    parser.add_argument("--token-file", type=Path, help=f"token for TCP (${ENV_TOKEN_FILE})")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per call")
    parser.add_argument("--json", action="store_true", help="print JSON")


def daemon_config(args: argparse.Namespace) -> Config:
    """The daemon's config as ``--config`` (or the defaults) says."""
    from edgeserve.config import load_config

    return load_config(args.config)


def management_target(args: argparse.Namespace) -> tuple[str, str | None]:
    """The gRPC target and, for TCP, the token."""
    from edgeserve.config import DEFAULT_RUN_DIR, grpc_address, parse_listen_address

    config: Config | None = None
    raw = args.management or os.environ.get(ENV_ADDRESS, "").split(",")[0].strip()
    if not raw:
        config = daemon_config(args)
        listen = config.management.listen
        raw = next((a for a in listen if a.startswith("unix:")), listen[0])
        parsed = parse_listen_address(raw, "management.listen")
        fallback = DEFAULT_RUN_DIR / _SOCKET_NAME
        if parsed[0] == "unix" and not os.path.exists(parsed[1]) and fallback.exists():
            raw = f"unix://{fallback}"  # a non-root client guesses another run_dir
    target = grpc_address(raw)
    if parse_listen_address(raw, "--management")[0] == "unix":
        return target, None
    token_file = args.token_file or os.environ.get(ENV_TOKEN_FILE)
    if token_file is None:
        token_file = (config or daemon_config(args)).management.token_file
    if token_file is None:
        raise InvalidArgument(f"{raw} is TCP: give --token-file (or ${ENV_TOKEN_FILE})")
    return target, Path(token_file).read_text().strip()


def _client(args: argparse.Namespace) -> ManagementClient:
    from edgeserve.api.management_client import ManagementClient

    target, token = management_target(args)
    return ManagementClient(target, token=token, timeout=args.timeout)


def call(args: argparse.Namespace, action: Callable[[ManagementClient], Any]) -> Any:
    """Run one client action; map a failed call to the CLI's error family."""
    from edgeserve.api.client import ClientError

    client = _client(args)
    try:
        return action(client)
    except ClientError as exc:
        raise _translate(exc, client.address) from None
    finally:
        client.close()


def _translate(exc: ClientError, address: str) -> Exception:
    name = exc.code.name
    if name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        if "Permission denied" in exc.message:
            return PermissionDenied(
                f"no permission to connect to {address} (is your user in the daemon's "
                "management.allowed_group?)"
            )
        return DaemonUnreachable(f"daemon not reachable at {address}: {exc.message}")
    if name == "INVALID_ARGUMENT":
        return InvalidArgument(exc.message)
    if name == "NOT_FOUND":
        return NotFound(exc.message)
    return EdgeserveError(f"{name}: {exc.message}")
