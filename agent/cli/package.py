"""``edgeserve package``: build a model archive (the packager; the daemon never imports it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgeserve.cli.common import add_command, named_paths
from edgeserve.cli.exits import ExitCode, UsageError


def register(commands: Any) -> None:
    sub = add_command(
        commands,
        "package",
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
    sub.add_argument(
        "--input-name",
        action="append",
        default=[],
        metavar="NAME",
        help="name of the model's next input (repeatable, in input order; default input__N)",
    )
    sub.add_argument(
        "--output-name",
        action="append",
        default=[],
        metavar="NAME",
        help="name of the model's next output (repeatable, in output order; default output__N)",
    )
    sub.add_argument("--quantize", choices=["dynamic"], help="int8 dynamic quantization")
    sub.add_argument("--handler", help="tensor | image_classifier | path/to/handler.py")
    sub.add_argument(
        "--handler-config",
        type=_json_object,
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
        "--max-batch-size",
        type=int,
        help="most rows per request and per batch (1: never combine; 0: no batch dimension)",
    )
    sub.add_argument("--max-queue-delay-ms", type=float, help="batching default (ms)")
    sub.add_argument("--sign-key", type=Path, help="Ed25519 private key (PEM) to sign with")
    sub.add_argument(
        "--from-mar",
        type=Path,
        metavar="FILE.mar",
        help="import a TorchServe .mar whose model is TorchScript",
    )


def _json_object(text: str) -> dict[str, Any]:
    """``--handler-config``: a JSON object (argparse reports the error as a usage error)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


def run(args: argparse.Namespace) -> int:
    from edgeserve.packager.build import build_archive

    if not args.model and not args.from_mar:
        raise UsageError("package: give MODEL or --from-mar FILE.mar")
    if not args.from_mar and not (args.name and args.model_version):
        raise UsageError("package: --name and --version are required")
    manifest = build_archive(
        args.model or "",
        name=args.name,
        version=args.model_version,
        output=args.output,
        example_inputs=named_paths(args.example_input),
        sample_inputs=named_paths(args.sample_input),
        quantize=args.quantize,
        handler=args.handler,
        handler_config=args.handler_config,
        extra_files=args.extra_file,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        sign_key=args.sign_key,
        from_mar=args.from_mar,
        input_names=args.input_name,
        output_names=args.output_name,
    )
    signed = " (signed)" if args.sign_key else ""
    print(f"wrote {args.output}: {manifest.name} version {manifest.version}{signed}")
    return ExitCode.OK
