"""Fixtures: a real grpc.aio inference server over real tiny TorchScript models.

The server runs on its own event loop in a background thread, so that synchronous stock
clients (tritonclient) can call it from the test thread. Models are ``LiveModel``s whose
``submit`` runs a scripted module in a worker thread, standing in for the batcher.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeserve.serving.registry import ModelRegistry
from tests.api.support import Api, LoopThread, Recorder, standard_models, start_api


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture(scope="session")
def api(loop_thread: LoopThread) -> Iterator[Api]:
    folder = Path(tempfile.mkdtemp(prefix="es-api-"))  # short: UDS paths stay < 108 bytes
    recorder = Recorder()
    registry = ModelRegistry()
    for model, make_default in standard_models(recorder):
        registry.add(model, make_default=make_default)
    ready = [True]
    server, socket_path, tcp = start_api(loop_thread, registry, folder, ready)
    try:
        yield Api(loop_thread, registry, server, socket_path, tcp, recorder, ready)
    finally:
        loop_thread.run(server.stop(1.0))
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="es-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
