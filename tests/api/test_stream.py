"""ModelStreamInfer through tritonclient's stream API: ids, concurrency, errors, cancel."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as triton

from edgeserve.api.inference import InferenceServicer
from edgeserve.serving.registry import ModelRegistry
from edgeserve.types import InferRequest, InferResult
from tests.api.support import WAIT_S, Api, live_model, scripted_submit, wait_for


def fp32_input(x: np.ndarray, name: str = "x") -> triton.InferInput:
    inp = triton.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


class Collector:
    """tritonclient stream callback that files results and errors in a queue."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[object, object]] = queue.Queue()

    def __call__(self, result: object, error: object) -> None:
        self.items.put((result, error))

    def take(self, count: int) -> list[tuple[object, object]]:
        return [self.items.get(timeout=WAIT_S) for _ in range(count)]


@pytest.fixture
def stream(api: Api) -> Iterator[tuple[triton.InferenceServerClient, Collector]]:
    collector = Collector()
    client = api.triton()
    client.start_stream(callback=collector)
    try:
        yield client, collector
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def test_one_response_per_request_matched_by_id(stream) -> None:
    client, collector = stream
    sent = {f"r{i}": np.full((1, 3), i, dtype=np.float32) for i in range(20)}
    for request_id, x in sent.items():
        client.async_stream_infer("twice_fp32", [fp32_input(x)], request_id=request_id)
    got = {}
    for result, error in collector.take(len(sent)):
        assert error is None, error
        got[result.get_response().id] = result.as_numpy("y")
    assert got.keys() == sent.keys()
    for request_id, x in sent.items():
        np.testing.assert_array_equal(got[request_id], x * 2)


def test_an_error_does_not_end_the_stream(api: Api, stream) -> None:
    client, collector = stream
    x = np.ones((1, 3), dtype=np.float32)
    client.async_stream_infer("nope", [fp32_input(x)], request_id="bad")
    client.async_stream_infer("twice_fp32", [fp32_input(x, "z")], request_id="bad-input")
    (_, first), (_, second) = collector.take(2)
    with api.triton() as unary, pytest.raises(triton.InferenceServerException) as info:
        unary.infer("nope", [fp32_input(x)])
    messages = {str(first.message()), str(second.message())}
    assert info.value.message() in messages  # same text as the unary call
    assert any("'z'" in m and "not an input" in m for m in messages)
    client.async_stream_infer("twice_fp32", [fp32_input(x)], request_id="after")
    ((result, error),) = collector.take(1)
    assert error is None and result.get_response().id == "after"


def test_requests_on_one_stream_run_concurrently(api: Api, stream) -> None:
    parties = 4
    arrived: list[int] = []
    release: list[asyncio.Event] = []
    twice = scripted_submit("twice", ["x"], ["y"])

    async def gate(request: InferRequest) -> InferResult:
        # Every request waits until all `parties` are inside: serialized handling would
        # never get there and time out.
        if not release:
            release.append(asyncio.Event())
        arrived.append(1)
        if len(arrived) == parties:
            release[0].set()
        await asyncio.wait_for(release[0].wait(), WAIT_S)
        return await twice(request)

    model = live_model("gate", [("x", "FP32", (-1, 3))], [("y", "FP32", (-1, 3))], gate)
    api.loop.call(api.registry.add, model)
    try:
        client, collector = stream
        x = np.ones((1, 3), dtype=np.float32)
        for i in range(parties):
            client.async_stream_infer("gate", [fp32_input(x * i)], request_id=str(i))
        results = collector.take(parties)
        assert all(error is None for _, error in results), results
        assert sorted(r.get_response().id for r, _ in results) == ["0", "1", "2", "3"]
    finally:
        api.loop.call(api.registry.remove, "gate", "1")


def test_cancelling_the_stream_cancels_requests_in_flight(api: Api) -> None:
    api.recorder.entered.clear()
    api.recorder.cancelled.clear()
    client = api.triton()
    client.start_stream(callback=Collector())
    try:
        x = np.ones((1, 3), dtype=np.float32)
        client.async_stream_infer("hang", [fp32_input(x)], request_id="h")
        wait_for(api.recorder.entered.is_set, "the request to reach the model")
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    wait_for(api.recorder.cancelled.is_set, "the in-flight request to be cancelled")


def test_half_close_waits_for_requests_in_flight(api: Api) -> None:
    collector = Collector()
    client = api.triton()
    client.start_stream(callback=collector)
    x = np.ones((2, 3), dtype=np.float32)
    for i in range(8):
        client.async_stream_infer("twice_fp32", [fp32_input(x)], request_id=str(i))
    client.stop_stream()  # half-close: the server answers what it has, then ends
    client.close()
    answered = [collector.items.get_nowait() for _ in range(collector.items.qsize())]
    assert len(answered) == 8 and all(error is None for _, error in answered)


def test_in_flight_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_stream_in_flight"):
        InferenceServicer(ModelRegistry(), "s", "1", lambda: True, max_stream_in_flight=0)
