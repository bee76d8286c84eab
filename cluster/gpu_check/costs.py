"""The costs part: what a forward of T new tokens for each of B sequences costs on the device, after
the same cached context, so the flatness of verification is a measured ratio (T x B against 1 x 1).

- engine: the engine's verify call, runtime/kv.py's CausalLM.forward_batch (the flattened batch over
  the KV pool, greedy rows as argmax ids), then a rollback, as calibration times it;
- raw: the Hugging Face forward with its own DynamicCache, logits of every new row on the device.
Medians of `reps` timed calls after one untimed call per shape."""

from __future__ import annotations

import statistics

import torch

from ..runtime.factory import load_target
from ..runtime.kv import CausalLM
from .common import Context, Recorder, clock, log
from .plans import SIZES, main_plan

REPS = 5


def run(ctx: Context, rec: Recorder) -> None:
    sizes = SIZES[ctx.mode]
    config = main_plan(ctx).config
    target = load_target(config)
    rec.put("model", config.target.model)
    rec.put("dtype", target.dtype)
    rec.put("context", sizes.cost_context)
    lm, tick = CausalLM(target.model), clock(ctx.device)
    ctx_ids = [(7 * i + 3) % lm.vocab_size for i in range(sizes.cost_context + max(sizes.cost_tokens))]
    rows = []
    for b in sizes.cost_batches:
        engine = engine_times(lm, b, sizes.cost_context, sizes.cost_tokens, ctx_ids, tick)
        raw = raw_times(target.model, b, sizes.cost_context, sizes.cost_tokens, ctx_ids, tick)
        for n in sizes.cost_tokens:
            rows.append({"batch": b, "tokens": n, "engine_ms": round(1e3 * engine[n], 3), "raw_ms": round(1e3 * raw[n], 3)})
        log(f"batch {b}: engine {[r['engine_ms'] for r in rows[-len(sizes.cost_tokens):]]} ms, "
            f"raw {[r['raw_ms'] for r in rows[-len(sizes.cost_tokens):]]} ms for {list(sizes.cost_tokens)} tokens")
        rec.put("rows", with_ratios(rows))
    rows = with_ratios(rows)
    rec.put("rows", rows)
    bad = [r for r in rows if not (r["engine_ms"] > 0 and r["raw_ms"] > 0)]
    if bad:
        rec.problem(f"unmeasurable timings: {bad}")
    rec.put("summary", summary(rows, sizes))


def engine_times(lm: CausalLM, batch: int, context: int, lengths, ids: list[int], tick) -> dict[int, float]:
    caches = [lm.new_cache() for _ in range(batch)]
    lm.forward_batch(caches, [ids[:context]] * batch, last=[0] * batch)  # one flattened prefill

    def verify(n: int) -> None:
        lm.forward_batch(caches, [ids[context : context + n]] * batch, argmax_only=[True] * batch)
        for c in caches:
            lm.rollback(c, n)

    times = median_times(verify, lengths, tick)
    for c in caches:
        lm.release(c)
    return times


@torch.inference_mode()
def raw_times(model, batch: int, context: int, lengths, ids: list[int], tick) -> dict[int, float]:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    block = torch.tensor([ids] * batch, device=device)  # [B, context + max(lengths)]
    cache = DynamicCache()
    model(input_ids=block[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)

    def verify(n: int) -> None:
        model(input_ids=block[:, context : context + n], past_key_values=cache, use_cache=True)
        cache.crop(-n)

    return median_times(verify, lengths, tick)


def median_times(call, lengths, tick) -> dict[int, float]:
    """Every length run once untimed, then REPS interleaved timed passes; the median of each."""
    for n in lengths:
        call(n)
    samples: dict[int, list[float]] = {n: [] for n in lengths}
    for _ in range(REPS):
        for n in lengths:
            t = tick()
            call(n)
            samples[n].append(tick() - t)
    return {n: statistics.median(s) for n, s in samples.items()}


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's cost over the 1-token, batch-1 step of the same kind, and engine over raw."""
    base = next((r for r in rows if r["batch"] == 1 and r["tokens"] == 1), None)
    out = []
    for r in rows:
        extra = {"engine_over_raw": round(r["engine_ms"] / r["raw_ms"], 3)}
        if base is not None:
            extra |= {"engine_ratio": round(r["engine_ms"] / base["engine_ms"], 3),
                      "raw_ratio": round(r["raw_ms"] / base["raw_ms"], 3)}
        out.append({k: v for k, v in r.items() if k not in extra} | extra)
    return out


def summary(rows: list[dict], sizes) -> str:
    top_t, top_b = max(sizes.cost_tokens), max(sizes.cost_batches)
    pick = {(r["batch"], r["tokens"]): r for r in rows}
    one, wide, big = pick[(1, 1)], pick[(1, top_t)], pick[(top_b, top_t)]
    return (f"1x1 step engine {one['engine_ms']} ms, raw {one['raw_ms']} ms; {top_t} tokens x1: engine "
            f"{wide['engine_ratio']}x, raw {wide['raw_ratio']}x; {top_t} tokens x{top_b}: engine {big['engine_ratio']}x, "
            f"raw {big['raw_ratio']}x")
