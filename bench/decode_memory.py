"""Memory one maximum-size request holds while the codec decodes it (issue 10, item 11).

``python -m bench.decode_memory [--mib 64]`` builds, per case, a ModelInfer request whose
serialized size is about ``--mib`` MiB (the default ``server.max_message_bytes``), then in
a fresh child process reads it from a file, parses it (as grpcio does) and decodes it with the codec
(``decode_infer_request``, the decoded-size limit at the message size, as the server
sets it). Printed per case: the peak RSS growth over the wire bytes (VmHWM, so the
message, protobuf's parse, the decoded tensors and every transient count) divided by
the wire size, and the decode time. A case refused by the limit prints its status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

CASES = ("raw-fp32", "typed-fp32", "typed-int64", "raw-bytes2", "typed-bytes2", "raw-bytes0")


def build(case: str, size: int) -> bytes:
    import numpy as np

    from edgeserve.api.codec import join_elements
    from edgeserve.proto import kserve_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name="m")
    kind, datatype = case.split("-")
    if datatype.startswith("bytes"):
        width = int(datatype[5:])
        count = size // (width + (4 if kind == "raw" else 2))
        tensor = request.inputs.add(name="x", datatype="BYTES", shape=[1, count])
        items = [b"a" * width] * count
        if kind == "raw":
            request.raw_input_contents.append(join_elements(items))
        else:
            tensor.contents.bytes_contents.extend(items)
        return request.SerializeToString()
    name = {"fp32": "FP32", "int64": "INT64"}[datatype]
    count = size // (4 if name == "FP32" else 3)  # int64 values < 2**21: 3-byte varints
    values = np.arange(count) % (2**21)
    tensor = request.inputs.add(name="x", datatype=name, shape=[1, count])
    if kind == "raw":
        request.raw_input_contents.append(values.astype(np.float32).tobytes())
    elif name == "FP32":
        tensor.contents.fp32_contents.extend(values.astype(np.float32).tolist())
    else:
        tensor.contents.int64_contents.extend(values.tolist())
    return request.SerializeToString()


def _high_water() -> int:
    """This process's peak RSS in bytes (VmHWM: unlike ru_maxrss, not inherited from the
    parent across exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(case: str, size: int, path: str) -> str:
    from edgeserve.api.codec import decode_infer_request
    from edgeserve.errors import EdgeserveError
    from edgeserve.proto import kserve_v2_pb2 as pb
    from edgeserve.serving.registry import LiveModel
    from edgeserve.types import TensorSpec

    async def never(request: object) -> object:
        raise AssertionError

    datatype = {"fp32": "FP32", "int64": "INT64"}.get(case.split("-")[1], "BYTES")
    model = LiveModel(
        name="m",
        version="1",
        inputs=(TensorSpec("x", datatype, (-1, -1)),),
        outputs=(TensorSpec("y", "FP32", (-1,)),),
        max_batch_size=8,
        submit=never,  # type: ignore[arg-type]
    )
    with open(path, "rb") as file:
        wire = file.read()
    base = _high_water()
    started = time.perf_counter()
    try:
        msg = pb.ModelInferRequest.FromString(wire)
        decode_infer_request(msg, model, max_bytes=size)
        outcome = "decoded"
    except EdgeserveError as exc:
        outcome = f"refused: {type(exc).__name__}"
    elapsed = time.perf_counter() - started
    peak = _high_water()
    held = peak - base
    return (
        f"{case:13s} wire {len(wire) / 2**20:6.1f} MiB  peak growth {held / 2**20:7.1f} MiB "
        f"= {held / len(wire):5.2f} x wire  {elapsed * 1e3:7.0f} ms  {outcome}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--wire", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.mib << 20
    if args.case:
        print(measure(args.case, size, args.wire), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="es-decode-") as folder:
        for case in CASES:  # a fresh process each: ru_maxrss is a high-water mark
            path = os.path.join(folder, case)
            with open(path, "wb") as file:
                file.write(build(case, size))
            command = [sys.executable, "-m", "bench.decode_memory", "--mib", str(args.mib)]
            subprocess.run([*command, "--case", case, "--wire", path], check=True)  # noqa: S603
            os.unlink(path)


if __name__ == "__main__":
    main()
