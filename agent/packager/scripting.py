"""The packager's model: a MODEL argument made TorchScript, and run on example tensors.

    load_torchscript(path)                           a TorchScript file, as is
    script_eager(path, factory, examples, engine)    ``factory()`` from ``path`` (an eager
                                                     ``nn.Module``), optionally dynamically
                                                     quantized, then scripted, or traced
                                                     with the examples when scripting fails
    pick_engine() / use_engine(engine)               the quantized engine of this platform
                                                     (x86/fbgemm, qnnpack on ARM)
    run_module(module, tensors, what)                one run; the model's errors become
                                                     ArchiveError naming ``what``

Every failure is an ``ArchiveError`` that names the MODEL argument and says what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import platform
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from edgeserve.errors import ArchiveError

log = logging.getLogger("edgeserve.packager")


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """A TorchScript file on the CPU; ArchiveError when it is missing or not TorchScript."""
    if not path.is_file():
        raise ArchiveError(
            f"MODEL '{path}' is not a file (give a TorchScript file or module.py:factory)"
        )
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError / ValueError / pickle errors
        raise ArchiveError(
            f"MODEL '{path}' is not a TorchScript file ({type(exc).__name__}); an eager model "
            "is given as module.py:factory"
        ) from None


def script_eager(
    path: Path, factory: str, examples: list[torch.Tensor], engine: str | None
) -> torch.jit.ScriptModule:
    """``factory()`` from ``path``, quantized with ``engine`` when given, then scripted
    (or traced with ``examples`` when scripting fails)."""
    what = f"{path}:{factory}"
    with _user_module(path, factory) as module:
        if engine is not None:
            module = _quantize_dynamic(module, what)
        try:
            return torch.jit.script(module)
        except Exception as exc:  # scripting fails in many ways; tracing is the fallback
            script_problem = first_line(exc)
        if not examples:
            raise ArchiveError(
                f"MODEL '{what}' cannot be scripted ({script_problem}) and there is no "
                "--example-input to trace it with"
            )
        log.info("scripting %s failed (%s); tracing it", what, script_problem)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                traced = torch.jit.trace(module, tuple(examples))
        except Exception as exc:
            raise ArchiveError(
                f"MODEL '{what}' can be neither scripted ({script_problem}) "
                f"nor traced ({first_line(exc)})"
            ) from None
        for item in caught:  # TracerWarnings say where the trace may not generalise
            log.warning("tracing %s: %s", what, first_line(item.message))
        return traced


@contextlib.contextmanager
def _user_module(path: Path, factory: str) -> Iterator[torch.nn.Module]:
    """``factory()`` from the file ``path``, its module registered while it is scripted."""
    what = f"{path}:{factory}"
    if not path.is_file():
        raise ArchiveError(f"MODEL '{what}': '{path}' is not a file")
    # Named by content: the same source gives the same TorchScript type names.
    module_name = f"_edgeserve_model_{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ArchiveError(f"MODEL '{what}': cannot import '{path}'")
    source = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = source  # scripting reads class sources through sys.modules
    try:
        try:
            spec.loader.exec_module(source)
            build = getattr(source, factory, None)
            made = build() if callable(build) else None
        except Exception as exc:  # user code
            raise ArchiveError(f"MODEL '{what}' raised {type(exc).__name__}: {exc}") from exc
        if not callable(build):
            raise ArchiveError(f"MODEL '{what}': '{path}' has no callable '{factory}'")
        if not isinstance(made, torch.nn.Module):
            raise ArchiveError(
                f"MODEL '{what}' returned {type(made).__name__}, not a torch.nn.Module"
            )
        yield made.eval()
    finally:
        sys.modules.pop(module_name, None)


def first_line(exc: object) -> str:
    """The first line of an error from user or model code, cut at 200 characters."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def run_module(module: torch.jit.ScriptModule, tensors: Sequence[torch.Tensor], what: str) -> Any:
    """The module's result on ``tensors`` (inference mode); ArchiveError naming ``what``."""
    try:
        with torch.inference_mode():
            return module(*tensors)
    except Exception as exc:  # the model's own code
        raise ArchiveError(f"the model failed on the {what}: {first_line(exc)}") from None


# -- quantization -------------------------------------------------------------------------


def pick_engine() -> str:
    """The quantized engine that fits this platform: x86/fbgemm, qnnpack on ARM."""
    supported = torch.backends.quantized.supported_engines
    machine = platform.machine().lower()
    arm = machine.startswith(("arm", "aarch64"))
    preferred = ("qnnpack",) if arm else ("x86", "fbgemm")
    for engine in preferred:
        if engine in supported:
            return engine
    raise ArchiveError(
        f"--quantize dynamic: this torch on {machine} supports none of "
        f"{list(preferred)} (it has {supported})"
    )


@contextlib.contextmanager
def use_engine(engine: str | None) -> Iterator[None]:
    """Make ``engine`` torch's quantized engine for the block (None: leave it)."""
    if engine is None:
        yield
        return
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _quantize_dynamic(module: torch.nn.Module, what: str) -> torch.nn.Module:
    from torch.ao.nn.quantized import dynamic as nnqd
    from torch.ao.quantization import quantize_dynamic

    layers: set[type[torch.nn.Module]] = {torch.nn.Linear, torch.nn.LSTM, torch.nn.GRU}
    with warnings.catch_warnings():
        # torch 2.13 deprecates the quantized tensor API that torch.ao dynamic quantization
        # is built on (DESIGN.md section 5); the warning says nothing about this model.
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        quantized = quantize_dynamic(module, layers, dtype=torch.qint8)
    if not any(isinstance(m, nnqd.Linear | nnqd.LSTM | nnqd.GRU) for m in quantized.modules()):
        raise ArchiveError(
            f"--quantize dynamic: MODEL '{what}' has no Linear, LSTM or GRU layer to quantize"
        )
    return quantized
