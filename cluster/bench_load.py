"""`specserve bench --load`: the shapes users run, every overhead a ratio measured in one run.

For prompts of about 50, 250 and 1,000 tokens and 1, 4, 16 and 64 concurrent sequences
(`--quick`: 50 and 250 tokens, 1 and 16 sequences), in process:
- reference rows: the raw Hugging Face forward with its own DynamicCache at the same context:
  one step at batch 1 and at the concurrency, and a verify block of K + 1 tokens at batch 1;
- the engine's plain decoding (K = 0) and adaptive speculation: aggregate tokens/s, time to
  first token, p50/p99 per-token latency; and plain decoding's steady rate (every sequence
  prefilled and decoding) against the raw forward at the same batch and mean context;
- ratios: plain's steady rate / the raw step rate at the same batch; adaptive / plain, steady
  (throughput under continuous load) and for one closed batch of fixed-length requests (whose
  time is set by its unluckiest sequence);
- unless --no-served: the same text prompts at 1 and 16 concurrent streams through the served
  gRPC API (a local Ray Serve app of the same config) against the in-process engine, with the
  cores every other process (client, Serve proxy, gateway, controller, Ray's GCS and raylet)
  used meanwhile: on a machine with few cores they compete with the engine's matmuls.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from .config import SpecserveConfig
from .runtime.requests import GenerationRequest
from .runtime.factory import load_target, make_engine
from .speculation import SamplingParams
from .bench_prompts import bench_prompts


CORPUS_MODULES = ("argparse", "json", "collections", "functools", "subprocess", "threading", "logging", "unittest",
                  "typing", "dataclasses", "asyncio", "re", "textwrap", "statistics", "heapq")


def corpus_ids(tokenizer) -> list[int]:
    """Text this machine already holds, as one token stream to cut prompts from: the bench prompts
    and the documentation of some standard-library modules (prose and code, about 40k tokens)."""
    import importlib
    import inspect

    data = bench_prompts()
    parts = [p for prompts in data.values() for p in prompts]
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        members = [getattr(module, n) for n in sorted(getattr(module, "__all__", ())) if not n.startswith("_")]
        parts += [doc for doc in map(inspect.getdoc, [module, *members]) if doc]
    return tokenizer.encode("\n\n".join(parts))


def prompt_ids(corpus: list[int], length: int, index: int) -> tuple[int, ...]:
    """A prompt of `length` tokens, a different cut of the corpus for each index (no repeats
    within a prompt while the corpus is longer than it)."""
    start = (index * 509) % len(corpus)
    ids = (corpus * (2 + length // len(corpus)))[start : start + length]
    return tuple(ids)


def raw_step_s(model, batch: int, context: int, new: int, reps: int = 3) -> float:
    """Median time of one raw HF forward of `new` tokens for `batch` sequences after `context` tokens."""
    from transformers import DynamicCache

    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, context))
    times = []
    with torch.inference_mode():
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)  # no [b, context, V] logits
        for _ in range(reps + 1):
            x = torch.randint(0, vocab, (batch, new))
            t = time.perf_counter()
            model(input_ids=x, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
            cache.crop(-new)
    return statistics.median(times[1:])


def steady_decode(engine, prompts: list[tuple[int, ...]], num_draft_tokens: int | None,
                  rounds: int, min_s: float = 1.0) -> tuple[float, int, int]:
    """Tokens/s of at least `rounds` rounds and min_s seconds in which every live sequence decodes
    (all prompts prefilled; it stops early when one ends at EOS), the mean context then and how
    many sequences were live. The sequences are aborted afterwards."""
    greedy = SamplingParams(temperature=0.0)
    ids = [engine.add_request(GenerationRequest("", engine.target.max_context, greedy, num_draft_tokens, prompt_ids=p))
           for p in prompts]
    live = lambda: [engine._seqs[i] for i in ids if i in engine._seqs]  # noqa: E731
    while any(not s.output for s in live()):
        engine.step()
    seqs = live()
    context = round(statistics.mean(len(s.tokens) for s in seqs))
    start, tokens, done = time.perf_counter(), 0, 0
    while done < rounds or time.perf_counter() - start < min_s:
        outputs = engine.step()
        tokens += sum(len(o.new_token_ids) for o in outputs)
        done += 1
        if any(o.result is not None for o in outputs):
            break
    seconds = time.perf_counter() - start
    for i in ids:
        engine.abort(i)
    return tokens / seconds, context, len(seqs)


def summarize(events: dict[int, list[tuple[float, int]]], start: float, wall: float) -> dict:
    """Per sequence its emissions (time, tokens): tokens/s, time to first token, per-token latency
    (the gap before an emission spread over its tokens)."""
    first, gaps, tokens = [], [], 0
    for emitted in filter(None, events.values()):  # a sequence may end at EOS before any token
        first.append(emitted[0][0] - start)
        tokens += sum(n for _, n in emitted)
        gaps += [(t - before) / n for (before, _), (t, n) in zip(emitted, emitted[1:]) for _ in range(n)]
    q = statistics.quantiles(gaps, n=100) if len(gaps) > 1 else [gaps[0] if gaps else 0.0] * 99
    return {
        "sequences": len(events), "tokens": tokens, "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(statistics.median(first), 4),
        "token_latency_p50_s": round(q[49], 4), "token_latency_p99_s": round(q[98], 4),
    }


def run_engine(engine, requests: list[GenerationRequest]) -> dict:
    """Runs the requests together in process, as if sent at once."""
    start = time.perf_counter()
    ids = [engine.add_request(r) for r in requests]
    events = {i: [] for i in ids}
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for o in outputs:
            if o.new_token_ids:
                events[o.seq_id].append((now, len(o.new_token_ids)))
    return summarize(events, start, time.perf_counter() - start)


def cpu_seconds_except(marker: str) -> float | None:
    """CPU seconds used so far by every process whose command line lacks `marker` (Linux /proc;
    None elsewhere). Exited processes are not counted."""
    import os

    if not os.path.isdir("/proc/self/task"):
        return None
    ticks, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return total / ticks


def run_streams(client, requests: list, threads: int) -> dict:
    """The same through the served gRPC API: one streaming call per request, all at once."""
    from concurrent.futures import ThreadPoolExecutor

    def one(request) -> list[tuple[float, int]]:
        return [(time.perf_counter(), len(r.token_ids)) for r in client.stream(request) if r.token_ids]

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        events = dict(enumerate(pool.map(one, requests)))
    return summarize(events, start, time.perf_counter() - start)


def served_rows(config: SpecserveConfig, engine, texts: list[str], concurrency: tuple[int, ...], new_tokens: int,
                log) -> list[dict]:
    """In process against the served gRPC API (a local Ray Serve app of the same config, on free
    ports), the same text prompts at each concurrency, plain and adaptive, closed batches."""
    import ray
    from ray import serve

    from . import app
    from .client import Client, proto_request
    from .config import parse_config

    data = config.model_dump()
    data["serve"] |= {"grpc_port": app.free_port(), "http_port": app.free_port(), "max_ongoing_requests": max(concurrency)}
    served = parse_config(data, "bench")
    ray.init(address=config.cluster.address, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        log("starting the Serve app")
        app.start(served)
        client = Client(f"127.0.0.1:{served.serve.grpc_port}", served.serve.app_name)
        engine_marker = f"ServeReplica:{served.serve.app_name}:engine"  # Ray names replica processes so
        greedy = SamplingParams(temperature=0.0)
        for b in concurrency:
            for mode, k in (("plain", 0), ("adaptive", None)):
                prompts = [texts[i % len(texts)] for i in range(b)]
                run_streams(client, [proto_request(p, 4, num_draft_tokens=k) for p in prompts[:1]], 1)  # warm-up
                local = run_engine(engine, [GenerationRequest(p, new_tokens, greedy, k) for p in prompts])
                before = cpu_seconds_except(engine_marker)
                remote = run_streams(client, [proto_request(p, new_tokens, num_draft_tokens=k) for p in prompts], b)
                after = cpu_seconds_except(engine_marker)
                others = None if before is None else round((after - before) / remote["seconds"], 2)
                rows.append({"concurrency": b, "mode": mode, "in_process": local, "served": remote,
                             "served_vs_in_process": round(remote["tokens_per_s"] / local["tokens_per_s"], 3),
                             "other_processes_cores": others})
                log(f"  {b} streams, {mode}: in process {local['tokens_per_s']} tok/s, served {remote['tokens_per_s']} "
                    f"tok/s ({rows[-1]['served_vs_in_process']}x); other processes used {others} cores meanwhile")
        client.close()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return rows


def run_load_bench(config: SpecserveConfig, json_out: str | None = None, quick: bool = False,
                   served: bool = True) -> int:
    log = lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    contexts = (50, 250) if quick else (50, 250, 1000)
    concurrency = (1, 16) if quick else (1, 4, 16, 64)
    new_tokens = 32 if quick else 64
    steady_rounds, steady_s = (6, 1.5) if quick else (12, 4.0)
    target = load_target(config)
    log(f"{config.target.model} in {target.dtype}, drafter {config.draft.drafter}")
    plain = make_engine(config, target)
    spec = make_engine(config, target)
    spec.prepare()
    steady_decode(plain, [prompt_ids(corpus_ids(target.tokenizer), 16, 0)], 0, rounds=2)  # warm-up
    corpus = corpus_ids(target.tokenizer)
    k = config.speculation.max_draft_tokens
    rows = []
    for context in contexts:
        for b in concurrency:
            log(f"context {context}, {b} sequences")
            prompts = [prompt_ids(corpus, context, i) for i in range(b)]
            decode_rate, ctx, live = steady_decode(plain, prompts, 0, steady_rounds, steady_s)
            spec_rate, _, spec_live = steady_decode(spec, prompts, None, steady_rounds, steady_s)
            raw = {"raw_step_s_batch1": raw_step_s(target.model, 1, ctx, 1),
                   f"raw_step_s_batch{b}": raw_step_s(target.model, live, ctx, 1),
                   f"raw_verify_s_{k + 1}_tokens": raw_step_s(target.model, 1, ctx, k + 1)}
            greedy = SamplingParams(temperature=0.0)
            off = run_engine(plain, [GenerationRequest("", new_tokens, greedy, 0, prompt_ids=p) for p in prompts])
            on = run_engine(spec, [GenerationRequest("", new_tokens, greedy, prompt_ids=p) for p in prompts])
            raw_rate = live / raw[f"raw_step_s_batch{b}"]
            rows.append({
                "context": context, "concurrency": b, "steady_context": ctx, "steady_sequences": live,
                **{key: round(v, 5) for key, v in raw.items()},
                "plain": off | {"steady_tokens_per_s": round(decode_rate, 2)},
                "adaptive": on | {"steady_tokens_per_s": round(spec_rate, 2)},
                "plain_vs_raw": round(decode_rate / raw_rate, 3),
                # steady throughput, per live sequence (one may end at EOS on the way)
                "adaptive_vs_plain": round(spec_rate / spec_live / (decode_rate / live), 3),
                "batch_adaptive_vs_plain": round(on["tokens_per_s"] / off["tokens_per_s"], 3),
            })
            log(f"  steady: plain {decode_rate:.1f} tok/s at context {ctx} (raw forward {raw_rate:.1f} seq-steps/s: "
                f"{rows[-1]['plain_vs_raw']}x), adaptive {spec_rate:.1f} tok/s ({rows[-1]['adaptive_vs_plain']}x); "
                f"closed batch of {new_tokens} tokens each: plain {off['tokens_per_s']}, adaptive {on['tokens_per_s']} tok/s")
    served_table = []
    if served:
        texts = [target.tokenizer.decode(list(prompt_ids(corpus, contexts[-1] if quick else 250, i))) for i in range(16)]
        served_table = served_rows(config, spec, texts, (1, 16), new_tokens, log)
    print(format_load_table(rows))
    if served_table:
        print(format_served_table(served_table))
    if json_out:
        from .bench import machine

        with open(json_out, "w") as f:
            json.dump({"config": config.model_dump(), "dtype": target.dtype, "machine": machine(), "quick": quick,
                       "new_tokens": new_tokens, "rows": rows, "served": served_table}, f, indent=2)
        log(f"wrote {json_out}")
    return 0


def format_load_table(rows: list[dict]) -> str:
    head = ("context", "seqs", "raw seq-steps/s", "plain steady", "plain/raw", "adaptive steady", "adaptive/plain",
            "batch plain", "batch adaptive", "TTFT p50 s", "tok p50 s", "tok p99 s")
    lines = [head]
    for r in rows:
        b, off, on = r["concurrency"], r["plain"], r["adaptive"]
        lines.append((r["context"], b, round(r["steady_sequences"] / r[f"raw_step_s_batch{b}"], 1),
                      off["steady_tokens_per_s"], r["plain_vs_raw"], on["steady_tokens_per_s"], r["adaptive_vs_plain"],
                      off["tokens_per_s"], on["tokens_per_s"], on["ttft_p50_s"], on["token_latency_p50_s"],
                      on["token_latency_p99_s"]))
    cells = [[str(c) for c in line] for line in lines]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_served_table(rows: list[dict]) -> str:
    head = ("streams", "mode", "in process tok/s", "served tok/s", "served/in process", "served TTFT p50 s",
            "served tok p50 s", "served tok p99 s", "other processes' cores")
    lines = [head] + [(r["concurrency"], r["mode"], r["in_process"]["tokens_per_s"], r["served"]["tokens_per_s"],
                       r["served_vs_in_process"], r["served"]["ttft_p50_s"], r["served"]["token_latency_p50_s"],
                       r["served"]["token_latency_p99_s"], r.get("other_processes_cores")) for r in rows]
    cells = [[str(c) for c in line] for line in lines]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
