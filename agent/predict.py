"""``edgeserve predict``: send files to a running daemon and print what comes back."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edgeserve.api.client import DEFAULT_ADDRESS, ClientError, InferenceClient, ModelInfo
from edgeserve.errors import InvalidArgument

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 3


def run_predict(
    model: str,
    inputs: list[Path | tuple[str, Path]],
    *,
    version: str = "",
    address: str | None = None,
    timeout: float = 30.0,
    as_json: bool = False,
) -> int:
    address = address or os.environ.get("EDGESERVE_ADDRESS") or DEFAULT_ADDRESS
    with InferenceClient(address) as client:
        try:
            info = client.model_metadata(model, version, timeout=timeout)
            arrays = _read_inputs(info, inputs)
            served, outputs = client.infer(model, arrays, version=version, timeout=timeout)
        except ClientError as err:
            print(f"edgeserve: error: {err}", file=sys.stderr)
            unreachable = err.code in (grpc.StatusCode.UNAVAILABLE,) and "connect" in err.message
            return EXIT_UNREACHABLE if unreachable else EXIT_FAILED
    _print(model, served, outputs, as_json)
    return EXIT_OK


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
