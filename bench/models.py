"""Build the bench's signed archives (run in a child: ``python -m bench.models``).

    python -m bench.models --work DIR --key KEY.pem [mlp mlp-int8 cnn ...]

Each archive packages a factory of bench/model_defs.py with ``edgeserve.packager.build``
(scripted; ``mlp-int8`` dynamically quantized) with the built-in ``tensor`` handler (what
a user gets by default, so the bench measures the default execution path: a model cheap
enough runs inline on the event loop only with that handler), ``max_batch_size`` 32, and
is signed with KEY. Prints one JSON line:
``{key: {"archive": path, "seconds": build time}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from bench.catalog import INPUT_NAME, MAX_BATCH_SIZE, MODELS

HERE = Path(__file__).resolve().parent


def build_one(key: str, work: Path, sign_key: Path) -> dict[str, object]:
    from edgeserve.packager.build import build_archive

    spec = MODELS[key]
    archive = spec.archive(work)
    archive.parent.mkdir(parents=True, exist_ok=True)
    example = work / "archives" / f"{key}-example.npy"
    np.save(example, np.concatenate([spec.example(0), spec.example(1)]))
    started = time.monotonic()
    build_archive(
        f"{HERE / 'model_defs.py'}:{spec.factory}",
        name=key,
        version="1",
        output=archive,
        example_inputs=[(INPUT_NAME, example)],
        quantize="dynamic" if spec.quantize else None,
        max_batch_size=MAX_BATCH_SIZE,
        sign_key=sign_key,
    )
    return {"archive": str(archive), "seconds": round(time.monotonic() - started, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True, help="private signing key (PEM)")
    parser.add_argument("models", nargs="*", default=list(MODELS))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    report = {key: build_one(key, args.work, args.key) for key in args.models}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
