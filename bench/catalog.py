"""The bench's models as the orchestrator sees them (no torch here: it runs in a child).

Archives are built by ``python -m bench.models`` in a child process, so the process that
drives the load never imports torch (no OpenMP threads, ~200 MB less beside the daemon).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.proto import kserve_v2_pb2 as pb

INPUT_NAME = "x"
MAX_BATCH_SIZE = 32
VARIANTS = "edgeserve-1thread"
TELEMETRY_ON, TELEMETRY_OFF = "edgeserve-telemetry-on", "edgeserve-telemetry-off"
TELEMETRY_UPLOAD = "edgeserve-telemetry-upload"
PEERS = "edgeserve-peers"
"""The daemon of issue 12's two models alone (their idle RSS is compared with TorchServe's)."""
TORCHSERVE = "torchserve"
"""Served by TorchServe (bench/torchserve.py), not by edgeserve."""
DAEMON_TELEMETRY: dict[str, dict[str, Any]] = {
    # Conservative: a rollup every second and a sample every 0.1 s (the smallest allowed),
    # 10x and 10x more often than the defaults; no broker, so the buffer only fills.
    TELEMETRY_ON: {"enabled": True, "interval_s": 1, "sample_every_s": 0.1},
    TELEMETRY_OFF: {"enabled": False},
    # The upload case (bench/telemetry_upload.py): the same rates, the default upload
    # batch and rate cap, and a broker the bench starts and stops (``fleet.broker``).
    TELEMETRY_UPLOAD: {
        "enabled": True,
        "interval_s": 1,
        "sample_every_s": 0.1,
        "batch_bytes": 65536,
        "upload_bytes_per_s": 65536,
    },
}
"""The ``telemetry:`` section of a bench daemon; the others keep the defaults (on)."""
_COUNTERS = struct.Struct("<qq")  # the layout bench/torchserve_handler.py writes


@dataclass(frozen=True)
class ModelSpec:
    key: str
    """Served model name and case prefix."""
    factory: str
    """Factory in bench/model_defs.py."""
    input_shape: tuple[int, ...]
    """One request's input, batch dimension first (1)."""
    output_shape: tuple[int, ...]
    quantize: str | None = None
    batching: dict[str, Any] = field(default_factory=dict)
    """Per-model ``batching:`` config of the daemon."""
    raw_as: str | None = None
    """Measure raw torch on this other model instead (same module)."""
    daemon: str = "edgeserve"
    """Which bench daemon serves it. The thread-budget variants get their own: in one
    process, an instance's first batch resets its OpenMP thread count to whatever
    ``torch.set_num_threads`` was called with last, in any thread (ATen's per-thread
    lazy init), so mixed intra-op budgets in one daemon are not what they say."""
    raw: bool = True
    """Measure raw torch for it (``raw_key``) in every repeat."""
    baseline: str | None = None
    """A model key this one is compared with, case for case (same transport and load)."""
    opt_in: bool = False
    """Its cases run only when ``--only`` names them (not in the default run)."""
    isolated: bool = False
    """The other servers are paused (SIGSTOP) during its windows: an idle daemon that
    samples 10 times a second would otherwise load the machine of the case it is
    compared with."""
    peer_of: str | None = None
    """TorchServe registrations: the edgeserve model whose TorchScript file it serves."""
    peer_batch: tuple[int, int] = (1, 0)
    """TorchServe registrations: (batchSize, maxBatchDelay ms); (1, 0): no batching."""

    @property
    def on_torchserve(self) -> bool:
        return self.daemon == TORCHSERVE

    @property
    def raw_key(self) -> str:
        return self.raw_as or self.key

    def archive(self, work: Path) -> Path:
        return work / "archives" / f"{self.key}.esar"

    def counter_file(self, work: Path) -> Path:
        return work / "counters" / f"{self.key}.bin"

    def example(self, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.standard_normal(self.input_shape).astype(np.float32)

    def payload(self) -> bytes:
        """A serialized ModelInferRequest with raw FP32 contents for one sample (built
        here: ``edgeserve.api.client`` would import torch into the load processes)."""
        request = pb.ModelInferRequest(model_name=self.key)
        request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=list(self.input_shape))
        request.raw_input_contents.append(self.example().tobytes())
        return bytes(request.SerializeToString())


MODELS: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        ModelSpec("mlp", "build_mlp", (1, 64), (1, 10)),
        ModelSpec(
            "mlp-nobatch",
            "build_mlp",
            (1, 64),
            (1, 10),
            batching={"max_batch_size": 1},
            raw_as="mlp",
        ),
        ModelSpec("mlp-int8", "build_mlp", (1, 64), (1, 10), quantize="dynamic"),
        ModelSpec("cnn", "build_cnn", (1, 3, 32, 32), (1, 10)),
        # Thread-budget variants of the same modules (DESIGN.md section 4): what a
        # different instances x intra-op split does when client and server share 2 cores.
        ModelSpec(
            "mlp-t1",
            "build_mlp",
            (1, 64),
            (1, 10),
            batching={"intra_op_threads": 1},
            raw_as="mlp",
            daemon=VARIANTS,
        ),
        ModelSpec(
            "cnn-2x1",
            "build_cnn",
            (1, 3, 32, 32),
            (1, 10),
            batching={"instances": 2, "intra_op_threads": 1},
            raw_as="cnn",
            daemon=VARIANTS,
        ),
        # Telemetry on vs off (issue 9): the tiny MLP, each on a daemon of its own.
        ModelSpec(
            "mlp-telon",
            "build_mlp",
            (1, 64),
            (1, 10),
            raw=False,
            daemon=TELEMETRY_ON,
            baseline="mlp-teloff",
            opt_in=True,
            isolated=True,
        ),
        ModelSpec(
            "mlp-teloff",
            "build_mlp",
            (1, 64),
            (1, 10),
            raw=False,
            daemon=TELEMETRY_OFF,
            opt_in=True,
            isolated=True,
        ),
        # Issue 12's models on a daemon of their own, and on TorchServe in its two
        # configurations (batch 32 / 5 ms and no batching; one worker each).
        ModelSpec("mlp-peer", "build_peer_mlp", (1, 256), (1, 10), daemon=PEERS, opt_in=True),
        ModelSpec("cnn-peer", "build_peer_cnn", (1, 3, 64, 64), (1, 10), daemon=PEERS, opt_in=True),
        *[
            ModelSpec(
                f"ts-{kind}-{label}",
                f"build_peer_{kind}",
                shape,
                (1, 10),
                raw_as=f"{kind}-peer",
                daemon=TORCHSERVE,
                opt_in=True,
                peer_of=f"{kind}-peer",
                peer_batch=batch,
            )
            for kind, shape in (("mlp", (1, 256)), ("cnn", (1, 3, 64, 64)))
            for label, batch in (("b32", (32, 5)), ("nb", (1, 0)))
        ],
        # Inference while the telemetry backlog uploads vs upload idle (issue 9).
        ModelSpec(
            "mlp-telup",
            "build_mlp",
            (1, 64),
            (1, 10),
            raw=False,
            daemon=TELEMETRY_UPLOAD,
            opt_in=True,
            isolated=True,
        ),
    )
}


def build_archives(work: Path, key_file: Path, keys: list[str]) -> dict[str, Any]:
    """Build the archives of ``keys`` in a child process; returns its report."""
    command = [sys.executable, "-m", "bench.models", "--work", str(work), "--key", str(key_file)]
    done = subprocess.run(
        [*command, *keys], check=True, capture_output=True, text=True, timeout=600
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def read_counters(path: Path) -> tuple[int, int]:
    """(batches, rows) TorchServe's bench handler has written so far."""
    data = path.read_bytes()
    return _COUNTERS.unpack(data[: _COUNTERS.size]) if len(data) >= _COUNTERS.size else (0, 0)


def reset_counters(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(_COUNTERS.size))
