"""What one load process does: drive one gRPC target and record every request it timed.

The unary drivers use grpc's *synchronous* channel with ``future()`` calls and callbacks:
the C core does the I/O and one polling thread runs a short Python callback per reply.
Measured on the 2-core machine against the echo server at 32 in flight, this generator
did ~5-7k req/s at ~55 % of one core, where ``grpc.aio`` with 32 coroutines did ~3k req/s
and blocking stubs on 32 threads ~3k req/s (see bench/README.md).

Payloads are serialized once by the caller (identity serializers here); a streamed
request gets its ``id`` by appending field 3 to the serialized bytes (protobuf keeps the
last value of a repeated scalar field), so no message is built per request.

Every driver records, per request, (issue time, latency, status code), all on
``time.monotonic`` (CLOCK_MONOTONIC, shared by every process of the machine).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc

from edgeserve.proto import kserve_v2_pb2 as pb

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
OK = "OK"
_monotonic = time.monotonic


@dataclass
class Recording:
    """Per-request records of one driver run (lists, so the callbacks only append)."""

    issued: list[float] = field(default_factory=list)
    """Issue time of each recorded request (monotonic seconds)."""
    latency: list[float] = field(default_factory=list)
    """Issue to reply, seconds."""
    codes: list[str] = field(default_factory=list)
    """gRPC status code name per request (``OK`` for success)."""
    lag: list[float] = field(default_factory=list)
    """Open loop only: actual issue time minus the scheduled Poisson arrival time."""
    shed: int = 0
    """Open loop only: arrivals skipped because the generator had too many in flight."""


@dataclass(frozen=True)
class Job:
    """One driver run inside one load process."""

    address: str
    kind: str
    """``closed`` (unary calls, ``share`` in flight), ``open`` (Poisson at ``rate``) or
    ``stream`` (one ModelStreamInfer stream with ``share`` messages in flight)."""
    payload: bytes
    start_at: float
    end_at: float
    share: int = 1
    rate: float = 0.0
    timeout_s: float = 10.0
    max_outstanding: int = 4096
    seed: int = 0
    method: str = INFER_METHOD
    """The unary method called (TorchServe's Predictions for the peer)."""


def with_id(payload: bytes, request_id: bytes) -> bytes:
    """``payload`` (a serialized ModelInferRequest) with ``id`` set; ids < 128 bytes."""
    return payload + b"\x1a" + bytes((len(request_id),)) + request_id


def _code_name(future: Any) -> str:
    code = future.code()
    return OK if code is None else str(code.name)


class _Closed:
    """Closed loop: ``share`` calls in flight; each reply issues the next call."""

    def __init__(self, channel: grpc.Channel, job: Job) -> None:
        self._call = channel.unary_unary(job.method)
        self._job = job
        self._live = job.share
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.rec = Recording()

    def run(self) -> Recording:
        for _ in range(self._job.share):
            self._issue()
        if not self._done.wait(self._job.end_at - _monotonic() + self._job.timeout_s + 5.0):
            raise TimeoutError(f"closed loop on {self._job.address}: calls never finished")
        return self.rec

    def _issue(self) -> None:
        started = _monotonic()
        future = self._call.future(self._job.payload, timeout=self._job.timeout_s)
        future.add_done_callback(partial(self._on_done, started))

    def _on_done(self, started: float, future: Any) -> None:
        now = _monotonic()
        job, rec = self._job, self.rec
        if job.start_at <= now <= job.end_at:
            rec.issued.append(started)
            rec.latency.append(now - started)
            rec.codes.append(_code_name(future))
        if now < job.end_at:
            self._issue()
            return
        with self._lock:
            self._live -= 1
            if self._live == 0:
                self._done.set()


class _Open:
    """Open loop: Poisson arrivals at ``rate``; a request is recorded when it was
    *issued* inside the window, whenever its reply comes."""

    def __init__(self, channel: grpc.Channel, job: Job) -> None:
        self._call = channel.unary_unary(job.method)
        self._job = job
        self._issued = 0  # written by the scheduling thread only
        self._completed = 0  # written by the callback thread only
        self._drained = threading.Event()
        self._closing = False
        self.rec = Recording()

    def run(self) -> Recording:
        job = self._job
        rng = random.Random(job.seed)
        arrival = _monotonic()
        while True:
            now = _monotonic()
            if now >= job.end_at:
                break
            while arrival <= now:
                self._arrive(arrival)
                arrival += rng.expovariate(job.rate)
            time.sleep(max(0.0, arrival - _monotonic()))
        self._closing = True
        if self._issued != self._completed:
            self._drained.wait(job.timeout_s + 5.0)
        return self.rec

    def _arrive(self, scheduled: float) -> None:
        job = self._job
        if self._issued - self._completed >= job.max_outstanding:
            if scheduled >= job.start_at:
                self.rec.shed += 1
            return
        started = _monotonic()
        self._issued += 1
        future = self._call.future(job.payload, timeout=job.timeout_s)
        future.add_done_callback(partial(self._on_done, scheduled, started))

    def _on_done(self, scheduled: float, started: float, future: Any) -> None:
        now = _monotonic()
        job, rec = self._job, self.rec
        if job.start_at <= started < job.end_at:
            rec.issued.append(started)
            rec.latency.append(now - started)
            rec.codes.append(_code_name(future))
            rec.lag.append(started - scheduled)
        self._completed += 1
        if self._closing and self._completed == self._issued:
            self._drained.set()


class _Stream:
    """One bidirectional ModelStreamInfer stream with ``share`` messages in flight;
    responses are matched to requests by ``id``.

    This one uses ``grpc.aio`` (a writer task and the reading coroutine on one loop): the
    synchronous stream API hands every request from a Python iterator thread to grpc and
    saturated one core at ~8k msg/s against the echo server, where aio did 8-10k msg/s
    at ~0.75 of a core."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self._sent: dict[str, float] = {}
        self.rec = Recording()

    def run(self) -> Recording:
        return asyncio.run(self._main())

    async def _main(self) -> Recording:
        job = self._job
        async with grpc.aio.insecure_channel(job.address) as channel:
            await asyncio.wait_for(channel.channel_ready(), job.timeout_s)
            budget = job.end_at - _monotonic() + job.timeout_s
            call = channel.stream_stream(STREAM_METHOD)(timeout=budget)
            slots = asyncio.Semaphore(job.share)
            writer = asyncio.create_task(self._write(call, slots))
            await self._read(call, slots)
            await writer
        if self._sent:
            raise RuntimeError(f"stream ended with {len(self._sent)} request(s) unanswered")
        return self.rec

    async def _write(self, call: Any, slots: asyncio.Semaphore) -> None:
        job, sent = self._job, self._sent
        number = 0
        while True:
            await slots.acquire()
            if _monotonic() >= job.end_at:
                break
            number += 1
            text = str(number)
            sent[text] = _monotonic()
            await call.write(with_id(job.payload, text.encode()))
        await call.done_writing()

    async def _read(self, call: Any, slots: asyncio.Semaphore) -> None:
        job, rec, sent = self._job, self.rec, self._sent
        parse = pb.ModelStreamInferResponse.FromString
        async for raw in call:
            now = _monotonic()
            message = parse(raw)
            started = sent.pop(message.infer_response.id, None)
            if started is None:
                raise RuntimeError(f"stream reply with unknown id {message.infer_response.id!r}")
            if job.start_at <= now <= job.end_at:
                rec.issued.append(started)
                rec.latency.append(now - started)
                rec.codes.append("STREAM_ERROR" if message.error_message else OK)
            slots.release()


def drive(channel: grpc.Channel, job: Job) -> Recording:
    """Run one job to its end on ``channel``; returns what it recorded."""
    if job.kind == "closed":
        return _Closed(channel, job).run()
    if job.kind == "open":
        return _Open(channel, job).run()
    if job.kind == "stream":
        return _Stream(job).run()
    raise ValueError(f"unknown load kind {job.kind!r}")
