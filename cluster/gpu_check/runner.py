"""Runs the parts, each a subprocess under its own time limit, and writes the report.

report.json (SCHEMA):
  {"schema": 1, "mode": "gpu"|"cpu", "device": str, "started": ISO time, "seconds": float,
   "budget_s": float, "environment": {...the environment part's data},
   "parts": {name: {"status": "passed"|"failed"|"skipped"|"timeout", "reason": str|null,
                    "seconds": float, "limit_s": float|null, ...the part's data}}}
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .common import ROOT, STATUSES, Context, Recorder, Skip
from .processes import stop_marked

SCHEMA = 1
BUDGET_S = {"gpu": 470.0, "cpu": 175.0}  # the whole check: 8 and 3 minutes, less the runner's own time
MIN_START_S = 5.0  # a part is not started with less time than this left
PART_MARK = "SPECSERVE_GPU_CHECK_PART"  # in each part's environment (its children inherit it)
RESERVED = {"status", "reason", "seconds", "limit_s"}  # a part's data may not use these keys


@dataclass(frozen=True)
class PartSpec:
    name: str
    function: str  # "module:function" in this package, called as function(Context, Recorder)
    limit_s: dict[str, float]  # per mode
    summary: str  # one line, for --help and the docs


PARTS = (
    PartSpec("environment", "environment:run", {"gpu": 20, "cpu": 15}, "GPU, memory, CUDA, driver, torch, NCCL"),
    PartSpec("exactness", "exactness:run", {"gpu": 60, "cpu": 30}, "greedy speculative = plain greedy, per dtype/drafter/shape"),
    PartSpec("distribution", "distribution:run", {"gpu": 35, "cpu": 40}, "chain and tree samples vs the exact joint, with controls"),
    PartSpec("costs", "costs:run", {"gpu": 35, "cpu": 15}, "forward of T tokens x B sequences, engine and raw"),
    PartSpec("speed", "speed:run", {"gpu": 140, "cpu": 35}, "bench --quick rows, batch 1 and batched"),
    PartSpec("serve", "serve:run", {"gpu": 60, "cpu": 50}, "specserve serve: gRPC and OpenAI chat vs in process"),
    PartSpec("qwen_exactness", "exactness:run_qwen", {"gpu": 55, "cpu": 0}, "exactness on Qwen2.5-Coder-1.5B"),
    PartSpec("qwen_speed", "speed:run_qwen", {"gpu": 55, "cpu": 0}, "speed rows on Qwen2.5-Coder-1.5B"),
)
BY_NAME = {p.name: p for p in PARTS}
GPU_ONLY = {"qwen_exactness": "cpu dry run: the 1.5B target runs on the GPU only in this check",
            "qwen_speed": "cpu dry run: the 1.5B target runs on the GPU only in this check"}


@dataclass(frozen=True)
class PartResult:
    status: str
    reason: str | None
    seconds: float
    limit_s: float | None
    data: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        clash = RESERVED & set(self.data)
        assert not clash, f"a part's data uses reserved keys {clash}"
        return {"status": self.status, "reason": self.reason, "seconds": round(self.seconds, 1),
                "limit_s": self.limit_s, **self.data}


@dataclass(frozen=True)
class Plan:
    """What the runner was asked for."""

    out: Path
    mode: str
    device: str  # as given (the environment part resolves it)
    parts: tuple[str, ...]  # selected; the environment part always runs
    limits: dict[str, float]  # per-part overrides (seconds)
    time_scale: float  # every limit and the budget multiplied by it


def run_check(plan: Plan) -> int:
    """Every part in order; returns 0 when no part failed or timed out, else 1."""
    for folder in ("parts", "logs", "work"):
        (plan.out / folder).mkdir(parents=True, exist_ok=True)
    started, wall = time.time(), time.perf_counter()
    budget = BUDGET_S[plan.mode] * plan.time_scale
    results: dict[str, PartResult] = {}
    device = "cpu" if plan.mode == "cpu" else plan.device
    for spec in PARTS:
        results[spec.name] = result = decide(spec, plan, results, device, started + budget)
        if spec.name == "environment" and result.status == "passed":
            device = result.data["device"]
        print(f"gpu-check: {spec.name}: {result.status}" + (f" ({result.reason})" if result.reason else "")
              + f" in {result.seconds:.1f} s", file=sys.stderr, flush=True)
    report = {"schema": SCHEMA, "mode": plan.mode, "device": device,
              "started": datetime.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
              "seconds": round(time.perf_counter() - wall, 1), "budget_s": budget,
              "environment": results["environment"].data,
              "parts": {name: r.as_json() for name, r in results.items()}}
    (plan.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    text = format_report(report)
    (plan.out / "report.txt").write_text(text + "\n")
    print(text)
    return 0 if all(r.status in ("passed", "skipped") for r in results.values()) else 1


def decide(spec: PartSpec, plan: Plan, done: dict[str, PartResult], device: str, deadline: float) -> PartResult:
    """Runs the part, or says why it is skipped."""
    env = done.get("environment")
    if spec.name != "environment" and spec.name not in plan.parts:
        return skipped("not selected (--parts)")
    if plan.mode == "cpu" and spec.name in GPU_ONLY:
        return skipped(GPU_ONLY[spec.name])
    if env is not None and env.status != "passed":
        return skipped(f"the environment part {env.status}: {env.reason}")
    left = deadline - time.time()
    if left < MIN_START_S:
        return skipped(f"the check's budget ({BUDGET_S[plan.mode] * plan.time_scale:.0f} s) is spent")
    limit = min(plan.limits.get(spec.name, spec.limit_s[plan.mode] * plan.time_scale), left)
    return run_part(spec, plan, device, limit)


def skipped(reason: str) -> PartResult:
    return PartResult("skipped", reason, 0.0, None)


def run_part(spec: PartSpec, plan: Plan, device: str, limit: float) -> PartResult:
    """`python -m specserve.cluster.gpu_check --part NAME` under `limit` seconds; past it the part's process
    group is killed, and so is anything else carrying its mark (a server and its Ray)."""
    mark = uuid.uuid4().hex
    env = dict(os.environ) | {PART_MARK: mark}
    if plan.mode == "cpu":  # tiny tensors: one thread; calibrations of the untrained tiny drafters stay in DIR
        env |= {"OMP_NUM_THREADS": "1", "SPECSERVE_CACHE": str(plan.out / "cache")}
    command = [sys.executable, "-m", "specserve.cluster.gpu_check", "--part", spec.name, "--out", str(plan.out),
               "--device", device, "--deadline", f"{time.time() + limit:.3f}"] + (["--cpu"] if plan.mode == "cpu" else [])
    path = plan.out / "parts" / f"{spec.name}.json"
    path.unlink(missing_ok=True)
    log_path = plan.out / "logs" / f"{spec.name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code, timed_out = proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code, timed_out = proc.wait(), True
        except BaseException:  # Ctrl-C: the part's session is not the terminal's, so it is stopped here
            os.killpg(proc.pid, signal.SIGKILL)
            stop_marked(PART_MARK, mark)
            raise
    strays = stop_marked(PART_MARK, mark)
    seconds = time.perf_counter() - start
    recorded = read_record(path)
    data = recorded.get("data", {})
    outcome = recorded.get("outcome")
    if timed_out:
        result = PartResult("timeout", f"ran past its limit of {limit:.0f} s" + problems_note(recorded), seconds, limit, data)
    elif outcome is None:
        result = PartResult("failed", f"exited with code {code} before reporting: {last_line(log_path)}", seconds, limit, data)
    else:
        result = PartResult(outcome["status"], outcome["reason"], seconds, limit, data)
    if strays and result.status == "passed":
        result = PartResult("failed", f"left {strays} processes running (killed)", seconds, limit, data)
    return result


def read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def problems_note(recorded: dict) -> str:
    problems = recorded.get("problems") or []
    return f"; problems before that: {'; '.join(problems)}" if problems else ""


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def run_in_process(name: str, ctx: Context) -> int:
    """One part, in this process (what the runner's subprocess executes): its outcome is recorded
    in DIR/parts/NAME.json; an exception fails the part with its message (traceback in the log)."""
    import importlib

    module, function = BY_NAME[name].function.split(":")
    rec = Recorder(ctx.out / "parts" / f"{name}.json")
    if ctx.cpu:
        import torch

        torch.set_num_threads(1)
    try:
        getattr(importlib.import_module(f"{__package__}.{module}"), function)(ctx, rec)
    except Skip as e:
        rec.finish("skipped", str(e))
        return 0
    except Exception as e:  # noqa: BLE001 - the part's boundary: recorded, the other parts go on
        traceback.print_exc()
        rec.finish("failed", "; ".join([*rec.problems, f"{type(e).__name__}: {e}"]))
        return 0
    rec.finish("failed" if rec.problems else "passed", "; ".join(rec.problems) or None)
    return 0


def format_report(report: dict) -> str:
    """The short table: one line a part (status, time, limit, what it found or why not)."""
    parts = report["parts"]
    counts = {s: sum(p["status"] == s for p in parts.values()) for s in STATUSES}
    head = (f"specserve GPU check, mode {report['mode']}, device {report['device']}: "
            + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"; {report['seconds']} s of {report['budget_s']:.0f} s")
    rows = [("part", "status", "seconds", "limit", "result")]
    for name, p in parts.items():
        text = p.get("summary") if p["status"] == "passed" else p["reason"]
        limit = "-" if p["limit_s"] is None else f"{p['limit_s']:.0f}"
        rows.append((name, p["status"], f"{p['seconds']:.1f}", limit, " | ".join((text or "").splitlines())))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ------")
    return "\n".join([head, *lines])
