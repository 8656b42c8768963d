"""``edgeserve models ...`` and ``edgeserve status``: clients of the management API.

Where the daemon is: ``--management ADDR``, else ``$EDGESERVE_MANAGEMENT``, else the first
``management.listen`` address of the config (``--config FILE``, else the defaults:
``unix://<run_dir>/management.sock``). A TCP address needs a token: ``--token-file``,
else ``$EDGESERVE_TOKEN_FILE``, else ``management.token_file`` of the config.

Exit codes follow ``cli.py``: 0 success, 1 the daemon refused or failed the operation,
2 usage or archive error, 3 the daemon is not reachable. ``status`` exits 0 healthy,
1 degraded, 3 daemon unreachable (and still prints what the state files say was live).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeserve.errors import EdgeserveError, InvalidArgument, NotFound, PermissionDenied

if TYPE_CHECKING:
    from edgeserve.api.management_client import ManagementClient
    from edgeserve.config import Config

ENV_ADDRESS = "EDGESERVE_MANAGEMENT"
ENV_TOKEN_FILE = "EDGESERVE_TOKEN_FILE"  # noqa: S105 (a variable's name, not a secret)
_SOCKET_NAME = "management.sock"


# -- registration ---------------------------------------------------------------------------


_NAME: tuple[str, dict[str, Any]] = ("name", {})
_VERSION: tuple[str, dict[str, Any]] = ("model_version", {"metavar": "VERSION"})


def _maybe_version(help_text: str) -> tuple[str, dict[str, Any]]:
    return ("model_version", {"nargs": "?", "default": "", "metavar": "VERSION", "help": help_text})


def register_models(commands: Any) -> None:
    from edgeserve.cli import _command

    group = _command(
        commands,
        "models",
        _models_help,
        "List and change the live models of a running daemon (management API).",
        "edgeserve models load /var/lib/edgeserve/incoming/mlp-2.esar --default",
    )
    group.set_defaults(models_parser=group)
    sub = group.add_subparsers(title="model commands", metavar="ACTION")
    actions: list[tuple[str, Callable[[argparse.Namespace], int], str, str, tuple[Any, ...]]] = [
        ("list", _list, "List every live model version.", "models list --json", ()),
        ("describe", _describe, "Show a model's versions, settings and signature.",
         "models describe mlp 2", (_NAME, _maybe_version("default: every live version"))),
        ("load", _load, "Install an archive (from the daemon's archive_dir) and load it.",
         "models load /var/lib/edgeserve/incoming/mlp-2.esar --default", ()),
        ("unload", _unload, "Unload a version (its admitted requests finish first).",
         "models unload mlp 1", (_NAME, _VERSION)),
        ("default", _default, "Make a live version the model's default.",
         "models default mlp 2", (_NAME, _VERSION)),
        ("scale", _scale, "Change instances or batching; the version keeps serving.",
         "models scale mlp 2 --instances 2 --max-batch-size 16",
         (_NAME, _maybe_version("default: the default version"))),
    ]  # fmt: skip
    for name, handler, text, example, positionals in actions:
        parser = _command(sub, name, handler, text, f"edgeserve {example}")
        for dest, options in positionals:
            parser.add_argument(dest, **options)
        if name == "load":
            _load_options(parser)
        if name in ("load", "scale"):
            _settings_options(parser)
        _client_options(parser)


def _load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", nargs="?", help="archive path inside management.archive_dir")
    parser.add_argument(
        "--stored",
        nargs=2,
        metavar=("NAME", "VERSION"),
        help="load a version already in the store instead of an archive",
    )
    parser.add_argument("--default", action="store_true", help="make it the default version")


def register_status(commands: Any) -> None:
    from edgeserve.cli import _command

    parser = _command(
        commands,
        "status",
        _status,
        "Daemon, models, traffic and system at a glance (exit 0 healthy, 1 degraded, "
        "3 daemon unreachable).",
        "edgeserve status --json",
    )
    _client_options(parser, timeout=10.0)


def _client_options(parser: argparse.ArgumentParser, timeout: float = 120.0) -> None:
    parser.add_argument(
        "--management",
        metavar="ADDR",
        help=f"management address, unix:///path or 127.0.0.1:PORT (${ENV_ADDRESS})",
    )
    parser.add_argument("--config", type=Path, help="YAML config of the daemon (finds run_dir)")
    parser.add_argument("--token-file", type=Path, help=f"token for TCP (${ENV_TOKEN_FILE})")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per call")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _settings_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instances", type=int, metavar="N", help="execution threads")
    parser.add_argument("--max-batch-size", type=int, metavar="B")
    parser.add_argument(
        "--max-queue-delay-ms",
        "--max-queue-delay",
        type=float,
        metavar="MS",
        dest="max_queue_delay_ms",
    )
    parser.add_argument("--max-queue-size", type=int, metavar="N")


def _models_help(args: argparse.Namespace) -> int:
    from edgeserve.cli import EXIT_USAGE

    args.models_parser.print_help()
    return EXIT_USAGE


# -- finding the daemon ---------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    from edgeserve.config import load_config

    return load_config(args.config)


def management_target(args: argparse.Namespace) -> tuple[str, str | None]:
    """The gRPC target and, for TCP, the token."""
    from edgeserve.config import DEFAULT_RUN_DIR, grpc_address, parse_listen_address

    config: Config | None = None
    raw = args.management or os.environ.get(ENV_ADDRESS, "").split(",")[0].strip()
    if not raw:
        config = _config(args)
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
        token_file = (config or _config(args)).management.token_file
    if token_file is None:
        raise InvalidArgument(f"{raw} is TCP: give --token-file (or ${ENV_TOKEN_FILE})")
    return target, Path(token_file).read_text().strip()


def _client(args: argparse.Namespace) -> ManagementClient:
    from edgeserve.api.management_client import ManagementClient

    target, token = management_target(args)
    return ManagementClient(target, token=token, timeout=args.timeout)


def _call(args: argparse.Namespace, action: Callable[[ManagementClient], Any]) -> Any:
    """Run one client action; map a failed call to the CLI's error family."""
    from edgeserve.api.management_client import CallFailed

    client = _client(args)
    try:
        return action(client)
    except CallFailed as exc:
        raise _translate(exc, client.address) from None
    finally:
        client.close()


def _translate(exc: Any, address: str) -> Exception:
    name = exc.code.name
    if name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        if "Permission denied" in exc.message:
            return PermissionDenied(
                f"no permission to connect to {address} (is your user in the daemon's "
                "management.allowed_group?)"
            )
        return ConnectionError(f"daemon not reachable at {address}: {exc.message}")
    if name == "INVALID_ARGUMENT":
        return InvalidArgument(exc.message)
    if name == "NOT_FOUND":
        return NotFound(exc.message)
    return EdgeserveError(f"{name}: {exc.message}")


# -- models ---------------------------------------------------------------------------------


def _print(args: argparse.Namespace, data: Any, text: str) -> int:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)
    return 0


def _list(args: argparse.Namespace) -> int:
    models = _call(args, lambda c: c.list_models())
    return _print(args, models, _models_table(models))


def _describe(args: argparse.Namespace) -> int:
    data = _call(args, lambda c: c.describe(args.name, args.model_version))
    lines = [f"{data['name']} (default version {data['default_version'] or '-'})"]
    for v in data["versions"]:
        lines.append(f"  version {v['version']}: {v['state']} on {v['device']}")
        lines += [f"    {k}: {val}" for k, val in sorted(v["settings"].items())]
        for key in ("inputs", "outputs"):
            for t in v.get(key, []):
                lines.append(f"    {key[:-1]} {t['name']}: {t['datatype']} {t['shape']}")
    return _print(args, data, "\n".join(lines))


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("instances", "max_batch_size", "max_queue_delay_ms", "max_queue_size")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _load(args: argparse.Namespace) -> int:
    from edgeserve.cli import UsageError

    if bool(args.archive) == bool(args.stored):
        raise UsageError("models load: give ARCHIVE or --stored NAME VERSION")
    archive: str | None = args.archive
    if archive and Path(archive).exists():  # else: a name inside the daemon's archive_dir
        archive = str(Path(archive).absolute())
    stored = tuple(args.stored) if args.stored else None
    model = _call(
        args,
        lambda c: c.load(
            archive=archive, stored=stored, make_default=args.default, settings=_settings(args)
        ),
    )
    flag = " (default)" if model["default"] else ""
    text = f"loaded {model['name']} version {model['version']} on {model['device']}{flag}"
    return _print(args, model, text)


def _unload(args: argparse.Namespace) -> int:
    data = _call(args, lambda c: c.unload(args.name, args.model_version))
    text = f"unloaded {args.name} version {args.model_version}; default: "
    return _print(args, data, text + (data["default_version"] or "none (no version left)"))


def _default(args: argparse.Namespace) -> int:
    data = _call(args, lambda c: c.set_default(args.name, args.model_version))
    text = f"{args.name}: default version {data['version']} (was {data['previous_default']})"
    return _print(args, data, text)


def _scale(args: argparse.Namespace) -> int:
    from edgeserve.cli import UsageError

    settings = _settings(args)
    if not settings:
        raise UsageError("models scale: give --instances, --max-batch-size, ... to change")
    m = _call(args, lambda c: c.scale(args.name, args.model_version, settings))
    s = m["settings"]
    text = (
        f"{m['name']} version {m['version']}: {m['instances']} instance(s), max batch "
        f"{s['max_batch_size']}, max delay {s['max_queue_delay_ms']} ms, "
        f"queue {s['max_queue_size']}"
    )
    return _print(args, m, text)


def _models_table(models: Sequence[dict[str, Any]]) -> str:
    if not models:
        return "no models live"
    rows = [
        (
            "NAME",
            "VERSION",
            "DEFAULT",
            "STATE",
            "INSTANCES",
            "DEVICE",
            "MAX_BATCH",
            "DELAY_MS",
            "IN_FLIGHT",
        )
    ]
    for m in models:
        s = m["settings"]
        rows.append(
            (
                m["name"],
                m["version"],
                "*" if m["default"] else "",
                m["state"],
                str(m["instances"]),
                m["device"],
                str(s["max_batch_size"]),
                f"{s['max_queue_delay_ms']:g}",
                str(m["in_flight"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


# -- status ---------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    from edgeserve import status

    target, _ = management_target(args)
    try:
        document = _call(args, lambda c: c.status())
    except ConnectionError as exc:
        document = offline_status(args, target, str(exc))
    print(status.render_json(document) if args.json else status.render_table(document))
    return status.exit_code(document)


def offline_status(args: argparse.Namespace, address: str, reason: str) -> dict[str, Any]:
    """The document for a daemon that is down: the persisted live set, the machine."""
    from edgeserve import status
    from edgeserve.store import ModelStore
    from edgeserve.telemetry.sampler import sample

    config = _config(args)
    state_dir = Path(config.state_dir)
    notes = [reason]
    entries: list[Any] = []
    store = ModelStore(state_dir / "models", None, live_state_path=state_dir / "live.json")
    try:
        entries = store.read_live_state()
    except EdgeserveError as exc:
        notes.append(str(exc))
    system = sample(state_dir)
    system["process"] = None  # this CLI process, not the daemon: nothing to report
    return status.build_status(
        daemon=status.DaemonFacts(up=False, address=address),
        models=status.offline_models(entries),
        system=system,
        notes=notes,
    )
