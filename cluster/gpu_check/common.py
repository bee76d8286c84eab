"""What every part shares: its context, the recorder its results go to, config overrides, timing."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import SpecserveConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]  # the repository: the parts run here
STATUSES = ("passed", "failed", "skipped", "timeout")


class Skip(Exception):
    """A part that cannot run here (a model not installed, a CPU dry run); the message says why."""


@dataclass(frozen=True)
class Context:
    mode: str  # "gpu" or "cpu" (the dry run: tiny models, small sizes)
    device: str  # resolved by the environment part ("cuda", "cuda:1", "cpu")
    out: Path  # the report folder
    deadline: float  # time.time() by which this part must have finished

    @property
    def cpu(self) -> bool:
        return self.mode == "cpu"

    @property
    def work(self) -> Path:
        """Files the parts make (configs, untrained tiny drafters, bench output)."""
        path = self.out / "work"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remaining(self) -> float:
        return self.deadline - time.time()


class Recorder:
    """A part's data and problems, rewritten to DIR/parts/NAME.json at every change, so a part that
    runs past its limit still reports what it measured."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {}
        self.problems: list[str] = []
        self.outcome: dict | None = None

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self._save()

    def problem(self, message: str) -> None:
        print(f"gpu-check: problem: {message}", file=sys.stderr, flush=True)
        self.problems.append(message)
        self._save()

    def finish(self, status: str, reason: str | None) -> None:
        assert status in STATUSES
        self.outcome = {"status": status, "reason": reason}
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"data": self.data, "problems": self.problems, "outcome": self.outcome},
                                  indent=1, default=str))
        os.replace(tmp, self.path)


def log(message: str) -> None:
    print(f"gpu-check: {message}", file=sys.stderr, flush=True)


def configured(config: SpecserveConfig | dict, **sections: dict) -> SpecserveConfig:
    """The config with these sections merged in (nested dicts merge, other values replace), validated."""
    data = config.model_dump() if isinstance(config, SpecserveConfig) else json.loads(json.dumps(config))
    for key, values in sections.items():
        data[key] = _merged(data.get(key) or {}, values)
    return parse_config(data, "gpu-check")


def _merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out.get(key) or {}, value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def clock(device: str):
    """time.perf_counter, after the device's queued work has finished (CUDA runs asynchronously)."""
    import torch

    if not device.startswith("cuda"):
        return time.perf_counter

    def synced() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return synced


def free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
