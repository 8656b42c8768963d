"""``edgeserve models ...``: list and change the live models of a running daemon.

Each action is a function in ``ACTIONS`` (chosen by ``args.action``); each is one call of
the management API (``management``). Exit codes: 0 success, 1 the daemon refused or
failed the operation, 2 usage or archive error, 3 the daemon is not reachable.

``models load ARCHIVE``: an ARCHIVE with a ``/`` in it (``./mlp-2.esar``,
``/tmp/mlp-2.esar``) is a file here, which the CLI reads and streams to the daemon
(UploadModel); a bare name (``mlp-2.esar``) is a file in the daemon's
``management.archive_dir`` (LoadModel). The daemon verifies both the same way.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeserve.cli.common import add_command
from edgeserve.cli.exits import UsageError
from edgeserve.cli.management import call, client_options
from edgeserve.errors import NotFound

_NAME: tuple[str, dict[str, Any]] = ("name", {})
_VERSION: tuple[str, dict[str, Any]] = ("model_version", {"metavar": "VERSION"})


def _maybe_version(help_text: str) -> tuple[str, dict[str, Any]]:
    return ("model_version", {"nargs": "?", "default": "", "metavar": "VERSION", "help": help_text})


def register(commands: Any) -> None:
    group = add_command(
        commands,
        "models",
        "List and change the live models of a running daemon (management API).",
        "edgeserve models load ./mlp-2.esar --default",
    )
    actions = group.add_subparsers(
        title="model commands", metavar="ACTION", dest="action", required=True
    )
    for name, (_, text, example, positionals) in ACTIONS.items():
        parser = add_command(actions, name, text, f"edgeserve {example}")
        for dest, options in positionals:
            parser.add_argument(dest, **options)
        if name == "load":
            _load_options(parser)
        if name in ("load", "scale"):
            _settings_options(parser)
        client_options(parser)


def run(args: argparse.Namespace) -> int:
    action = ACTIONS[args.action][0]
    return action(args)


def _load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "archive",
        nargs="?",
        help="a path with a / (./mlp-2.esar, /tmp/mlp-2.esar): this file, uploaded to the "
        "daemon; a bare name (mlp-2.esar): that file in the daemon's management.archive_dir",
    )
    parser.add_argument(
        "--stored",
        nargs=2,
        metavar=("NAME", "VERSION"),
        help="load a version already in the store instead of an archive",
    )
    parser.add_argument("--default", action="store_true", help="make it the default version")


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


def _print(args: argparse.Namespace, data: Any, text: str) -> int:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)
    return 0


def _list(args: argparse.Namespace) -> int:
    models = call(args, lambda c: c.list_models())
    return _print(args, models, _models_table(models))


def _describe(args: argparse.Namespace) -> int:
    data = call(args, lambda c: c.describe(args.name, args.model_version))
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


def is_local_path(archive: str) -> bool:
    """Whether ``models load ARCHIVE`` uploads a file here (a path: it has a ``/``) or
    names one in the daemon's archive_dir (a bare name). A URL is neither: the daemon
    refuses it, and says why."""
    return "/" in archive and "://" not in archive


def _load(args: argparse.Namespace) -> int:
    if bool(args.archive) == bool(args.stored):
        raise UsageError("models load: give ARCHIVE or --stored NAME VERSION")
    archive: str | None = args.archive
    options: dict[str, Any] = {"make_default": args.default, "settings": _settings(args)}
    if archive and is_local_path(archive):
        model = call(args, lambda c: c.upload(archive, **options))
    else:
        stored = tuple(args.stored) if args.stored else None
        try:
            model = call(args, lambda c: c.load(archive=archive, stored=stored, **options))
        except NotFound as exc:
            if archive and Path(archive).is_file():
                raise NotFound(f"{exc}; to upload the file here, give ./{archive}") from None
            raise
    flag = " (default)" if model["default"] else ""
    text = f"loaded {model['name']} version {model['version']} on {model['device']}{flag}"
    return _print(args, model, text)


def _unload(args: argparse.Namespace) -> int:
    data = call(args, lambda c: c.unload(args.name, args.model_version))
    text = f"unloaded {args.name} version {args.model_version}; default: "
    return _print(args, data, text + (data["default_version"] or "none (no version left)"))


def _default(args: argparse.Namespace) -> int:
    data = call(args, lambda c: c.set_default(args.name, args.model_version))
    text = f"{args.name}: default version {data['version']} (was {data['previous_default']})"
    return _print(args, data, text)


def _scale(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not settings:
        raise UsageError("models scale: give --instances, --max-batch-size, ... to change")
    m = call(args, lambda c: c.scale(args.name, args.model_version, settings))
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


ACTIONS: dict[
    str,
    tuple[Callable[[argparse.Namespace], int], str, str, tuple[tuple[str, dict[str, Any]], ...]],
] = {
    "list": (_list, "List every live model version.", "models list --json", ()),
    "describe": (_describe, "Show a model's versions, settings and signature.",
        "models describe mlp 2", (_NAME, _maybe_version("default: every live version"))),
    "load": (_load, "Install an archive (a file here, uploaded, or one in the daemon's "
        "archive_dir) and load it.", "models load ./mlp-2.esar --default", ()),
    "unload": (_unload, "Unload a version (its admitted requests finish first).",
        "models unload mlp 1", (_NAME, _VERSION)),
    "default": (_default, "Make a live version the model's default.",
        "models default mlp 2", (_NAME, _VERSION)),
    "scale": (_scale, "Change instances or batching; the version keeps serving.",
        "models scale mlp 2 --instances 2 --max-batch-size 16",
        (_NAME, _maybe_version("default: the default version"))),
}  # fmt: skip
