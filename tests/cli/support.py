"""Running ``edgeserve`` in-process, as the fixtures and the CLI tests do.

``edgeserve(...)`` is ``main([...])`` with stdout and stderr captured: the fixtures build
their keys and archives through it, so every daemon test also runs ``keygen`` and
``package`` the way a user types them. ``package_argv`` spells the packaging options of
``build_archive`` as command-line flags.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeserve.cli import main


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str


def edgeserve(*argv: str | Path) -> Outcome:
    """``edgeserve ARGV`` in this process; its exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Outcome(code, out.getvalue(), err.getvalue())


def edgeserve_ok(*argv: str | Path) -> str:
    """``edgeserve ARGV``, which must succeed; its stdout."""
    done = edgeserve(*argv)
    if done.code != 0:
        shown = " ".join(str(a) for a in argv)
        raise AssertionError(f"`edgeserve {shown}` exited {done.code}:\n{done.err}{done.out}")
    return done.out


def keygen(prefix: Path) -> tuple[Path, Path]:
    """``edgeserve keygen --out PREFIX``: (PREFIX.key, PREFIX.pub)."""
    edgeserve_ok("keygen", "--out", prefix)
    return Path(f"{prefix}.key"), Path(f"{prefix}.pub")


InputArg = Path | tuple[str, Path]

_VALUE_FLAGS = {
    "handler": "--handler",
    "quantize": "--quantize",
    "max_batch_size": "--max-batch-size",
    "max_queue_delay_ms": "--max-queue-delay-ms",
    "sign_key": "--sign-key",
    "from_mar": "--from-mar",
}


def package_argv(
    model: str | Path | None,
    *,
    output: Path,
    name: str | None = None,
    version: str | None = None,
    example_inputs: Sequence[InputArg] = (),
    sample_inputs: Sequence[InputArg] = (),
    extra_files: Iterable[Path] = (),
    handler_config: dict[str, Any] | None = None,
    **options: Any,
) -> list[str]:
    """The ``edgeserve package`` command line for ``build_archive``'s keyword arguments."""
    argv = ["package"] + ([str(model)] if model else []) + ["-o", str(output)]
    if name is not None:
        argv += ["--name", name]
    if version is not None:
        argv += ["--version", version]
    argv += [a for item in example_inputs for a in ("--example-input", _named(item))]
    argv += [a for item in sample_inputs for a in ("--sample-input", _named(item))]
    argv += [a for path in extra_files for a in ("--extra-file", str(path))]
    if handler_config is not None:
        argv += ["--handler-config", json.dumps(handler_config)]
    for key, value in options.items():
        if key not in _VALUE_FLAGS:
            raise TypeError(f"package_argv: no command-line flag for '{key}'")
        if value is not None:
            argv += [_VALUE_FLAGS[key], str(value)]
    return argv


def package(model: str | Path | None, **kwargs: Any) -> Path:
    """``edgeserve package ...`` (``package_argv``'s arguments), which must succeed."""
    edgeserve_ok(*package_argv(model, **kwargs))
    return Path(kwargs["output"])


def _named(item: InputArg) -> str:
    return f"{item[0]}={item[1]}" if isinstance(item, tuple) else str(item)
