"""The committed stubs are exactly what scripts/gen_protos.py generates from the .proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_up_to_date():
    generator = load_generator()
    problems = generator.stale_files(generator.generate())
    assert not problems, "run python scripts/gen_protos.py:\n" + "\n".join(problems)


def test_stub_messages_live_in_the_api_package():
    """Ray pickles request messages by module path; protoc's default path would not import."""
    from speccascade.api.v1 import speccascade_pb2 as pb

    assert pb.GenerateRequest.__module__ == "speccascade.api.v1.speccascade_pb2"
    assert pb.DESCRIPTOR.name == "speccascade/v1/speccascade.proto"
