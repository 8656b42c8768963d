"""perf_analyzer (NVIDIA's C++ load generator, shipped in the tritonclient wheel) against a
real daemon, as ``python -m bench --client perf_analyzer`` runs it.

It needs ``libb64.so.0d`` (Debian ``libb64-0d``) and ``libcudart.so.12`` (PyPI
``nvidia-cuda-runtime-cu12``), which .ci/run installs: the run test skips where they are
missing, except under ``EDGESERVE_CI=1``, where a skip would hide a gap and it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from bench import perf_analyzer
from bench.cases import perf_analyzer_figures

STDOUT = """\
Request concurrency: 8
  Client: 
    Request count: 7430
    Throughput: 2061.43 infer/sec
    Avg latency: 3876 usec (standard deviation 1168 usec)
    p50 latency: 3955 usec
    p90 latency: 4912 usec
    p95 latency: 5567 usec
    p99 latency: 8341 usec
Inferences/Second vs. Client Average Batch Latency
Concurrency: 8, throughput: 2061.43 infer/sec, latency 3876 usec
"""
CSV = (
    "Concurrency,Inferences/Second,Client Send,Client Recv,"
    "p50 latency,p90 latency,p95 latency,p99 latency\n"
    "8,2061.43,4,1,3955,4912,5567,8341\n"
)


def _tool() -> perf_analyzer.Tool:
    try:
        return perf_analyzer.locate()
    except perf_analyzer.Unavailable as missing:
        if os.environ.get("EDGESERVE_CI"):  # .ci/run installs both libraries
            pytest.fail(f"perf_analyzer must run in CI: {missing}")
        pytest.skip(str(missing))


def test_the_csv_and_the_stdout_give_the_same_figures() -> None:
    from_csv = perf_analyzer.parse(CSV, "")
    from_stdout = perf_analyzer.parse("", STDOUT)
    assert from_csv == from_stdout
    assert from_csv["throughput"] == pytest.approx(2061.43)
    assert (from_csv["p50_ms"], from_csv["p99_ms"]) == (pytest.approx(3.955), pytest.approx(8.341))
    with pytest.raises(ValueError, match="no throughput"):
        perf_analyzer.parse("", "error: failed to get model config: Method not found!")


def test_open_and_stream_loads_become_perf_analyzer_options() -> None:
    tool = perf_analyzer.Tool(Path("/pa"), {})
    out = Path("x.csv")
    stream = perf_analyzer.command(
        tool, perf_analyzer.Load("unix:///s", "m", "stream", 32, duration_s=3), out
    )
    assert stream[stream.index("--concurrency-range") + 1] == "32" and "--streaming" in stream
    assert stream[stream.index("-p") + 1] == "1000"  # three windows of a third each
    opened = perf_analyzer.command(
        tool, perf_analyzer.Load("h:1", "m", "open", rate=450.0, duration_s=3), out
    )
    assert opened[opened.index("--request-rate-range") + 1] == "450.0"
    assert "poisson" in opened and "--concurrency-range" not in opened
    with pytest.raises(ValueError, match="rate"):
        perf_analyzer.command(tool, perf_analyzer.Load("h:1", "m", "open"), out)


@pytest.mark.slow
def test_perf_analyzer_drives_a_real_daemon_at_concurrency_1_and_8(
    daemons, mlp_archive_factory
) -> None:
    tool = _tool()
    daemon = daemons.start(mlp_archive_factory("1"))
    server = psutil.Process(daemon.process.pid)

    def server_cpu() -> float:
        times = server.cpu_times()
        return times.user + times.system

    for url, concurrency in ((daemon.tcp, 1), (daemon.uds_address, 8)):
        found = perf_analyzer.run(
            tool, perf_analyzer.Load(url, "mlp", "closed", concurrency, duration_s=1.5), server_cpu
        )
        assert found["throughput"] > 0, found
        assert 0 < found["p50_ms"] <= found["p90_ms"] <= found["p99_ms"], found
        assert found["server_cpu_s"] > 0 and found["client_cpu_s"] > 0, found
        figures = perf_analyzer_figures(found)
        assert figures["errors"] == {} and figures["server_us_per_request"] > 0
    # A model the daemon does not serve: perf_analyzer exits non-zero and says why.
    with pytest.raises(RuntimeError, match="exited with"):
        perf_analyzer.run(tool, perf_analyzer.Load(daemon.tcp, "nope", "closed", duration_s=0.6))
