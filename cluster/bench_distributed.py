"""`specserve bench --distributed`: the distributed path against the in-process engine, same run.

1. Time per round, one sequence at a time, greedy, the same fixed K: both paths run identical
   rounds, so the ratio is the cost of Ray, gRPC and the wire. Phases and bytes per round come
   from the coordinator's metrics.
2. Throughput with `concurrency` requests in flight (a finished one makes room for the next):
   plain decoding (K = 0) against adaptive speculation, which lowers K as the batch makes
   verification expensive.

Variants alternate within each repetition and keep their fastest run, so noise hits them alike.
"""

from __future__ import annotations

import json
import sys
import time

from .bench import load_prompts, machine
from .config import SpecserveConfig
from .launcher import DistributedEngine
from .runtime.requests import GenerationRequest
from .runtime.factory import load_target, make_engine


def run_distributed_bench(config: SpecserveConfig, json_out: str | None = None, quick: bool = False,
                          concurrency: int = 16, k: int = 4) -> int:
    log = lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    prompts = [p for _, p in load_prompts(quick)]
    max_new = 48 if quick else 96
    reps = 2 if quick else 3
    k = min(k, config.speculation.max_draft_tokens)

    log(f"in-process engine: {config.target.model} ({config.target.dtype}), drafter {config.draft.drafter}")
    local = make_engine(config, load_target(config))
    local.prepare()
    c = config.cluster
    log(f"distributed: tp_size {c.tp_size}, {c.draft_replicas} draft replicas, starting")
    t = time.perf_counter()
    remote = DistributedEngine(config)
    log(f"distributed: ready in {time.perf_counter() - t:.0f} s")
    try:
        rounds = _per_round(local, remote, prompts, max_new, k, reps, log)
        load = _under_load(local, remote, prompts, max_new, concurrency, reps, log)
    finally:
        remote.shutdown()

    report = {"config": config.model_dump(), "machine": machine(), "quick": quick, "max_new_tokens": max_new,
              "reps": reps, "per_round": rounds, "concurrent": load}
    print(format_report(report))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {json_out}")
    return 0


def _timed(engine, requests):
    t = time.perf_counter()
    results = engine.generate(requests)
    return time.perf_counter() - t, results


def _per_round(local, remote, prompts, max_new, k, reps, log) -> dict:
    best = {"in_process": [float("inf")] * len(prompts), "distributed": [float("inf")] * len(prompts)}
    rounds, same, phases = [0] * len(prompts), True, None
    for rep in range(reps):
        log(f"per-round time, rep {rep + 1}/{reps}")
        remote.reset_stats()
        for i, prompt in enumerate(prompts):
            request = GenerationRequest(prompt, max_new, num_draft_tokens=k)
            s_local, (a,) = _timed(local, [request])
            s_remote, (b,) = _timed(remote, [request])
            best["in_process"][i] = min(best["in_process"][i], s_local / a.stats.target_calls)
            best["distributed"][i] = min(best["distributed"][i], s_remote / b.stats.target_calls)
            rounds[i] = a.stats.target_calls
            same &= a.token_ids == b.token_ids
        if phases is None:
            phases = remote.stats()["per_round"]  # the first rep's per-round phases and bytes
    mean = {path: sum(v) / len(v) for path, v in best.items()}
    return {
        "k": k, "rounds": sum(rounds), "same_tokens": same,
        "in_process_round_s": round(mean["in_process"], 5), "distributed_round_s": round(mean["distributed"], 5),
        "ratio": round(mean["distributed"] / mean["in_process"], 3),
        "distributed_phases_s": {key.removesuffix("_s"): round(v, 5) for key, v in phases.items() if key.endswith("_s")},
        "bytes_per_round": {key.removesuffix("_bytes"): round(v) for key, v in phases.items() if key.endswith("_bytes")},
    }


def _in_flight(engine, requests, concurrency):
    """In process: keeps `concurrency` sequences active; a finished one makes room for the next."""
    if not isinstance(engine, DistributedEngine):
        queue, results, active = list(requests), {}, 0
        order = []
        while queue or engine.has_unfinished():
            while queue and active < concurrency:
                order.append(engine.add_request(queue.pop(0)))
                active += 1
            for out in engine.step():
                if out.result is not None:
                    results[out.seq_id] = out.result
                    active -= 1
        return [results[i] for i in order]
    return engine.generate(requests, max_in_flight=concurrency)


def _under_load(local, remote, prompts, max_new, concurrency, reps, log) -> dict:
    """3 x concurrency requests, `concurrency` in flight at any time (continuous batching)."""
    n = 3 * concurrency
    requests = {
        variant: [GenerationRequest(f"{prompts[i % len(prompts)]}\n(#{i})", max_new, num_draft_tokens=k)
                  for i in range(n)]
        for variant, k in (("plain", 0), ("adaptive", None))
    }
    out = {}
    for name, engine in (("in_process", local), ("distributed", remote)):
        best = {}
        for rep in range(reps):
            for variant, reqs in requests.items():
                log(f"{n} requests, {concurrency} in flight, {name}, {variant}, rep {rep + 1}/{reps}")
                t = time.perf_counter()
                results = _in_flight(engine, reqs, concurrency)
                seconds = time.perf_counter() - t
                tokens = sum(len(r.token_ids) for r in results)
                drafted = sum(r.stats.draft_tokens for r in results)
                calls = sum(r.stats.target_calls for r in results)
                if variant not in best or seconds < best[variant]["seconds"]:
                    best[variant] = {"seconds": round(seconds, 3), "tokens": tokens,
                                     "tokens_per_s": round(tokens / seconds, 2),
                                     "mean_k": round(drafted / calls, 3)}
        best["adaptive"]["speedup"] = round(best["adaptive"]["tokens_per_s"] / best["plain"]["tokens_per_s"], 3)
        out[name] = best
    out["concurrency"] = concurrency
    out["requests"] = n
    return out


def format_report(r: dict) -> str:
    pr, cc = r["per_round"], r["concurrent"]
    lines = [
        f"time per round, one sequence, greedy, K = {pr['k']} ({pr['rounds']} rounds per pass, same tokens: {pr['same_tokens']}):",
        f"  in-process {1000 * pr['in_process_round_s']:.2f} ms, distributed {1000 * pr['distributed_round_s']:.2f} ms, "
        f"ratio {pr['ratio']:.3f}",
        "  distributed phases (ms/round): " + ", ".join(f"{k} {1000 * v:.2f}" for k, v in pr["distributed_phases_s"].items()),
        "  bytes per round: " + ", ".join(f"{k} {v}" for k, v in pr["bytes_per_round"].items()),
        f"{cc['requests']} requests, {cc['concurrency']} in flight at a time, greedy:",
    ]
    for path in ("in_process", "distributed"):
        p, a = cc[path]["plain"], cc[path]["adaptive"]
        lines.append(f"  {path}: plain {p['tokens_per_s']} tok/s, adaptive {a['tokens_per_s']} tok/s "
                     f"(mean K {a['mean_k']}), speedup {a['speedup']:.3f}")
    return "\n".join(lines)
