"""TorchServe 0.12 as the bench's peer (``python -m bench --peers torchserve``).

* **Its own venv**, made on first use under the bench's cache
  (``$XDG_CACHE_HOME/edgeserve-bench/torchserve-0.12.0``, or ``~/.cache``):
  ``torchserve==0.12.0``, ``torch-model-archiver==0.12.0``, numpy and ``torch==2.13.0``,
  every one pinned and installed with the repository's ``constraints.txt``; the venv is
  refused if its torch is a CUDA build (the CPU wheel is what edgeserve runs).
* **Its gRPC stubs**: TorchServe's own ``inference.proto`` (and ``google/rpc/status.proto``
  it imports), read from the front end's jar in that venv and compiled with
  grpcio-tools into the cache; nothing of theirs is kept in this repository.
* **Its models**: the TorchScript file of the edgeserve archive of the same model (one
  module, two servers), packaged by ``torch-model-archiver`` with
  ``bench/torchserve_handler.py`` and a ``model-config.yaml`` per configuration: one
  worker, and either ``batchSize`` 32 / ``maxBatchDelay`` 5 ms or no batching.
* **The server**: ``torchserve --foreground`` with every configuration registered (one
  worker each), loopback only, token auth, system metrics and config snapshots off, no
  per-request access log or metric lines (warnings only: its fastest logging). The
  launcher's own Python process is not counted: the server is the Java front end and
  its workers.

Requests go to ``InferenceAPIsService/Predictions`` with the row's raw FP32 bytes as
``input["data"]``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench.server import Server, free_port

VERSION = "0.12.0"
REQUIREMENTS = (
    f"torchserve=={VERSION}",
    f"torch-model-archiver=={VERSION}",
    "numpy==2.4.6",
    "pyyaml==6.0.4",  # TorchServe's worker imports it without declaring it
    "torch==2.13.0",
)
METHOD = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
REPO = Path(__file__).resolve().parents[1]
HANDLER = Path(__file__).resolve().parent / "torchserve_handler.py"
_PROTOS = ("inference.proto", "google/rpc/status.proto")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeserve-bench" / f"torchserve-{VERSION}"


@dataclass(frozen=True)
class Setup:
    venv: Path
    stubs: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def _run(command: list[str], what: str, timeout: float, **kw: Any) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kw)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"{what} failed ({done.returncode}):\n" + "\n".join(tail))
    return done.stdout


def ensure_venv(cache: Path | None = None) -> Setup:
    """The TorchServe venv and stubs, made on first use (minutes), reused after."""
    cache = cache or cache_dir()
    venv, stubs = cache / "venv", cache / "stubs"
    marker = venv / ".bench-complete"
    wanted = "\n".join(REQUIREMENTS)
    if not marker.exists() or marker.read_text() != wanted:
        if shutil.which("java") is None:
            raise RuntimeError("TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)")
        print(f"  installing TorchServe in {venv} (first use; minutes) ...", flush=True)
        if not (venv / "bin" / "python").exists():
            _run([sys.executable, "-m", "venv", str(venv)], "venv", 300)
        pip = [str(venv / "bin" / "pip"), "install", "-q", "-c", str(REPO / "constraints.txt")]
        _run([*pip, *REQUIREMENTS], "pip install of TorchServe", 1800)
        cuda = _run(
            [str(venv / "bin" / "python"), "-c", "import torch; print(torch.version.cuda)"],
            "torch check",
            120,
        ).strip()
        if cuda != "None":
            raise RuntimeError(f"TorchServe's venv got a CUDA torch ({cuda}); want the CPU wheel")
        marker.write_text(wanted)
    setup = Setup(venv, stubs)
    if not (stubs / "inference_pb2.py").exists():
        _compile_stubs(setup)
    return setup


def _jar(setup: Setup) -> Path:
    found = sorted(setup.venv.glob("lib/python*/site-packages/ts/frontend/model-server.jar"))
    if not found:
        raise RuntimeError(f"no TorchServe front end jar in {setup.venv}")
    return found[0]


def _compile_stubs(setup: Setup) -> None:
    """TorchServe's inference.proto from its jar, compiled by grpcio-tools (ours)."""
    import grpc_tools

    protos = setup.stubs.parent / "proto"
    with zipfile.ZipFile(_jar(setup)) as jar:
        for name in _PROTOS:
            target = protos / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(jar.read(name))
    setup.stubs.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{protos}", f"-I{include}"]
    _run([*command, f"--python_out={setup.stubs}", *_PROTOS], "protoc", 120)


def payload(setup: Setup, model: str, row: bytes) -> bytes:
    """A serialized PredictionsRequest for ``model`` carrying ``row`` as ``data``."""
    if str(setup.stubs) not in sys.path:
        sys.path.insert(0, str(setup.stubs))
    import inference_pb2  # TorchServe's, compiled into the cache by _compile_stubs

    request = inference_pb2.PredictionsRequest(model_name=model, input={"data": row})
    return bytes(request.SerializeToString())


@dataclass(frozen=True)
class PeerModel:
    """One TorchServe registration: a model and one configuration."""

    name: str
    model_file: Path
    """The TorchScript file (taken from the edgeserve archive of the same model)."""
    row_shape: tuple[int, ...]
    batch_size: int
    max_batch_delay_ms: int
    counter_file: Path


def archive(setup: Setup, model: PeerModel, store: Path, work: Path) -> Path:
    folder = work / "ts-src" / model.name
    folder.mkdir(parents=True, exist_ok=True)
    peer = folder / "peer.json"
    peer.write_text(
        json.dumps({"row_shape": list(model.row_shape), "counter_file": str(model.counter_file)})
    )
    config = folder / "model-config.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        minWorkers: 1
        maxWorkers: 1
        batchSize: {model.batch_size}
        maxBatchDelay: {model.max_batch_delay_ms}
        responseTimeout: 120
        """)
    )
    store.mkdir(parents=True, exist_ok=True)
    command = [
        str(setup.bin("torch-model-archiver")),
        "--model-name", model.name, "--version", "1",
        "--serialized-file", str(model.model_file),
        "--handler", str(HANDLER),
        "--extra-files", str(peer),
        "--config-file", str(config),
        "--export-path", str(store), "--force",
    ]  # fmt: skip
    _run(command, f"torch-model-archiver {model.name}", 300)
    return store / f"{model.name}.mar"


def model_file_of(esar: Path, target: Path) -> Path:
    """The TorchScript member of an edgeserve archive, written to ``target``."""
    with zipfile.ZipFile(esar) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(zf.read(manifest["model_file"]))
    return target


_LOG_CONFIG = """\
<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off" additivity="false"/>
    <Logger name="TS_METRICS" level="off" additivity="false"/>
    <Logger name="MODEL_METRICS" level="off" additivity="false"/>
    <Logger name="MODEL_LOG" level="warn"/>
    <Root level="warn"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""
"""TorchServe's best case: no access log or metric lines per request (its default
configuration writes several per request, to files and the console); warnings kept."""


def _properties(store: Path, grpc_port: int, ports: list[int]) -> str:
    return textwrap.dedent(f"""\
        inference_address=http://127.0.0.1:{ports[0]}
        management_address=http://127.0.0.1:{ports[1]}
        metrics_address=http://127.0.0.1:{ports[2]}
        grpc_inference_address=127.0.0.1
        grpc_inference_port={grpc_port}
        grpc_management_address=127.0.0.1
        grpc_management_port={ports[3]}
        disable_token_authorization=true
        disable_system_metrics=true
        default_workers_per_model=1
        job_queue_size=1000
        model_store={store}
        """)


def start(setup: Setup, work: Path, models: list[PeerModel], timeout: float = 600.0) -> Server:
    """Start TorchServe with every model registered; returns once each answers."""
    home = work / "torchserve"
    store = home / "store"
    mars = [archive(setup, model, store, work) for model in models]
    grpc_port = free_port()
    config = home / "config.properties"
    ports = [free_port() for _ in range(4)]
    config.write_text(_properties(store, grpc_port, ports))
    tmp = home / "tmp"  # the launcher's pid file lives in TMPDIR: keep it private
    tmp.mkdir(parents=True, exist_ok=True)
    log_path = work / "torchserve.log"
    log_config = home / "log4j2.xml"
    log_config.write_text(_LOG_CONFIG)
    command = [
        str(setup.bin("torchserve")), "--start", "--foreground", "--ncs",
        "--log-config", str(log_config),
        "--disable-token-auth", "--ts-config", str(config), "--model-store", str(store),
        "--models", *[f"{m.name}={p.name}" for m, p in zip(models, mars, strict=True)],
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmp), "LOG_LOCATION": str(home / "logs")}
    env["METRICS_LOCATION"] = str(home / "logs")
    started = time.monotonic()
    with log_path.open("ab") as sink:
        process = subprocess.Popen(  # noqa: S603 - the venv's launcher, our arguments
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=home
        )
    address = f"127.0.0.1:{grpc_port}"
    server = Server("torchserve", process, "", address, log_path)
    server.extra["management_port"] = ports[1]
    try:
        server.root_pid = _java_pid(process, started + 60)
        _wait_models(server, setup, models, started + timeout)
    except BaseException:
        server.stop()
        raise
    server.ready_s = time.monotonic() - started
    return server


def _java_pid(launcher: subprocess.Popen[bytes], deadline: float) -> int:
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise RuntimeError(f"torchserve exited with {launcher.returncode}")
        for child in psutil.Process(launcher.pid).children():
            if "java" in child.name():
                return int(child.pid)
        time.sleep(0.1)
    raise RuntimeError("torchserve: no Java front end appeared")


def _wait_models(server: Server, setup: Setup, models: list[PeerModel], deadline: float) -> None:
    channel = grpc.insecure_channel(server.tcp)
    call = channel.unary_unary(METHOD)
    try:
        for model in models:
            row = bytes(4 * _count(model.row_shape))
            request = payload(setup, model.name, row)
            while True:
                if server.process.poll() is not None:
                    raise RuntimeError(f"torchserve exited:\n{server.log_tail()}")
                try:
                    call(request, timeout=5.0)
                    break
                except grpc.RpcError as error:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"torchserve: {model.name} not answering ({error.code().name}):\n"
                            f"{server.log_tail()}"
                        ) from None
                    time.sleep(0.5)
    finally:
        channel.close()


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def idle_rss_mb(server: Server, models: list[str]) -> float:
    """RSS (MiB) of the Java front end plus the workers of ``models`` (the management
    API names each worker's pid): TorchServe as deployed for those models alone."""
    port = server.extra["management_port"]
    total = psutil.Process(server.pid).memory_info().rss
    for name in models:
        url = f"http://127.0.0.1:{port}/models/{name}"
        with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - loopback
            described = json.loads(reply.read())
        for worker in described[0]["workers"]:
            total += psutil.Process(int(worker["pid"])).memory_info().rss
    return total / 2**20
