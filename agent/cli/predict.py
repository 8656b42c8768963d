"""``edgeserve predict``: send files to a running daemon and print what comes back."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.api.client import DEFAULT_ADDRESS, ClientError, InferenceClient, ModelInfo
from edgeserve.cli.common import add_command, named_paths
from edgeserve.cli.exits import DaemonUnreachable, ExitCode
from edgeserve.errors import EdgeserveError, InvalidArgument

ENV_ADDRESS = "EDGESERVE_ADDRESS"


def register(commands: Any) -> None:
    sub = add_command(
        commands,
        "predict",
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


def run(args: argparse.Namespace) -> int:
    address = args.address or os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS
    with InferenceClient(address) as client:
        try:
            info = client.model_metadata(args.model, args.model_version, timeout=args.timeout)
            arrays = _read_inputs(info, named_paths(args.input))
            served, outputs = client.infer(
                args.model, arrays, version=args.model_version, timeout=args.timeout
            )
        except ClientError as err:
            if err.code.name == "UNAVAILABLE" and "connect" in err.message:
                reason = f"daemon not reachable at {address}: {err.message}"
                raise DaemonUnreachable(reason) from None
            raise EdgeserveError(str(err)) from None
    _print(args.model, served, outputs, args.json)
    return ExitCode.OK


def _read_inputs(info: ModelInfo, given: list[Path | tuple[str, Path]]) -> dict[str, np.ndarray]:
    if len(given) != len(info.inputs):
        names = ", ".join(t.name for t in info.inputs)
        raise InvalidArgument(
            f"model '{info.name}' takes {len(info.inputs)} input(s) ({names}); {len(given)} given"
        )
    specs = {t.name: t for t in info.inputs}
    arrays = {}
    for position, item in enumerate(given):
        name, path = item if isinstance(item, tuple) else (info.inputs[position].name, item)
        spec = specs.get(name)
        if spec is None:
            raise InvalidArgument(f"model '{info.name}' has no input '{name}'")
        arrays[name] = _read_file(path, spec.datatype)
    return arrays


def _read_file(path: Path, datatype: str) -> np.ndarray:
    try:
        if datatype == "BYTES":
            return np.array([path.read_bytes()], dtype=object)
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read input file {path}: {exc}") from None
    return np.asarray(array)


def _print(model: str, version: str, outputs: dict[str, np.ndarray], as_json: bool) -> None:
    if as_json:
        doc: dict[str, Any] = {"model": model, "version": version, "outputs": {}}
        for name, array in outputs.items():
            values = _plain(array)
            doc["outputs"][name] = {"shape": list(array.shape), "data": values}
        print(json.dumps(doc))
        return
    print(f"{model} version {version}")
    for name, array in outputs.items():
        print(f"  {name} {list(array.shape)} {array.dtype if array.dtype != object else 'BYTES'}")
        print(
            "   ",
            np.array2string(
                np.asarray(_plain(array), dtype=object) if array.dtype == object else array,
                threshold=64,
            ),
        )


def _plain(array: np.ndarray) -> Any:
    if array.dtype == object:
        return [[_text(v) for v in row] for row in array.reshape(array.shape[0], -1)]
    return array.tolist()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
