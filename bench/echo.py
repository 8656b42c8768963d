"""The "echo ceiling": a grpc.aio KServe v2 server that answers with a fixed reply, no model.

Run as a child process by the bench (``python -m bench.echo --listen A --listen B``). It
binds the same socket kinds with the same options as ``edgeserve serve`` (a Unix socket
and loopback TCP, message limits, ``so_reuseport`` off) and uses the same default asyncio
loop, so the only difference from the daemon is the work done per request:

* ``ModelInfer``: the request is deserialized by the generated servicer plumbing (as in
  the daemon) and the reply is one pre-built ``ModelInferResponse`` shaped like the tiny
  MLP's output (``[1, 10]`` FP32, raw contents).
* ``ModelStreamInfer``: one response per request, carrying the request's ``id``.
* ``ServerReady``: always ready (the bench waits on it).
* ``ServerMetadata``; ``ModelMetadata``, ``ModelConfig``: the tiny MLP's (FP32
  ``[-1, 64]`` in, ``[-1, 10]`` out, ``max_batch_size`` 32), which perf_analyzer reads
  before it sends anything.

SIGTERM / SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.proto import kserve_v2_pb2_grpc as pb_grpc

MESSAGE_LIMIT = 64 << 20


def fixed_reply(model: str, output: str, shape: list[int]) -> pb.ModelInferResponse:
    """A raw-contents FP32 reply of ``shape`` (zeros), as the daemon would send it."""
    count = 1
    for dim in shape:
        count *= dim
    reply = pb.ModelInferResponse(model_name=model, model_version="1")
    reply.outputs.add(name=output, datatype="FP32", shape=shape)
    reply.raw_output_contents.append(bytes(4 * count))
    return reply


def describe(model: str, reply: pb.ModelInferResponse, input_shape: list[int]) -> tuple[Any, Any]:
    """(ModelMetadataResponse, ModelConfigResponse) of a batching FP32 model whose one
    input ``x`` has ``input_shape`` (without the batch dimension) and whose output is
    the reply's."""
    output = reply.outputs[0]
    meta = pb.ModelMetadataResponse(name=model, versions=["1"], platform="pytorch_libtorch")
    meta.inputs.add(name="x", datatype="FP32", shape=[-1, *input_shape])
    meta.outputs.add(name=output.name, datatype="FP32", shape=[-1, *output.shape[1:]])
    config = pb.ModelConfigResponse()
    config.config.name, config.config.platform = model, "pytorch_libtorch"
    config.config.max_batch_size = 32
    config.config.input.add(name="x", data_type=pb.TYPE_FP32, dims=input_shape)
    config.config.output.add(name=output.name, data_type=pb.TYPE_FP32, dims=output.shape[1:])
    config.config.dynamic_batching.max_queue_delay_microseconds = 2000
    return meta, config


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Fixed replies; no model, no batching, no codec."""

    def __init__(self, reply: pb.ModelInferResponse, input_shape: list[int]) -> None:
        self._reply = reply
        self._meta, self._config = describe(reply.model_name, reply, input_shape)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="echo", version="0")

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        return self._meta

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        return self._config

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        return self._reply

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            response = pb.ModelStreamInferResponse()
            response.infer_response.CopyFrom(self._reply)
            response.infer_response.id = request.id
            yield response


async def serve(
    listen: list[str],
    reply: pb.ModelInferResponse,
    input_shape: list[int],
    reuseport: bool = False,
) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MESSAGE_LIMIT),
            ("grpc.max_send_message_length", MESSAGE_LIMIT),
            ("grpc.so_reuseport", int(reuseport)),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(reply, input_shape), server)
    for address in listen:
        if address.startswith("unix://"):
            with contextlib.suppress(FileNotFoundError):
                Path(address[len("unix://") :]).unlink()
        if server.add_insecure_port(address) == 0:
            raise SystemExit(f"echo server: cannot bind {address}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--listen", action="append", required=True, help="unix:///p or host:port")
    parser.add_argument("--model", default="mlp", help="model name put in the reply")
    parser.add_argument("--output", default="output__0", help="output name put in the reply")
    parser.add_argument("--shape", default="1,10", help="output shape, comma-separated")
    parser.add_argument("--input-shape", default="64", help="one input row's shape")
    parser.add_argument(
        "--reuseport",
        action="store_true",
        help="SO_REUSEPORT on TCP: several echo processes share one port (bench.frontend_ceiling)",
    )
    args = parser.parse_args(argv)
    shape = [int(d) for d in args.shape.split(",")]
    input_shape = [int(d) for d in args.input_shape.split(",")]
    reply = fixed_reply(args.model, args.output, shape)
    asyncio.run(serve(args.listen, reply, input_shape, args.reuseport))
    return 0


if __name__ == "__main__":
    sys.exit(main())
