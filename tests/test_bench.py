"""`specserve bench` on the tiny config: the rows carry every documented field."""

import json

from cluster.cli import main

FIELDS = {"drafter", "k", "temperature", "prompts", "tokens_per_s", "speedup", "acceptance_rate",
          "tokens_per_target_call", "expected_tokens_per_target_call", "shape", "stages", "mean_accepted"}


def test_bench_quick_rows(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--config", "configs/tiny.yaml", "--quick", "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert png.stat().st_size > 10_000
    assert "speedup" in capsys.readouterr().out  # the table
    for row in rows:
        assert FIELDS <= set(row)
        assert row["prompts"] in ("chat", "grounded", "code", "all")
        assert row["k"] == "adaptive" or isinstance(row["k"], int)
        assert row["matches_plain"] is True  # greedy: every variant equals plain decoding
    drafters = {r["drafter"] for r in rows}
    assert drafters == {"none", "ngram", "int8", "model"}
    assert {r["shape"] for r in rows if r["drafter"] == "ngram"} == {"chain", "tree"}  # ngram drafts trees
    for name in ("int8", "model"):  # model drafters: trees, and a second stage
        assert {(r["shape"], r["stages"]) for r in rows if r["drafter"] == name} == {(s, n) for s in ("chain", "tree") for n in (1, 2)}
    assert all(r["stages"] == 1 for r in rows if r["drafter"] in ("none", "ngram"))
    assert all(r["draft_ms_per_token"] > 0 for r in rows if r["drafter"] != "none" and r["k"] == 4)
    for r in rows:
        if r["drafter"] == "none":
            assert r["speedup"] == 1.0 and r["tokens_per_target_call"] <= 1.0  # < 1 only when EOS ends a prompt
        if r["k"] == 4:
            assert r["tokens_per_target_call"] >= 1.0


def test_bench_load_quick_rows(tmp_path, capsys):
    out = tmp_path / "load.json"
    assert main(["bench", "--load", "--no-served", "--config", "configs/tiny.yaml", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "adaptive/plain" in capsys.readouterr().out  # the table
    assert {(r["context"], r["concurrency"]) for r in data["rows"]} == {(50, 1), (50, 16), (250, 1), (250, 16)}
    for r in data["rows"]:
        b = r["concurrency"]
        assert r["raw_step_s_batch1"] > 0 and r[f"raw_step_s_batch{b}"] > 0
        for run in (r["plain"], r["adaptive"]):
            assert run["sequences"] == b and run["tokens"] > 0 and run["ttft_p50_s"] > 0
            assert 0 < run["token_latency_p50_s"] <= run["token_latency_p99_s"]
        assert r["plain_vs_raw"] > 0 and r["adaptive_vs_plain"] > 0 and r["batch_adaptive_vs_plain"] > 0
        assert r["plain"]["steady_tokens_per_s"] > 0 and r["adaptive"]["steady_tokens_per_s"] > 0


def test_bench_load_refuses_plot(capsys):
    assert main(["bench", "--load", "--plot", "x.png"]) == 2
    assert "invalid load" in capsys.readouterr().err


def test_cpu_seconds_except_counts_other_processes_only():
    """The served rows' contention figure: a busy process counts unless its command line has the marker."""
    import subprocess
    import sys
    import time

    from cluster.bench_load import cpu_seconds_except

    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
    for marker, counted in (("specserve-no-such-marker", True), ("busy-marker-7", False)):
        before = cpu_seconds_except(marker)
        child = subprocess.Popen([sys.executable, "-c", busy + "time.sleep(2)", "busy-marker-7"])
        time.sleep(1.2)  # the child has burned its 0.6 s and sleeps, still alive
        used = cpu_seconds_except(marker) - before
        child.kill()
        child.wait()
        assert (used >= 0.5) == counted, (marker, used)


def test_bench_runs_the_chosen_drafters_and_temperatures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--config", "configs/tiny.yaml", "--quick", "--drafters", "ngram", "--temperatures", "0,1",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["drafter"] for r in rows} == {"none", "ngram"} and {r["temperature"] for r in rows} == {0.0, 1.0}
    assert all(r["acceptance_rate"] is None or 0 <= r["acceptance_rate"] <= 1 for r in rows)
    assert main(["bench", "--config", "configs/tiny.yaml", "--quick", "--drafters", "head"]) == 2
    assert "invalid drafters: 'head' cannot run with this config" in capsys.readouterr().err
    assert main(["bench", "--config", "configs/tiny.yaml", "--quick", "--temperatures", "0,nan"]) == 2
    assert "invalid temperatures" in capsys.readouterr().err
