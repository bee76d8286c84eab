"""`specserve bench` on the tiny config: the rows carry every documented field."""

import json

from specserve.cluster.cli import main

FIELDS = {"drafter", "k", "temperature", "prompts", "tokens_per_s", "speedup", "acceptance_rate",
          "tokens_per_target_call", "expected_tokens_per_target_call", "shape", "stages", "mean_accepted"}


def test_bench_quick_rows(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--config", "configs/tiny.yaml", "--quick", "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "speedup" in printed  # the table
    for row in rows:
        assert FIELDS <= set(row)
        assert row["prompts"] in ("chat", "grounded", "code", "all")
        assert row["k"] == "adaptive" or isinstance(row["k"], int)
        assert row["temperature"] == 1.0 or row["matches_plain"] is True  # greedy: every variant equals plain decoding
    drafters = {r["drafter"] for r in rows}
    assert drafters == {"none", "model", "ngram"}  # --quick: the config's drafter and prompt lookup
    assert {r["temperature"] for r in rows} == {0.0, 1.0} and {r["k"] for r in rows} == {0, "adaptive"}
    assert {r["shape"] for r in rows if r["drafter"] == "ngram"} == {"chain", "tree"}  # ngram drafts trees
    # model drafters: trees (the second stage only in the full run)
    assert {(r["shape"], r["stages"]) for r in rows if r["drafter"] == "model"} == {("chain", 1), ("tree", 1)}
    assert all(r["stages"] == 1 for r in rows if r["drafter"] in ("none", "ngram"))
    assert all(r["draft_ms_per_token"] > 0 for r in rows if r["drafter"] == "model" and r["mean_k"] > 0)
    for r in rows:
        if r["drafter"] == "none":
            assert r["speedup"] == 1.0 and r["tokens_per_target_call"] <= 1.0  # < 1 only when EOS ends a prompt
    report = json.loads(out.read_text())
    assert report["target_format"].startswith("float32 (mkl)")
    assert [d["sequences"] for d in report["plain_decode"]] == [1, 16]
    assert all(d["tokens_per_s"] > 0 and d["seconds"] > d["prefill_seconds"] > 0 for d in report["plain_decode"])
    forward = report["forward"]  # the target's format first; float32 through MKL as the reference
    assert [f["format"] for f in forward] == ["float32/mkl"]
    shapes = {"1x1", "1x5", "1x9", "16x1"}
    assert set(forward[0]["raw_ms"]) == set(forward[0]["raw_ratio"]) == set(forward[0]["kv_store_ms"]) == shapes
    assert forward[0]["raw_ratio"]["1x1"] == 1.0 and min(forward[0]["raw_ms"].values()) > 0
    peer = report["peer"]  # transformers' generate: plain and prompt lookup (no draft model named)
    assert {(p["variant"], p["temperature"]) for p in peer} == {(v, t) for v in ("plain", "prompt_lookup") for t in (0.0, 1.0)}
    assert all(p["speedup"] == 1.0 for p in peer if p["variant"] == "plain") and all(p["tokens_per_s"] > 0 for p in peer)
    assert "raw forward" in printed and "peer: transformers" in printed


def test_raw_step_leaves_the_cache_as_it_found_it():
    from transformers import DynamicCache

    from specserve.cluster.bench_reference import raw_step_s
    from specserve.cluster.runtime.models import tiny_model

    model = tiny_model("tiny-llama")
    seen = []
    real = DynamicCache.crop
    DynamicCache.crop = lambda self, n: (real(self, n), seen.append(self.get_seq_length()))
    try:
        got = raw_step_s(model, shapes=((1, 1), (2, 5)), context=12, reps=2)
    finally:
        DynamicCache.crop = real
    assert set(got) == {"1x1", "2x5"} and min(got.values()) > 0
    assert seen and set(seen) == {12}  # every call is timed after exactly the context


def test_peer_rows_are_ratios_to_their_own_plain():
    from specserve.cluster.bench_reference import peer_rows

    runs = [dict(temperature=0.0, category=c, prompt=i, variant=v, seconds=s, tokens=48)
            for i, (c, v, s) in enumerate([("chat", "plain", 2.0), ("chat", "prompt_lookup", 1.0),
                                           ("code", "plain", 4.0), ("code", "prompt_lookup", 1.0)])]
    rows = {(r["prompts"], r["variant"]): r for r in peer_rows(runs, ("chat", "code"))}
    assert rows[("chat", "prompt_lookup")]["speedup"] == 2.0 and rows[("code", "prompt_lookup")]["speedup"] == 4.0
    assert rows[("all", "plain")]["tokens_per_s"] == 16.0 and rows[("all", "prompt_lookup")]["speedup"] == 3.0


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

    from specserve.cluster.bench_load import cpu_seconds_except

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
