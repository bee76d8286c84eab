"""The speed part: `specserve bench --quick` rows on the device (cluster/bench.py's run_bench: one
request at a time, each variant its fastest of three), and the same variants batched: the quick
prompts cycled to `batch` concurrent requests in one generate call, plain against each drafter's
chain and tree with adaptive K. Greedy rows are compared with plain; on the CPU in float32 they
must be equal."""

from __future__ import annotations

import json
import time

from ..bench import DEFAULT_TREE_NODES, load_prompts, run_bench
from ..runtime.requests import GenerationRequest
from ..runtime.factory import load_target, make_engine
from ..speculation import SamplingParams
from ..speculation.round import capabilities_of
from .common import Context, Recorder, free_device_memory, log
from .plans import SIZES, TargetPlan, main_plan, qwen_plan


def run(ctx: Context, rec: Recorder) -> None:
    check(ctx, rec, main_plan(ctx))


def run_qwen(ctx: Context, rec: Recorder) -> None:
    check(ctx, rec, qwen_plan(ctx))


def check(ctx: Context, rec: Recorder, plan: TargetPlan) -> None:
    sizes, config = SIZES[ctx.mode], plan.config
    exact = ctx.cpu and config.target.dtype == "float32"  # greedy rows must equal plain
    rec.put("model", plan.label)
    rec.put("dtype", config.target.dtype)
    out = ctx.work / f"bench-{plan.label}.json"
    log(f"bench --quick: drafters {', '.join(plan.speed_drafters)}, T = {plan.speed_temperatures}")
    run_bench(config, json_out=str(out), quick=True, drafters=list(plan.speed_drafters),
              temperatures=list(plan.speed_temperatures))
    bench = json.loads(out.read_text())
    rec.put("bench_rows", bench["rows"])
    rec.put("plain_rep_spread", bench["plain_rep_spread"])
    check_rows(rec, bench["rows"], plan, exact, "bench")
    free_device_memory()
    rows = batched_rows(config, plan, sizes.batch, sizes.batch_tokens)
    rec.put("batch_rows", rows)
    check_rows(rec, rows, plan, exact, f"batch {sizes.batch}")
    rec.put("summary", summary(bench["rows"], rows, sizes.batch))


def check_rows(rec: Recorder, rows: list[dict], plan: TargetPlan, exact: bool, what: str) -> None:
    missing = set(plan.speed_drafters) - {r["drafter"] for r in rows}
    if missing:
        rec.problem(f"{what}: no rows for {', '.join(sorted(missing))}")
    differ = [f"{r['drafter']} {r['shape']} K={r['k']}" for r in rows
              if r["temperature"] == 0 and r.get("matches_plain") is False and r["prompts"] == "all"]
    if exact and differ:
        rec.problem(f"{what}: greedy rows differ from plain decoding in float32: {', '.join(differ)}")


def batched_rows(config, plan: TargetPlan, batch: int, new_tokens: int) -> list[dict]:
    """Each variant's tokens/s over `batch` concurrent requests (one warm-up run first), T as the plan's."""
    target = load_target(config)
    prompts = [p for _, p in load_prompts(quick=True)]
    engines = {name: make_engine(config, target, drafter=name) for name in plan.speed_drafters}
    first = engines[plan.speed_drafters[0]]
    variants = [("none", "chain", first)] + [
        (name, shape, e) for name, e in engines.items()
        for shape in (("chain", "tree") if capabilities_of(e.drafter).drafts_trees else ("chain",))]
    rows = []
    for temperature in plan.speed_temperatures:
        requests = [GenerationRequest(prompts[i % len(prompts)], new_tokens, SamplingParams(temperature, seed=2000 + i))
                    for i in range(batch)]
        plain_ids, plain_rate = None, None
        for drafter, shape, engine in variants:
            engine.tree_nodes = (config.speculation.tree.max_nodes or DEFAULT_TREE_NODES) if shape == "tree" else 0
            k = 0 if drafter == "none" else None
            run = [GenerationRequest(r.prompt, r.max_new_tokens, r.sampling, k) for r in requests]
            engine.generate(run[:1])  # warm-up: this shape's first call
            t = time.perf_counter()
            results = engine.generate(run)
            seconds = time.perf_counter() - t
            tokens = sum(len(r.token_ids) for r in results)
            ids = [r.token_ids for r in results]
            if drafter == "none":
                plain_ids, plain_rate = ids, tokens / seconds
            row = {"drafter": drafter, "shape": shape, "k": 0 if k == 0 else "adaptive", "temperature": temperature,
                   "prompts": "all", "batch": batch, "tokens": tokens, "seconds": round(seconds, 3),
                   "tokens_per_s": round(tokens / seconds, 2), "speedup": round(tokens / seconds / plain_rate, 3),
                   "mean_k": round(mean([k for r in results for k in r.stats.rounds_k]), 2)}
            if temperature == 0:
                row["matches_plain"] = ids == plain_ids
            rows.append(row)
            log(f"batch {batch}, T={temperature}, {drafter} {shape}: {row['tokens_per_s']} tok/s ({row['speedup']}x)")
    return rows


def mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def summary(bench_rows: list[dict], batch_rows: list[dict], batch: int) -> str:
    """Adaptive K's speedup over plain, all prompts: chain (/tree where drafted) per drafter and T."""
    def part(rows, label):
        chosen = [r for r in rows if r["prompts"] == "all" and r["k"] == "adaptive" and r.get("stages", 1) == 1]
        out = []
        for t in sorted({r["temperature"] for r in chosen}):
            cells: dict[str, list[str]] = {}
            for r in chosen:
                if r["temperature"] == t:
                    cells.setdefault(r["drafter"], []).append(f"{r['speedup']}")
            out.append(f"T={t:g} " + ", ".join(f"{d} {'/'.join(v)}" for d, v in cells.items()))
        return f"{label} " + "; ".join(out)

    return f"speedup chain/tree, {part(bench_rows, 'batch 1:')}; {part(batch_rows, f'batch {batch}:')}"
