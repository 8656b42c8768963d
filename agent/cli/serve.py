"""``edgeserve serve``: run the daemon in the foreground (systemd runs this)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgeserve.cli.common import add_command


def register(commands: Any) -> None:
    sub = add_command(
        commands,
        "serve",
        "Run the daemon (foreground; systemd runs this).",
        "edgeserve serve --config /etc/edgeserve/config.yaml",
    )
    sub.add_argument("--config", type=Path, help="YAML config file")
    sub.add_argument("--state-dir", type=Path, help="model store and state (state_dir)")
    sub.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="inference address, unix:///path or 127.0.0.1:PORT (repeatable; server.listen)",
    )
    sub.add_argument(
        "--model",
        action="append",
        type=Path,
        metavar="ARCHIVE",
        help="install and load this archive (repeatable)",
    )
    sub.add_argument("--device", help="auto | cpu | cuda | cuda:N (runtime.device)")
    sub.add_argument("--log-level", help="debug | info | warning | error (logging.level)")
    sub.add_argument(
        "--management",
        metavar="ADDR",
        help="management address, unix:///path or 127.0.0.1:PORT (management.listen)",
    )


def run(args: argparse.Namespace) -> int:
    import asyncio

    from edgeserve.config import Config, load_config
    from edgeserve.daemon import Daemon
    from edgeserve.logs import setup_logging

    overrides: dict[str, Any] = {}
    if args.state_dir:
        overrides["state_dir"] = str(args.state_dir)
    if args.listen:
        overrides["server.listen"] = list(args.listen)
    if args.device:
        overrides["runtime.device"] = args.device
    if args.log_level:
        overrides["logging.level"] = args.log_level
    if args.management:
        overrides["management.listen"] = [args.management]
    if args.model:
        overrides["models+"] = [{"archive": str(p), "default": True} for p in args.model]
    config = load_config(args.config, overrides=overrides)
    setup_logging(config.logging.level, config.logging.format)

    def reload_config() -> Config:  # SIGHUP: the same file, flags and environment
        return load_config(args.config, overrides=overrides)

    return asyncio.run(Daemon(config, reload_config=reload_config).run())
