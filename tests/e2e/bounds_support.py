"""Helpers for the resource-bound tests against real daemons: a "wide" model whose
requests can reach the message limit, raw KServe requests, and what the kernel says about
a process (resident memory, open descriptors) and about idle sockets."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgeserve.proto import kserve_v2_pb2 as pb
from tests.cli.support import package
from tests.conftest import SLOW_HANDLER_SOURCE

WIDTH = 1 << 20
"""Floats per row of the wide model: 4 MiB a row, 16 MiB for its largest request."""
MAX_BATCH = 4
MESSAGE_LIMIT = 20 << 20
"""``server.max_message_bytes`` of these daemons: one largest request (16 MiB) fits."""

_WIDE_SOURCE = """\
from torch import nn


class Twice(nn.Module):
    def forward(self, x):
        return x * 2


def build():
    return Twice().eval()
"""

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
"""The client connection preface and an empty SETTINGS frame: a connection that then says
nothing more is an idle HTTP/2 connection with no call."""


@pytest.fixture(scope="session")
def wide_archives(
    tmp_path_factory: pytest.TempPathFactory, signing_key: tuple[Path, Path]
) -> Callable[[str, float], Path]:
    """factory(name, sleep_s) -> a signed archive of ``x * 2`` over (-1, WIDTH) FP32 rows
    whose handler sleeps ``sleep_s`` per batch (cached)."""
    folder = tmp_path_factory.mktemp("wide")
    (folder / "wide.py").write_text(_WIDE_SOURCE)
    (folder / "slow.py").write_text(SLOW_HANDLER_SOURCE)
    example = folder / "x.npy"
    np.save(example, np.ones((1, WIDTH), np.float32))
    cache: dict[tuple[str, float], Path] = {}

    def make(name: str, sleep_s: float) -> Path:
        if (name, sleep_s) not in cache:
            out = folder / f"{name}-{len(cache)}.esar"
            package(
                f"{folder / 'wide.py'}:build",
                name=name,
                version="1",
                output=out,
                example_inputs=[("x", example)],
                handler=str(folder / "slow.py"),
                handler_config={"sleep_s": sleep_s},
                max_batch_size=MAX_BATCH,
                sign_key=signing_key[0],
            )
            cache[(name, sleep_s)] = out
        return cache[(name, sleep_s)]

    return make


def infer_request(model: str, rows: int, request_id: str = "") -> pb.ModelInferRequest:
    x = np.ones((rows, WIDTH), np.float32)
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def channel(address: str) -> grpc.Channel:
    """A channel with a connection of its own and room for the largest messages."""
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_send_message_length", MESSAGE_LIMIT),
            ("grpc.max_receive_message_length", MESSAGE_LIMIT),
        ],
    )


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class PeakRss:
    """Samples a process's resident memory every 10 ms in a thread; ``peak`` is the most."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, AssertionError):
                return


def idle_connections(address: str, count: int, *, preface: bool) -> list[socket.socket]:
    """``count`` TCP connections to ``host:port`` that send nothing (or only the HTTP/2
    preface) and never read."""
    host, port = address.rsplit(":", 1)
    opened = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=5)
        if preface:
            sock.sendall(HTTP2_PREFACE)
        opened.append(sock)
    return opened


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end has closed ``sock`` (anything it sent is read and dropped)."""
    sock.settimeout(0.01)
    try:
        while data := sock.recv(65536):
            del data
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def close_all(sockets: Iterator[socket.socket] | list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def start_daemon(daemons, *archives: Path, sections: dict[str, dict], **kwargs):  # noqa: ANN001, ANN201
    """``daemons.start`` with ``sections`` merged into the config file's sections."""
    import yaml

    original = daemons.config_text

    def config_text(*args: object) -> str:
        data = yaml.safe_load(original(*args))
        for key, values in sections.items():
            data.setdefault(key, {}).update(values)
        return yaml.safe_dump(data)

    daemons.config_text = config_text
    try:
        return daemons.start(*archives, **kwargs)
    finally:
        daemons.config_text = original
