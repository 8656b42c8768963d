"""The codec's cost per request, against another revision's codec in the same process.

``python -m bench.codec_cost [--against REV] [--rounds 25]`` loads ``agent/api/codec.py``
as it is at git revision ``REV`` (default ``HEAD~1``; it must import only what this tree
still has) beside the working tree's, and times both on the tiny MLP's request (one FP32
input [1, 64] in, one FP32 output [1, 10] back), interleaved round by round so both see
the same machine: ``decode`` (``decode_infer_request`` on a parsed message), ``encode``
(``encode_infer_response`` and serialization) and ``full`` (parse, decode, encode,
serialize: the codec's whole part of a unary call). Time is the thread's CPU time
(``time.thread_time``), so being preempted on a busy machine does not count. Printed:
median and minimum CPU microseconds per request of each, and this tree's / the other's
ratio of both; the ratio is what to quote.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from edgeserve.api import codec as current
from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.serving.registry import LiveModel
from edgeserve.types import InferResult, TensorSpec

ROOT = Path(__file__).resolve().parent.parent


def load_codec(revision: str, folder: Path) -> ModuleType:
    source = subprocess.run(  # noqa: S603
        ["git", "show", f"{revision}:agent/api/codec.py"],  # noqa: S607
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = folder / "codec_other.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("codec_other", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def workload(codec: ModuleType) -> dict[str, Callable[[], Any]]:
    async def never(request: object) -> object:
        raise AssertionError

    model = LiveModel(
        name="mlp",
        version="1",
        inputs=(TensorSpec("x", "FP32", (-1, 64)),),
        outputs=(TensorSpec("output__0", "FP32", (-1, 10)),),
        max_batch_size=32,
        submit=never,  # type: ignore[arg-type]
    )
    request = pb.ModelInferRequest(model_name="mlp", id="r-1")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    wire = request.SerializeToString()
    parsed = pb.ModelInferRequest.FromString(wire)
    result = InferResult("mlp", "1", {"output__0": torch.ones(1, 10)}, request_id="r-1")

    def decode() -> object:
        return codec.decode_infer_request(parsed, model, None, max_bytes=64 << 20)

    def encode() -> bytes:
        reply = codec.encode_infer_response(result, model, raw=True, request_id="r-1")
        return reply.SerializeToString()

    def full() -> bytes:
        msg = pb.ModelInferRequest.FromString(wire)
        decoded = codec.decode_infer_request(msg, model, None, max_bytes=64 << 20)
        reply = codec.encode_infer_response(
            result,
            model,
            raw=codec.request_uses_raw(msg),
            requested=decoded.requested_outputs,
            request_id=msg.id,
        )
        return reply.SerializeToString()

    return {"decode": decode, "encode": encode, "full": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="HEAD~1")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="es-codec-") as folder:
        other = load_codec(args.against, Path(folder))
    sides = {"this tree": workload(current), args.against: workload(other)}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for side, calls in sides.items():
            for name, call in calls.items():
                started = time.thread_time()
                for _ in range(args.calls):
                    call()
                elapsed = (time.thread_time() - started) / args.calls * 1e6
                times.setdefault((side, name), []).append(elapsed)
    print(f"CPU us per request, {args.rounds} rounds of {args.calls} calls (median / min)")
    for name in ("decode", "encode", "full"):
        mine, theirs = times[("this tree", name)], times[(args.against, name)]
        print(
            f"  {name:7s} this tree {statistics.median(mine):6.2f} / {min(mine):6.2f}   "
            f"{args.against} {statistics.median(theirs):6.2f} / {min(theirs):6.2f}   "
            f"ratio {statistics.median(mine) / statistics.median(theirs):.2f} / "
            f"{min(mine) / min(theirs):.2f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
