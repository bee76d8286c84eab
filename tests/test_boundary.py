"""The algorithm core (cluster/speculation) depends on torch and the standard library only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "cluster" / "speculation"
FORBIDDEN = ("ray", "grpc", "deepspeed", "transformers", "google.protobuf")
ALLOWED = set(sys.stdlib_module_names) | {"torch", "__future__"}


def test_import_pulls_in_no_serving_stack():
    code = (
        "import sys, specserve.cluster.speculation\n"
        f"bad = sorted(m for m in {FORBIDDEN!r} if m in sys.modules)\n"
        "print('torch' in sys.modules, bad)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=CORE.parents[1], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True []", res.stdout


def bad_imports(source: str) -> list[str]:
    """Absolute imports whose top-level package is neither stdlib nor torch."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:  # relative: inside the core
                continue
            names = [node.module]
        else:
            continue
        bad += [n for n in names if n.split(".")[0] not in ALLOWED]
    return bad


def test_scanner_flags_foreign_imports():
    assert bad_imports("import ray\nfrom grpc import aio\nimport google.protobuf\n") == [
        "ray",
        "grpc",
        "google.protobuf",
    ]
    assert bad_imports("import os, torch\nfrom __future__ import annotations\nfrom .x import y\n") == []
    assert bad_imports("def f():\n    import transformers\n") == ["transformers"]


def test_core_files_import_only_stdlib_and_torch():
    files = sorted(CORE.glob("*.py"))
    assert CORE / "__init__.py" in files and CORE / "rejection.py" in files
    for path in files:
        assert bad_imports(path.read_text()) == [], path.name
