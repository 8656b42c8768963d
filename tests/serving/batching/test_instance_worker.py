"""The instance thread: its torch settings, the hop to it and back, stacking and splitting."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

from edgeserve.serving.worker import (
    InstanceWorker,
    default_intra_op_threads,
    split_outputs,
    stack_parts,
)
from edgeserve.types import BytesTensor

from .conftest import run


async def submit(worker: InstanceWorker, parts: list[dict]) -> list:
    """The batcher's path to the thread: ``submit_parts``, ``done`` called on the loop."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def done(results, error):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(results)

    sizes = [int(next(iter(part.values())).shape[0]) if part else 1 for part in parts]
    worker.submit_parts(parts, sizes, loop, done)
    return await future


async def batch(worker: InstanceWorker, inputs: dict) -> dict:
    """One request's inputs as a batch of its own; its outputs."""
    (outputs,) = await submit(worker, [inputs])
    return outputs


def thread_facts(inputs):
    return {
        "threads": torch.tensor([torch.get_num_threads()]),
        "inference_mode": torch.tensor([torch.is_inference_mode_enabled()]),
        "thread": BytesTensor([threading.current_thread().name.encode()], (1,)),
    }


def test_the_thread_has_its_own_torch_budget_and_inference_mode():
    main_threads = torch.get_num_threads()
    other = 2 if main_threads != 2 else 1
    worker = InstanceWorker(thread_facts, intra_op_threads=other, name="budget-instance")
    try:
        out = run(batch(worker, {}))
    finally:
        assert worker.close(timeout=5.0)
    assert int(out["threads"]) == other
    assert bool(out["inference_mode"])
    assert out["thread"].items == [b"budget-instance"]
    assert torch.get_num_threads() == main_threads  # the caller's budget is untouched
    assert not torch.is_inference_mode_enabled()


def test_a_torchscript_model_runs_on_the_thread():
    class Affine(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 3.0 + 1.0

    model = torch.jit.script(Affine())
    worker = InstanceWorker(lambda inputs: {"y": model(inputs["x"])}, intra_op_threads=1)
    try:
        out = run(submit(worker, [{"x": torch.ones(2, 3)}, {"x": torch.zeros(1, 3)}]))
    finally:
        worker.close()
    assert torch.equal(out[0]["y"], torch.full((2, 3), 4.0))
    assert torch.equal(out[1]["y"], torch.full((1, 3), 1.0))


def test_a_single_request_passes_through_without_any_copy():
    worker = InstanceWorker(lambda inputs: {"y": inputs["x"]}, intra_op_threads=1)
    x = torch.arange(8.0).reshape(2, 4)
    try:
        (out,) = run(submit(worker, [{"x": x}]))
    finally:
        worker.close()
    assert out["y"].data_ptr() == x.data_ptr()


def test_split_outputs_are_views_of_one_batch_output():
    batch = {"y": torch.arange(12.0).reshape(6, 2)}
    pieces = split_outputs(batch, [1, 3, 2])
    assert [tuple(p["y"].shape) for p in pieces] == [(1, 2), (3, 2), (2, 2)]
    base = batch["y"].untyped_storage().data_ptr()
    assert all(p["y"].untyped_storage().data_ptr() == base for p in pieces)
    assert torch.equal(torch.cat([p["y"] for p in pieces]), batch["y"])


def test_split_refuses_outputs_whose_rows_do_not_match():
    with pytest.raises(RuntimeError):
        split_outputs({"y": torch.zeros(3, 2)}, [1, 1])
    with pytest.raises(ValueError, match="output 's' has 3 rows"):
        split_outputs({"s": BytesTensor([b"a", b"b", b"c"], (3,))}, [1, 1])


def test_stack_concatenates_each_input_once():
    parts = [
        {"x": torch.full((n, 2), float(n)), "s": BytesTensor([b"%d" % n] * n, (n,))} for n in (1, 2)
    ]
    stacked = stack_parts(parts)
    assert torch.equal(stacked["x"], torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]))
    assert stacked["s"].items == [b"1", b"2", b"2"] and stacked["s"].shape == (3,)


def test_errors_come_back_to_the_caller_and_the_thread_keeps_serving():
    def picky(inputs):
        if float(inputs["x"].sum()) < 0:
            raise ValueError("negative")
        return {"y": inputs["x"]}

    async def main():
        worker = InstanceWorker(picky, intra_op_threads=1)
        try:
            with pytest.raises(ValueError, match="negative"):
                await batch(worker, {"x": -torch.ones(1)})
            return await batch(worker, {"x": torch.ones(1)})
        finally:
            worker.close()

    assert torch.equal(run(main())["y"], torch.ones(1))


def test_close_joins_the_thread_and_refuses_more_work():
    worker = InstanceWorker(lambda inputs: dict(inputs), intra_op_threads=1, name="to-close")
    assert any(t.name == "to-close" for t in threading.enumerate())
    assert worker.close(timeout=5.0) is True
    assert not any(t.name == "to-close" for t in threading.enumerate())
    assert worker.close() is True  # idempotent
    with pytest.raises(RuntimeError, match="'to-close' is closed"):
        run(batch(worker, {}))


def test_default_threads_split_the_cores_across_instances():
    cores = len(os.sched_getaffinity(0))
    assert default_intra_op_threads(1) == cores
    assert default_intra_op_threads(cores) == 1
    assert default_intra_op_threads(cores * 4) == 1


@pytest.mark.gpu
def test_a_cuda_instance_runs_on_its_own_stream():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    device = torch.device("cuda:0")

    def on_stream(inputs):
        stream = torch.cuda.current_stream(device)
        default = torch.cuda.default_stream(device)
        return {"y": inputs["x"].to(device) * 2, "own": torch.tensor([stream != default])}

    worker = InstanceWorker(on_stream, intra_op_threads=1, device=device)
    try:
        out = run(batch(worker, {"x": torch.ones(4, 2)}))
    finally:
        worker.close()
    assert bool(out["own"])
    assert torch.equal(out["y"].cpu(), torch.full((4, 2), 2.0))


def test_many_hops_in_a_row_keep_order_and_values():
    worker = InstanceWorker(lambda inputs: {"y": inputs["x"] + 1}, intra_op_threads=1)

    async def main():
        outs = await asyncio.gather(
            *(batch(worker, {"x": torch.tensor([float(i)])}) for i in range(200))
        )
        return [float(o["y"]) for o in outs]

    try:
        assert run(main()) == [float(i + 1) for i in range(200)]
    finally:
        worker.close()


def test_a_thread_budget_below_one_is_refused():
    with pytest.raises(ValueError, match="intra_op_threads must be >= 1"):
        InstanceWorker(lambda inputs: dict(inputs), intra_op_threads=0, name="bad")


def test_a_later_instance_cannot_change_an_earlier_ones_thread_budget():
    """torch seeds a thread's OpenMP team from the last set_num_threads() of any thread."""

    def probe(inputs):
        x = torch.ones(256, 256)
        x @ x  # a parallel op, after which the team size is fixed
        return {"n": torch.tensor([torch.get_num_threads()])}

    async def scenario():
        two = InstanceWorker(probe, 2, None, "two")
        one = InstanceWorker(probe, 1, None, "one")  # created after, before `two` ever ran
        try:
            return (await batch(two, {}))["n"].item(), (await batch(one, {}))["n"].item()
        finally:
            two.close()
            one.close()

    assert asyncio.run(scenario()) == (2, 1)


def test_inline_executor_serves_a_batcher_on_the_loop_thread():
    from edgeserve.serving.batching import AdaptiveBatcher
    from edgeserve.serving.worker import InlineExecutor
    from edgeserve.types import BatchingSettings, InferRequest

    seen_threads = []

    def double(inputs):
        seen_threads.append(threading.get_ident())
        if bool((inputs["x"] < 0).any()):
            raise ValueError("negative")
        return {"y": inputs["x"] * 2}

    async def scenario():
        settings = BatchingSettings(max_batch_size=8, max_queue_delay_ms=1.0, max_queue_size=16)
        batcher = AdaptiveBatcher("m", "1", settings, [InlineExecutor(double)])
        requests = [InferRequest("m", "1", {"x": torch.full((1, 2), float(i))}) for i in range(5)]
        bad = InferRequest("m", "1", {"x": torch.full((1, 2), -1.0)})
        ok = await asyncio.gather(*(batcher.submit(r) for r in requests))
        failed = await asyncio.gather(batcher.submit(bad), return_exceptions=True)
        await batcher.close()
        return threading.get_ident(), ok, failed

    loop_thread, ok, failed = asyncio.run(scenario())
    assert [r.outputs["y"][0, 0].item() for r in ok] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert set(seen_threads) == {loop_thread}
    assert len(failed) == 1 and isinstance(failed[0], Exception)


def test_a_refused_request_fails_alone_in_a_shared_batch():
    from edgeserve.errors import InvalidArgument
    from edgeserve.serving.batching import AdaptiveBatcher
    from edgeserve.types import BatchingSettings, InferRequest

    gate = threading.Event()
    batch_rows = []

    def model(inputs):
        gate.wait(5)  # hold the first batch so that the rest queue up together
        batch_rows.append(int(inputs["x"].shape[0]))
        if bool((inputs["x"] < 0).any()):
            raise InvalidArgument.for_input("m", "x", "negative values are refused")
        return {"y": inputs["x"] + 1}

    async def scenario():
        settings = BatchingSettings(max_batch_size=8, max_queue_delay_ms=1.0, max_queue_size=16)
        batcher = AdaptiveBatcher("m", "1", settings, [InstanceWorker(model, 1, None, "w")])
        first = asyncio.ensure_future(
            batcher.submit(InferRequest("m", "1", {"x": torch.ones(1, 2)}))
        )
        await asyncio.sleep(0)
        values = [2.0, -1.0, 3.0, 4.0]
        rest = [
            asyncio.ensure_future(
                batcher.submit(InferRequest("m", "1", {"x": torch.full((1, 2), v)}))
            )
            for v in values
        ]
        while batcher.queue_depth < len(values):  # all four queued behind the held batch
            await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert 4 in batch_rows, f"the four queued requests never shared a batch: {batch_rows}"
    assert isinstance(results[2], InvalidArgument)
    good = [r for i, r in enumerate(results) if i != 2]
    assert [r.outputs["y"][0, 0].item() for r in good] == [2.0, 3.0, 4.0, 5.0]
