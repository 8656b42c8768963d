"""bench/profile.py puts each sample's owner into issue 12's groups."""

from __future__ import annotations

from bench.profile import group, summarize_stacks


def test_owners_fall_into_the_groups_a_cut_would_change() -> None:
    assert group("grpc (Cython/C core)") == "grpc's own work"
    assert group("asyncio (C)") == group("selectors") == "asyncio bookkeeping"
    assert group("edgeserve.api.codec") == group("edgeserve.api.tensor_contents")
    assert group("edgeserve.api.codec") == "edgeserve codec"
    assert group("edgeserve.api.bounds") == group("edgeserve.api.inference")
    assert group("edgeserve.serving.batch_queue") == group("edgeserve.serving.registry")
    assert group("edgeserve.serving.worker") != group("edgeserve.serving.batching")
    assert group("edgeserve.telemetry.recorders") == "edgeserve recorders and telemetry"
    assert group("edgeserve.handlers.tensor") == group("torch")
    assert group("edgeserve.fleet.link") == "edgeserve (other)"
    assert group("python runtime") == "other"


def test_group_shares_follow_the_owner_of_each_sample() -> None:
    stacks = (
        "thread (7): MainThread;run (asyncio/base_events.py:1);"
        "0x1 (grpc/_cython/cygrpc.so);sendmsg (libc.so.6) 2\n"
        "thread (7): MainThread;run (asyncio/base_events.py:1);"
        "_infer (agent/api/inference.py:3);decode_infer_request (agent/api/codec.py:5) 1\n"
        "thread (7): MainThread;_run_once (asyncio/base_events.py:9) 1\n"
    )
    groups = dict(summarize_stacks(stacks)["groups"])
    assert groups == {
        "grpc's own work": 0.5,
        "edgeserve codec": 0.25,
        "asyncio bookkeeping": 0.25,
    }
