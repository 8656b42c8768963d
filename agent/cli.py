"""The ``edgeserve`` command: a thin shell that parses arguments and calls library code.

Exit codes (documented in the README and in ``edgeserve --help``):
    0  success
    1  the operation failed (a model failed to load, an inference call was refused)
    2  usage, configuration, archive or input-file error
    3  the daemon is not reachable
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeserve import __version__
from edgeserve.cli_models import register_models, register_status
from edgeserve.errors import ArchiveError, ConfigError, EdgeserveError, InvalidArgument

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

EPILOG = """exit codes: 0 success, 1 operation failed, 2 usage/config/archive error,
3 daemon not reachable"""

log = logging.getLogger("edgeserve.cli")


class UsageError(Exception):
    """Bad command-line input; exits with EXIT_USAGE."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except (UsageError, ConfigError, ArchiveError, InvalidArgument) as exc:
        return _fail(exc, EXIT_USAGE)
    except EdgeserveError as exc:
        return _fail(exc, EXIT_FAILED)
    except ConnectionError as exc:
        return _fail(exc, EXIT_UNREACHABLE)


def _fail(exc: BaseException, code: int) -> int:
    print(f"edgeserve: error: {exc}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeserve",
        description="Inference agent for edge devices: TorchScript models over KServe v2 gRPC.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgeserve {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in _COMMANDS:
        register(commands)
    return parser


def _command(
    commands: Any,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    help_text: str,
    example: str,
) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help_text,
        description=f"{help_text}\n\nexample:\n  {example}",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.set_defaults(handler=handler)
    return sub


# -- serve ---------------------------------------------------------------------------------


def _register_serve(commands: Any) -> None:
    sub = _command(
        commands,
        "serve",
        _serve,
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


def _serve(args: argparse.Namespace) -> int:
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


# -- package -------------------------------------------------------------------------------


def _register_package(commands: Any) -> None:
    sub = _command(
        commands,
        "package",
        _package,
        "Build a model archive from TorchScript or an eager module.",
        "edgeserve package model.py:build --name mlp --version 1 "
        "--example-input x.npy --quantize dynamic -o mlp-1.esar",
    )
    sub.add_argument("model", nargs="?", help="TorchScript file, or module.py:factory")
    sub.add_argument("--name", required=False, help="model name (defaults to the .mar's)")
    sub.add_argument("--version", dest="model_version", help="model version")
    sub.add_argument("-o", "--output", type=Path, required=True, help="archive to write")
    sub.add_argument(
        "--example-input",
        action="append",
        default=[],
        metavar="[NAME=]FILE.npy",
        help="example input (repeatable, in input order); fixes the signature",
    )
    sub.add_argument(
        "--sample-input",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="warm-up sample (repeatable); expected outputs are recorded",
    )
    sub.add_argument("--quantize", choices=["dynamic"], help="int8 dynamic quantization")
    sub.add_argument("--handler", help="tensor | image_classifier | path/to/handler.py")
    sub.add_argument(
        "--handler-config",
        type=json.loads,
        metavar="JSON",
        help='handler settings, e.g. \'{"topk": 3, "labels": "labels.txt"}\'',
    )
    sub.add_argument(
        "--extra-file",
        action="append",
        type=Path,
        default=[],
        help="extra member for the archive (labels, vocabularies)",
    )
    sub.add_argument(
        "--max-batch-size", type=int, help="most rows per request and per batch (1: never combine)"
    )
    sub.add_argument("--max-queue-delay-ms", type=float, help="batching default (ms)")
    sub.add_argument("--sign-key", type=Path, help="Ed25519 private key (PEM) to sign with")
    sub.add_argument(
        "--from-mar",
        type=Path,
        metavar="FILE.mar",
        help="import a TorchServe .mar whose model is TorchScript",
    )


def _named_paths(values: list[str]) -> list[Path | tuple[str, Path]]:
    out: list[Path | tuple[str, Path]] = []
    for value in values:
        name, sep, path = value.partition("=")
        out.append((name, Path(path)) if sep else Path(value))
    return out


def _package(args: argparse.Namespace) -> int:
    from edgeserve.packager import build_archive

    if not args.model and not args.from_mar:
        raise UsageError("package: give MODEL or --from-mar FILE.mar")
    if not args.from_mar and not (args.name and args.model_version):
        raise UsageError("package: --name and --version are required")
    manifest = build_archive(
        args.model or "",
        name=args.name,
        version=args.model_version,
        output=args.output,
        example_inputs=_named_paths(args.example_input),
        sample_inputs=_named_paths(args.sample_input),
        quantize=args.quantize,
        handler=args.handler,
        handler_config=args.handler_config,
        extra_files=args.extra_file,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        sign_key=args.sign_key,
        from_mar=args.from_mar,
    )
    signed = " (signed)" if args.sign_key else ""
    print(f"wrote {args.output}: {manifest.name} version {manifest.version}{signed}")
    return EXIT_OK


def _register_keygen(commands: Any) -> None:
    sub = _command(
        commands,
        "keygen",
        _keygen,
        "Create an Ed25519 key pair for signing archives.",
        "edgeserve keygen --out /etc/edgeserve/keys/release",
    )
    sub.add_argument(
        "--out",
        type=Path,
        required=True,
        help="path prefix: writes PREFIX.key (0600) and PREFIX.pub",
    )


def _keygen(args: argparse.Namespace) -> int:
    from edgeserve.signing import generate_key

    private, public = Path(f"{args.out}.key"), Path(f"{args.out}.pub")
    generate_key(private, public)
    print(f"wrote {private} (keep secret) and {public} (add to trust.keys)")
    return EXIT_OK


# -- predict -------------------------------------------------------------------------------


def _register_predict(commands: Any) -> None:
    sub = _command(
        commands,
        "predict",
        _predict,
        "Send inputs to a running daemon and print the outputs.",
        "edgeserve predict mlp --input x.npy --json",
    )
    sub.add_argument("model", help="model name")
    sub.add_argument("--model-version", default="", help="version (default: the default one)")
    sub.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help=".npy file, or an image/any file for a BYTES input (repeatable)",
    )
    sub.add_argument(
        "--address",
        default=None,
        help="daemon address (default $EDGESERVE_ADDRESS or 127.0.0.1:8001)",
    )
    sub.add_argument("--timeout", type=float, default=30.0, help="seconds")
    sub.add_argument("--json", action="store_true", help="print JSON")


def _predict(args: argparse.Namespace) -> int:
    from edgeserve.predict import run_predict

    return run_predict(
        args.model,
        _named_paths(args.input),
        version=args.model_version,
        address=args.address,
        timeout=args.timeout,
        as_json=args.json,
    )


# -- demo ----------------------------------------------------------------------------------


def _register_demo(commands: Any) -> None:
    sub = _command(
        commands,
        "demo",
        _demo,
        "Build an int8 example model, serve it locally, and run requests through gRPC.",
        "edgeserve demo",
    )
    sub.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".edgeserve-demo"),
        help="where the demo keeps its store and sockets",
    )
    sub.add_argument("--requests", type=int, default=200, help="requests to time")
    sub.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the daemon serving after the demo (Ctrl-C to stop)",
    )


def _demo(args: argparse.Namespace) -> int:
    from edgeserve.demo import run_demo

    return run_demo(args.state_dir, requests=args.requests, keep_running=args.keep_running)


_COMMANDS = [
    _register_serve,
    _register_package,
    _register_keygen,
    _register_predict,
    _register_demo,
    register_models,
    register_status,
]
