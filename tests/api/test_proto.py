"""Generated stubs are fresh, and our KServe messages are wire-compatible with Triton's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc.service_pb2 as triton_pb
from google.protobuf.descriptor import Descriptor

from edgeserve.proto import POOL
from edgeserve.proto import kserve_v2_pb2 as pb

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
GENERATED = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(PROTO_DIR / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh = sorted(p.name for pattern in GENERATED for p in tmp_path.glob(pattern))
    committed = sorted(p.name for pattern in GENERATED for p in PROTO_DIR.glob(pattern))
    assert fresh == committed, "stub files differ: run `python proto/generate.py`"
    for name in fresh:
        assert (tmp_path / name).read_bytes() == (PROTO_DIR / name).read_bytes(), (
            f"proto/{name} is stale: run `python proto/generate.py`"
        )


def test_our_descriptors_live_in_the_private_pool() -> None:
    assert pb.DESCRIPTOR.pool is POOL
    # tritonclient registered the same names in the default pool; both are usable.
    assert triton_pb.DESCRIPTOR.pool is not POOL
    assert pb.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    assert triton_pb.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"


def _messages(descriptor: Descriptor) -> list[Descriptor]:
    found = [descriptor]
    for nested in descriptor.nested_types:
        if not nested.GetOptions().map_entry:
            found += _messages(nested)
    return found


OURS = [m for top in pb.DESCRIPTOR.message_types_by_name.values() for m in _messages(top)]


@pytest.mark.parametrize("ours", OURS, ids=lambda m: m.full_name)
def test_every_message_matches_tritons(ours: Descriptor) -> None:
    theirs = triton_pb.DESCRIPTOR.pool.FindMessageTypeByName(ours.full_name)
    for field in ours.fields:
        other = theirs.fields_by_name.get(field.name)
        assert other is not None, f"{ours.full_name}.{field.name} is not in Triton's proto"
        where = f"{ours.full_name}.{field.name}"
        assert field.number == other.number, where
        assert field.type == other.type, where
        assert field.is_repeated == other.is_repeated, where
        assert (field.containing_oneof is None) == (other.containing_oneof is None), where
        if field.message_type is not None:
            assert field.message_type.full_name == other.message_type.full_name, where


def test_the_service_matches_tritons_methods() -> None:
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name, method.name
        assert method.output_type.full_name == other.output_type.full_name, method.name
        assert method.client_streaming == other.client_streaming, method.name
        assert method.server_streaming == other.server_streaming, method.name


ENUMS = [
    *pb.DESCRIPTOR.enum_types_by_name.values(),
    *(e for m in OURS for e in m.enum_types),
]


@pytest.mark.parametrize("ours", ENUMS, ids=lambda e: e.full_name)
def test_every_enum_value_matches_tritons(ours) -> None:
    theirs = triton_pb.DESCRIPTOR.pool.FindEnumTypeByName(ours.full_name)
    for value in ours.values:
        assert theirs.values_by_name[value.name].number == value.number, value.name
