"""The .proto files are the source of truth: regenerating the stubs changes nothing."""

import subprocess
import sys
from pathlib import Path

PROTOS = Path(__file__).resolve().parent.parent / "protos"


def test_generated_stubs_are_up_to_date(tmp_path):
    protos = sorted(p.relative_to(PROTOS) for p in PROTOS.rglob("*.proto"))
    assert protos
    for proto in protos:
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", "-I", str(PROTOS), f"--python_out={tmp_path}",
             f"--grpc_python_out={tmp_path}", str(proto)],
            check=True,
        )
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            name = proto.with_suffix("").as_posix() + suffix
            assert (tmp_path / name).read_text() == (PROTOS / name).read_text(), f"{name} is stale: run protos/generate.sh"
