"""Tensor names of the user's choosing: ``--input-name`` and ``--output-name``.

    named(specs, names, side) -> specs with those names, in order
    check_served(manifest, members)  a handler with a signature of its own takes none

So that a model matches a client that already exists (Triton's ``INPUT0``/``OUTPUT0``,
say) without rewriting it to return a dict. The names replace the defaults
(``input__0``..., ``output__0``...) of the model's own signature, which the manifest
stores and ModelMetadata shows. The rules:

- plain names (``NAMES_RE``: a letter or ``_``, then letters, digits, ``_ . -``; at most
  128 characters), unique, exactly one per input (or output), in the model's order;
- inputs are named either by ``--input-name`` or by ``NAME=`` in ``--example-input``;
- a model that returns a dict is matched to its outputs by key: its keys are the names;
- they name the model's signature, so a handler that serves a signature of its own (the
  image classifier's ``image`` in, ``scores``/``labels`` out) is refused with them
  (``check_served``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

from edgeserve.archive.manifest import Manifest
from edgeserve.errors import ArchiveError
from edgeserve.packager.samples import runtime_model
from edgeserve.types import TensorSpec

NAMES_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")

Side = Literal["input", "output"]


def named(
    specs: tuple[TensorSpec, ...], names: Sequence[str], side: Side, *, named_by: str = ""
) -> tuple[TensorSpec, ...]:
    """``specs`` renamed to ``names`` in order (unchanged when none are given);
    ``named_by`` says what names them already, if something does (then names are refused)."""
    if not names:
        return specs
    flag = f"--{side}-name"
    if named_by:
        raise ArchiveError(f"{flag}: {named_by}; name them one way")
    for name in names:
        if not NAMES_RE.match(name):
            shown = name if len(name) <= 40 else name[:37] + "..."
            raise ArchiveError(
                f"{flag} '{shown}': must be a letter or '_', then letters, digits, '_', '.', "
                "'-' (at most 128 characters)"
            )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ArchiveError(f"{flag}: {repeated} given more than once; names must be unique")
    if len(names) != len(specs):
        current = [spec.name for spec in specs]
        raise ArchiveError(
            f"{flag}: {len(names)} name(s) for the model's {len(specs)} {side}(s) "
            f"(in order: {current})"
        )
    return tuple(replace(spec, name=name) for spec, name in zip(specs, names, strict=True))


def check_served(manifest: Manifest, members: Mapping[str, bytes | Path]) -> None:
    """Refuse names for a handler that serves its own signature: clients would never see
    them. The tensor handler serves the model's; another is loaded to find out."""
    if manifest.handler == "tensor":
        return
    with runtime_model(manifest, members) as loaded:
        if (loaded.inputs, loaded.outputs) != (manifest.inputs, manifest.outputs):
            served = [spec.name for spec in (*loaded.inputs, *loaded.outputs)]
            raise ArchiveError(
                f"--input-name/--output-name: handler '{manifest.handler}' serves its own "
                f"signature ({served}); the names would name only the model's"
            )
