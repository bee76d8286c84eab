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
  time is set by its unluckiest sequence).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from importlib import resources

import torch

from .config import SpecserveConfig
from .runtime.engine import GenerationRequest
from .runtime.factory import load_target, make_engine
from .speculation import SamplingParams


def corpus_ids(tokenizer) -> list[int]:
    """The bench prompts' text as one token stream to cut prompts of any length from."""
    data = json.loads(resources.files("cluster").joinpath("prompts/bench.json").read_text())
    text = "\n\n".join(p for prompts in data.values() for p in prompts)
    return tokenizer.encode(text)


def prompt_ids(corpus: list[int], length: int, index: int) -> tuple[int, ...]:
    """A prompt of `length` tokens, a different cut of the corpus for each index."""
    start = (index * 37) % len(corpus)
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
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(reps + 1):
            x = torch.randint(0, vocab, (batch, new))
            t = time.perf_counter()
            model(input_ids=x, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
            cache.crop(-new)
    return statistics.median(times[1:])


def steady_decode(engine, prompts: list[tuple[int, ...]], num_draft_tokens: int | None,
                  rounds: int, min_s: float = 1.0) -> tuple[float, int, int]:
    """Tokens/s of at least `rounds` rounds and min_s seconds in which every live sequence decodes (all prompts prefilled),
    the mean context then and how many sequences were live (one may end at EOS on the way).
    The sequences are aborted afterwards."""
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
        tokens += sum(len(o.new_token_ids) for o in engine.step())
        done += 1
    seconds = time.perf_counter() - start
    for i in ids:
        engine.abort(i)
    return tokens / seconds, context, len(seqs)


def run_engine(engine, requests: list[GenerationRequest]) -> dict:
    """Runs the requests together as users would send them at once; per-token latencies from
    the rounds' emission times."""
    start = time.perf_counter()
    ids = [engine.add_request(r) for r in requests]
    first, last, gaps, tokens = {}, {}, [], 0
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for o in outputs:
            n = len(o.new_token_ids)
            if not n:
                continue
            tokens += n
            if o.seq_id not in first:
                first[o.seq_id] = now - start
            else:
                gaps += [(now - last[o.seq_id]) / n] * n
            last[o.seq_id] = now
    wall = time.perf_counter() - start
    q = statistics.quantiles(gaps, n=100) if len(gaps) > 1 else [gaps[0] if gaps else 0.0] * 99
    return {
        "sequences": len(ids), "tokens": tokens, "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(statistics.median(first.values()), 4),
        "token_latency_p50_s": round(q[49], 4), "token_latency_p99_s": round(q[98], 4),
    }


def run_load_bench(config: SpecserveConfig, json_out: str | None = None, quick: bool = False) -> int:
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
    print(format_load_table(rows))
    if json_out:
        from .bench import machine

        with open(json_out, "w") as f:
            json.dump({"config": config.model_dump(), "dtype": target.dtype, "machine": machine(), "quick": quick,
                       "new_tokens": new_tokens, "rows": rows}, f, indent=2)
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
