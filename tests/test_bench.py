"""`specserve bench` on the tiny config: the rows carry every documented field."""

import json

from cluster.cli import main

FIELDS = {"drafter", "k", "temperature", "prompts", "tokens_per_s", "speedup", "acceptance_rate",
          "tokens_per_target_call", "expected_tokens_per_target_call"}


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
    for r in rows:
        if r["drafter"] == "none":
            assert r["speedup"] == 1.0 and r["tokens_per_target_call"] <= 1.0  # < 1 only when EOS ends a prompt
        if r["k"] == 4:
            assert r["tokens_per_target_call"] >= 1.0
