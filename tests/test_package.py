"""One installed package: a built wheel holds exactly `specserve` (with specserve.cluster and
specserve.actors from the repository's cluster/ and actors/), and nothing imports the folders by
their bare names."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BARE_IMPORT = re.compile(r"^\s*(from|import) (cluster|actors)\b", re.M)
BARE_NAME = re.compile(r"""(files|import_module|find_spec)\(["'](cluster|actors)\b""")  # by name, as a string


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("cluster", "actors", "protos"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_the_wheel_installs_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"specserve"}
    for wanted in ("specserve/__init__.py", "specserve/v1/generation_pb2.py", "specserve/cluster/runtime/engine.py",
                   "specserve/actors/coordinator.py", "specserve/cluster/prompts/bench.json",
                   "specserve/cluster/heads/smollm2-135m-instruct.pt"):
        assert wanted in names, wanted
    info = {n.rsplit("/", 1)[-1]: n for n in names if ".dist-info/" in n}
    assert zipfile.ZipFile(wheel).read(info["top_level.txt"]).decode().split() == ["specserve"]
    assert "specserve = specserve.cluster.cli:main" in zipfile.ZipFile(wheel).read(info["entry_points.txt"]).decode()


def test_the_installed_wheel_imports_without_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import specserve.cluster.config as c, specserve.v1.generation_pb2;"
            "import importlib.util as u; assert c.__file__.startswith(sys.argv[1]), c.__file__;"
            "assert u.find_spec('cluster') is None and u.find_spec('actors') is None;"
            "from specserve.cluster.bench_prompts import bench_prompts; assert bench_prompts()['chat'];"
            "print(c.SpecserveConfig().target.model)")
    done = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "smollm2-135m-instruct"


def test_no_source_imports_the_folders_by_their_bare_names():
    assert BARE_IMPORT.search("from cluster.config import X\n") and BARE_IMPORT.search("    import actors.wire\n")
    assert BARE_NAME.search('resources.files("cluster").joinpath("prompts")') and not BARE_NAME.search('files(__package__)')
    offenders = [str(p.relative_to(REPO)) for folder in ("cluster", "actors", "protos", "tests", "helm", "scripts")
                 for p in (REPO / folder).rglob("*.py")
                 if BARE_IMPORT.search(p.read_text()) or (p.name != "test_package.py" and BARE_NAME.search(p.read_text()))]
    assert offenders == []
