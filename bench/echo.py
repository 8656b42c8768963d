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


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Fixed replies; no model, no batching, no codec."""

    def __init__(self, reply: pb.ModelInferResponse) -> None:
        self._reply = reply

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


async def serve(listen: list[str], reply: pb.ModelInferResponse) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MESSAGE_LIMIT),
            ("grpc.max_send_message_length", MESSAGE_LIMIT),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(reply), server)
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
    args = parser.parse_args(argv)
    shape = [int(d) for d in args.shape.split(",")]
    asyncio.run(serve(args.listen, fixed_reply(args.model, args.output, shape)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
