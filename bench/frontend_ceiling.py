"""The most several front-end processes could give on this machine, measured first.

    python -m bench.frontend_ceiling [--processes 1,2] [--in-flight 32] [--duration 4]
                                     [--repeats 3]

Issue 12's second lever is to spread the gRPC front end over processes (SO_REUSEPORT on
TCP) that hand decoded tensors to the model process. Before building that, this measures
its ceiling here: N echo servers (``bench.echo --reuseport``: a fixed reply, no model, no
hand-off, so each costs less per request than any real front end could) share one
loopback TCP port and are driven at the same total in flight by ``--load-processes``
load processes (default 4 x the largest N), each with its own connection. The kernel
spreads *connections* over the processes by a hash, not calls: with few connections the
spread is uneven (one client channel is one connection, served by one front end), so
each window's share of the servers' CPU per process is printed. The levels of N are
interleaved in every repeat so they see the same machine.

Printed per N: median req/s, the servers' cores and CPU microseconds per request, the
load processes' cores, and req/s / that of one server. A ratio near N says extra front
ends would pay here; near 1 says the machine (cores shared with the load, as with the
apps on a device) is the limit, and a multi-process front end could only add its
hand-off cost.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass

import grpc
import psutil

from bench.catalog import MODELS
from bench.loadgen import LoadPool, LoadSpec
from bench.server import free_port
from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.proto import kserve_v2_pb2_grpc as pb_grpc


@dataclass
class Level:
    """One measured window at N front-end processes."""

    processes: int
    throughput: float
    server_cores: float
    client_cores: float
    cores_per_process: list[float]

    @property
    def server_us_per_request(self) -> float:
        return self.server_cores / self.throughput * 1e6 if self.throughput else float("nan")


class EchoGroup:
    """``count`` echo processes bound to one loopback port with SO_REUSEPORT."""

    def __init__(self, count: int, timeout: float = 60.0) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "bench.echo", "--listen", self.address, "--reuseport"]
        self._popen = [
            subprocess.Popen(command, stdout=subprocess.DEVNULL)  # noqa: S603 - ours
            for _ in range(count)
        ]
        self.processes = [psutil.Process(p.pid) for p in self._popen]
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        # Every process must have bound before the load connects, or the first ones
        # would get all the connections: wait until each has its listening socket.
        deadline = time.monotonic() + timeout
        port = int(self.address.rsplit(":", 1)[1])
        for process in self.processes:
            while not any(
                c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                for c in process.net_connections("tcp")
            ):
                if time.monotonic() > deadline or not process.is_running():
                    raise SystemExit(f"echo process {process.pid} did not listen in time")
                time.sleep(0.05)
        with grpc.insecure_channel(self.address) as channel:
            ready = pb_grpc.GRPCInferenceServiceStub(channel).ServerReady
            ready(pb.ServerReadyRequest(), timeout=max(1.0, deadline - time.monotonic()))

    def cpu_seconds(self) -> list[float]:
        return [sum(p.cpu_times()[:2]) for p in self.processes]

    def stop(self) -> None:
        for process in self._popen:
            process.terminate()
        for process in self._popen:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def measure(pool: LoadPool, processes: int, in_flight: int, duration_s: float) -> Level:
    group = EchoGroup(processes)
    try:
        spec = LoadSpec(
            address=group.address,
            kind="closed",
            payload=MODELS["mlp"].payload(),
            concurrency=in_flight,
            warmup_s=0.5,
            duration_s=duration_s,
        )
        before = group.cpu_seconds()
        result = pool.run(spec, lambda: sum(group.cpu_seconds()))
        after = group.cpu_seconds()
    finally:
        group.stop()
    # Whole-run CPU per process (warm-up included): only to show each one served.
    spent = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(spent) or 1.0
    return Level(
        processes,
        result.throughput,
        result.cpu.server,
        result.cpu.client,
        [s / total for s in spent],
    )


def run(
    levels: list[int], in_flight: int, duration_s: float, repeats: int, load_processes: int
) -> list[Level]:
    """Every level once per repeat, interleaved; the median window of each level."""
    found: dict[int, list[Level]] = {n: [] for n in levels}
    with LoadPool(load_processes) as pool:
        for _ in range(repeats):
            for n in levels:
                found[n].append(measure(pool, n, in_flight, duration_s))
    medians = []
    for n in levels:
        ordered = sorted(found[n], key=lambda level: level.throughput)
        medians.append(ordered[len(ordered) // 2])
    return medians


def report(levels: list[Level]) -> str:
    base = levels[0].throughput or float("nan")
    lines = ["front ends   req/s   server cores  us/req  load cores  / first  share per process"]
    for level in levels:
        shares = " ".join(f"{s:.2f}" for s in level.cores_per_process)
        lines.append(
            f"{level.processes:10d} {level.throughput:7.0f} {level.server_cores:14.2f} "
            f"{level.server_us_per_request:7.0f} {level.client_cores:11.2f} "
            f"{level.throughput / base:8.2f}  {shares}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frontend_ceiling", description=__doc__)
    parser.add_argument("--processes", default="1,2", help="front-end process counts")
    parser.add_argument("--in-flight", type=int, default=32, help="requests in flight in total")
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--load-processes", type=int, default=0, help="default: 4 x the largest count"
    )
    args = parser.parse_args(argv)
    try:
        levels = [int(n) for n in args.processes.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1 or args.in_flight < 1 or args.repeats < 1:
        parser.error(
            "--processes: counts of at least 1, comma-separated; --in-flight and "
            "--repeats: at least 1"
        )
    started = time.monotonic()
    load = args.load_processes if args.load_processes > 0 else 4 * max(levels)
    found = run(levels, args.in_flight, args.duration, args.repeats, min(load, args.in_flight))
    print(report(found))
    print(
        f"medians of {args.repeats} repeat(s), {args.in_flight} in flight from "
        f"{min(load, args.in_flight)} load processes over loopback TCP, "
        f"{psutil.cpu_count()} CPUs, in {time.monotonic() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
