"""The exactness part: greedy speculative output against plain greedy output (K = 0, the same
engine and dtype) on the bench's six prompts, per dtype, drafter, shape (a chain, a 12-node tree)
and K (adaptive, and a fixed K that drafts every round, so the path is exercised even where
adaptive K keeps drafting off). Equal prompts are counted, never assumed: on the CPU in float32
(the project's guarantee) one differing prompt fails the part; elsewhere (bfloat16, GPU kernels)
it is reported. A fixed-K row that verified no draft (or no tree) fails the part too."""

from __future__ import annotations

import time

from ..bench import load_prompts
from ..runtime.requests import GenerationRequest
from ..runtime.factory import load_target, make_engine
from ..speculation import SamplingParams
from ..speculation.round import capabilities_of
from .common import Context, Recorder, free_device_memory, log
from .plans import SIZES, TargetPlan, main_plan, qwen_plan

GREEDY = SamplingParams(temperature=0.0)
KS = ("adaptive", 4)


def run(ctx: Context, rec: Recorder) -> None:
    check(ctx, rec, main_plan(ctx))


def run_qwen(ctx: Context, rec: Recorder) -> None:
    check(ctx, rec, qwen_plan(ctx))


def check(ctx: Context, rec: Recorder, plan: TargetPlan) -> None:
    prompts = [p for _, p in load_prompts(quick=False)]
    n = SIZES[ctx.mode].exact_tokens
    rec.put("model", plan.label)
    rec.put("prompts", len(prompts))
    rec.put("new_tokens", n)
    rows = []
    for dtype in plan.dtypes:
        config = plan.at(dtype)
        log(f"loading {plan.label} in {dtype} on {ctx.device}")
        target = load_target(config)
        plain = None
        for drafter in plan.drafters:
            engine = make_engine(config, target, drafter=drafter)
            if plain is None:
                plain = engine.generate([GenerationRequest(p, n, GREEDY, num_draft_tokens=0) for p in prompts])
            shapes = ("chain", "tree") if capabilities_of(engine.drafter).drafts_trees else ("chain",)
            for shape in shapes:
                engine.tree_nodes = config.speculation.tree.max_nodes if shape == "tree" else 0
                for k in KS:
                    rows.append(compare(engine, prompts, n, plain, None if k == "adaptive" else k)
                                | {"dtype": dtype, "drafter": drafter, "shape": shape, "k": k,
                                   "required": ctx.cpu and dtype == "float32"})
                    rec.put("rows", rows)
                    judge(rec, rows[-1])
            del engine
        del target, plain
        free_device_memory()
    rec.put("summary", summary(rows))


def judge(rec: Recorder, r: dict) -> None:
    name = f"{r['dtype']} {r['drafter']} {r['shape']} K={r['k']}"
    log(f"{name}: {r['equal']}/{r['prompts']} prompts equal plain ({r['draft_tokens']} drafted, {r['tree_rounds']} tree rounds)")
    if r["required"] and r["equal"] < r["prompts"]:
        rec.problem(f"{name}: {r['equal']}/{r['prompts']} prompts equal plain greedy (first differences at {r['differs_at']})")
    if r["k"] != "adaptive" and (r["draft_tokens"] == 0 or (r["shape"] == "tree" and r["tree_rounds"] == 0)):
        rec.problem(f"{name}: no {'tree' if r['shape'] == 'tree' else 'draft'} was verified: the path was not exercised")


def compare(engine, prompts: list[str], n: int, plain: list, k: int | None) -> dict:
    """The prompts in one greedy batch at K = k (None: the engine's policy, adaptive), against plain."""
    t = time.perf_counter()
    results = engine.generate([GenerationRequest(p, n, GREEDY, num_draft_tokens=k) for p in prompts])
    seconds = time.perf_counter() - t
    differs = {i: first_difference(r.token_ids, want.token_ids) for i, (r, want) in enumerate(zip(results, plain))
               if r.token_ids != want.token_ids}
    stats = [r.stats for r in results]
    return {"equal": len(prompts) - len(differs), "prompts": len(prompts), "differs_at": differs,
            "tokens": sum(len(r.token_ids) for r in results), "seconds": round(seconds, 3),
            "draft_tokens": sum(s.draft_tokens for s in stats), "accepted_tokens": sum(s.accepted_tokens for s in stats),
            "tree_rounds": sum(s.tree_rounds for s in stats), "target_calls": sum(s.target_calls for s in stats)}


def first_difference(got: list[int], want: list[int]) -> int:
    """The first position where the token lists differ (the shorter length where one is a prefix)."""
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def summary(rows: list[dict]) -> str:
    """Equal prompts per dtype, drafter and shape, K as in KS."""
    cells: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        cells.setdefault(r["dtype"], {}).setdefault(f"{r['drafter']} {r['shape']}", []).append(str(r["equal"]))
    n = rows[0]["prompts"] if rows else 0
    return (f"equal prompts of {n} (K {' | '.join(map(str, KS))}): "
            + "; ".join(f"{dtype} " + ", ".join(f"{name} {'|'.join(v)}" for name, v in by.items()) for dtype, by in cells.items()))
