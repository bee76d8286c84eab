"""scripts/gpu-check.sh: its CPU dry run (the same parts with tiny models) writes a complete report
in which every part that can run on a CPU ran and passed, the distribution's negative controls
rejected; a part past its limit is a timeout and the others still report; without CUDA the GPU
mode says so; bad arguments exit 2 naming them. No GPU needed."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
PARTS = ("environment", "exactness", "distribution", "costs", "speed", "serve", "qwen_exactness", "qwen_speed")
CPU_SKIPPED = {"qwen_exactness", "qwen_speed"}  # the 1.5B target: GPU only
STATUSES = {"passed", "failed", "skipped", "timeout"}


def gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), "--out", str(out), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)


def left_behind(marker: bytes) -> list[str]:
    """Command lines of processes whose environment holds `marker` (the run's children inherit it)."""
    left = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                left.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return left


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    # limits x4: a busy machine may be slower than the script's budget; what is checked here is the report
    done = gpu_check(out, "--cpu", "--time-scale", "4")
    return out, done, json.loads((out / "report.json").read_text())


def test_the_report_has_its_schema_and_every_part(dry_run):
    out, done, report = dry_run
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert report["schema"] == 1 and report["mode"] == "cpu" and report["device"] == "cpu"
    assert report["seconds"] > 0 and report["budget_s"] > 0 and report["started"]
    assert set(report["parts"]) == set(PARTS)
    for name, part in report["parts"].items():
        assert part["status"] in STATUSES, name
        assert isinstance(part["seconds"], (int, float)) and (part["reason"] is None or isinstance(part["reason"], str))
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["cpu"]["cores"] >= 1 and "cuda_available" in env
    text = (out / "report.txt").read_text()
    assert all(name in text for name in PARTS)
    assert (out / "logs" / "exactness.log").is_file()


def test_every_part_but_qwen_ran_and_passed(dry_run):
    _, _, report = dry_run
    for name, part in report["parts"].items():
        if name in CPU_SKIPPED:
            assert part["status"] == "skipped" and "cpu dry run" in part["reason"], (name, part)
        else:
            assert part["status"] == "passed", (name, part["reason"])


def test_exactness_counts_equal_prompts_and_float32_is_exact(dry_run):
    _, _, report = dry_run
    rows = report["parts"]["exactness"]["rows"]
    combos = {(r["dtype"], r["drafter"], r["shape"], r["k"]) for r in rows}
    assert combos == {(d, dr, s, k) for d in ("float32", "bfloat16") for dr, s in (("head", "chain"), ("head", "tree"),
                      ("pass", "chain")) for k in ("adaptive", 4)}
    for r in rows:
        assert r["prompts"] == 6 and 0 <= r["equal"] <= 6 and r["required"] == (r["dtype"] == "float32")
        if r["dtype"] == "float32":
            assert r["equal"] == 6 and r["differs_at"] == {}, r
        if r["k"] == 4:
            assert r["draft_tokens"] > 0 and (r["shape"] == "chain" or r["tree_rounds"] > 0), r


def test_distribution_passes_and_its_negative_controls_are_rejected(dry_run):
    _, _, report = dry_run
    part = report["parts"]["distribution"]
    for path in ("chain", "tree"):
        assert part[path]["p_value"] > 1e-3 and part[path]["passed"] is True, part[path]
        assert part[path]["control_p_value"] < 1e-6 and part[path]["control_rejected"] is True, part[path]
        assert part[path]["speculated"] is True
    assert part["tree"]["tree_rounds"] > 0


def test_costs_speed_and_serve_measured(dry_run):
    _, _, report = dry_run
    costs = report["parts"]["costs"]["rows"]
    assert {(r["batch"], r["tokens"]) for r in costs} == {(1, 1), (1, 5), (4, 1), (4, 5)}
    assert all(r["engine_ms"] > 0 and r["raw_ms"] > 0 and r["engine_ratio"] > 0 for r in costs)
    assert next(r for r in costs if (r["batch"], r["tokens"]) == (1, 1))["engine_ratio"] == 1.0
    speed = report["parts"]["speed"]
    for rows in (speed["bench_rows"], speed["batch_rows"]):
        assert {r["drafter"] for r in rows} == {"none", "ngram_head", "head", "pass"}
        assert {r["temperature"] for r in rows} == {0.0, 1.0}
        assert all(r["matches_plain"] for r in rows if r["temperature"] == 0 and r["prompts"] == "all")
    assert {r["batch"] for r in speed["batch_rows"]} == {4}
    serve = report["parts"]["serve"]
    assert serve["served_over_in_process"]["grpc"] > 0 and serve["served_over_in_process"]["chat"] > 0
    assert serve["grpc_same_text"] and serve["chat_same_text"]
    assert serve["shutdown"] == {"exit_code": 0, "left_behind": 0}


def test_nothing_of_the_run_is_left_running(dry_run):
    out, _, _ = dry_run
    assert left_behind(f"SPECSERVE_CACHE={out / 'cache'}".encode()) == []


def test_a_part_past_its_limit_times_out_and_the_others_still_report(tmp_path):
    done = gpu_check(tmp_path, "--cpu", "--parts", "costs", "--limit", "costs=0")
    assert done.returncode == 1
    parts = json.loads((tmp_path / "report.json").read_text())["parts"]
    assert parts["costs"]["status"] == "timeout" and "limit of 0 s" in parts["costs"]["reason"]
    assert parts["environment"]["status"] == "passed"
    assert all(parts[n]["status"] == "skipped" and parts[n]["reason"] for n in PARTS if n not in ("costs", "environment"))


def test_without_cuda_the_gpu_mode_fails_its_environment_and_skips_the_rest(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = gpu_check(tmp_path, "--parts", "exactness")
    assert done.returncode == 1
    parts = json.loads((tmp_path / "report.json").read_text())["parts"]
    assert parts["environment"]["status"] == "failed" and "no CUDA device" in parts["environment"]["reason"]
    assert parts["exactness"]["status"] == "skipped" and "environment part failed" in parts["exactness"]["reason"]


@pytest.mark.parametrize("args, named", [
    (["--cpu", "--parts", "exactness,nope"], "nope"),
    (["--cpu", "--limit", "costs=soon"], "soon"),
    (["--cpu", "--limit", "nope=3"], "nope"),
    (["--cpu", "--device", "cuda"], "--device cuda"),
    (["--cpu", "--time-scale", "0"], "--time-scale"),
])
def test_bad_arguments_exit_2_naming_them(tmp_path, args, named):
    done = gpu_check(tmp_path, *args)
    assert done.returncode == 2 and named in done.stderr, done.stderr
