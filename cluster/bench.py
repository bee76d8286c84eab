"""`specserve bench`: the project's prompts with speculation off and on, per drafter and K.

Every variant runs on the same prompts in the same process; for each prompt the variants run
back to back, `reps` times over, and each keeps its fastest time, so machine noise hits them
alike and mostly drops out. Speedup is tokens/s over K = 0 in this run.
"""

from __future__ import annotations

import json
import platform
import time
from collections import defaultdict

import torch

from .config import SpecserveConfig
from .bench_reference import (format_forward_rows, format_peer_rows, forward_rows, log_stderr, peer_rows, peer_runs,
                              text_table)
from .registry import DRAFTERS, unusable
from .runtime.requests import GenerationRequest
from .runtime.factory import load_target, make_engine, second_stage
from .runtime.formats import candidates
from .runtime.models import select_device
from .speculation import InvalidRequest, SamplingParams, mean_expected_tokens
from .speculation.round import capabilities_of
from .bench_prompts import bench_prompts

CATEGORIES = ("chat", "grounded", "code")
DEFAULT_TREE_NODES = 8  # tree rows' node budget when the config's speculation.tree.max_nodes is 0


def load_prompts(quick: bool) -> list[tuple[str, str]]:
    data = bench_prompts()
    per = 1 if quick else 2
    return [(cat, p) for cat in CATEGORIES for p in data[cat][:per]]


def runnable_drafters(config: SpecserveConfig) -> list[str]:
    """The registry's drafters this config can build on this device."""
    device = select_device(config.target.device).type
    return [name for name in DRAFTERS if unusable(name, config.draft, config.target.model, device) is None]


def choose_drafters(config: SpecserveConfig, names: list[str] | None, quick: bool = False) -> list[str]:
    """`names` (--drafters), checked against what this config can run; None: all it can, or with
    quick the config's drafter, prompt lookup, and the draft model where one is named."""
    runnable = runnable_drafters(config)
    if names is None and quick:
        names = [n for n in (config.draft.drafter, "ngram", "model" if config.draft.model.name else None)
                 if n in runnable]
    if names is None:
        return runnable
    for name in names:
        if name not in runnable:
            raise InvalidRequest("drafters", f"{name!r} cannot run with this config; choose from {', '.join(runnable)}")
    return list(dict.fromkeys(names))


def run_bench(config: SpecserveConfig, json_out: str | None = None, plot: str | None = None, quick: bool = False,
              drafters: list[str] | None = None, temperatures: list[float] | None = None) -> int:
    prompts = load_prompts(quick)
    max_new = 40 if quick else 96
    reps = 2 if quick else 3
    temperatures = temperatures or [0.0, 1.0]
    fixed_ks = [] if quick else [k for k in (2, 4, 8) if k <= config.speculation.max_draft_tokens]
    drafters = choose_drafters(config, drafters, quick)
    log = log_stderr

    log(f"loading {config.target.model} ({config.target.dtype})")
    target = load_target(config)
    log(f"target format: {target.format}")
    adaptive = config.model_copy(update={"speculation": config.speculation.model_copy(update={"num_draft_tokens": "adaptive"})})
    engines = {}
    for name in drafters:
        log(f"building drafter {name} and measuring step costs")
        engines[name] = make_engine(adaptive, target, drafter=name)
        engines[name].generate([GenerationRequest(prompts[0][1], 8)])  # warm-up, calibrates costs
    tree_nodes = config.speculation.tree.max_nodes or DEFAULT_TREE_NODES
    stage = second_stage(config.draft.model_copy(update={"second_stage": "ngram"}))
    variants = [("none", "chain", 1, 0)] + [
        (d, shape, stages, k) for d in drafters
        for shape in (("chain", "tree") if capabilities_of(engines[d].drafter).drafts_trees else ("chain",))
        for stages in ((1, 2) if DRAFTERS[d].staged and not quick else (1,))
        for k in [*fixed_ks, "adaptive"]
    ]

    runs = []  # one per (temperature, prompt, variant): its fastest rep
    plain_spread = []  # per prompt: slowest / fastest plain run - 1, the noise floor
    started = time.perf_counter()
    for temperature in temperatures:
        for i, (category, prompt) in enumerate(prompts):
            log(f"T={temperature} prompt {i + 1}/{len(prompts)} ({category})")
            engines[drafters[0]].generate([GenerationRequest(prompt, 4, num_draft_tokens=0)])  # first-shape warm-up
            best, plain_times = {}, []
            for _ in range(reps):
                for variant in variants:
                    drafter, shape, stages, k = variant
                    engine = engines[drafters[0] if drafter == "none" else drafter]
                    engine.tree_nodes = tree_nodes if shape == "tree" else 0
                    if DRAFTERS.get(drafter) and DRAFTERS[drafter].staged:
                        engine.drafter.second_stage = stage if stages == 2 else None
                    request = GenerationRequest(
                        prompt, max_new, SamplingParams(temperature=temperature, seed=1000 + i),
                        num_draft_tokens=None if k == "adaptive" else k,
                    )
                    t = time.perf_counter()
                    result = engine.generate([request])[0]
                    seconds = time.perf_counter() - t
                    if drafter == "none":
                        plain_times.append(seconds)
                    if variant not in best or seconds < best[variant]["seconds"]:
                        best[variant] = dict(temperature=temperature, category=category, prompt=i, drafter=drafter,
                                             shape=shape, stages=stages, k=k, seconds=seconds,
                                             token_ids=result.token_ids, stats=result.stats)
            runs.extend(best.values())
            plain_spread.append(max(plain_times) / min(plain_times) - 1)
    log(f"measured in {time.perf_counter() - started:.0f} s")
    noise = round(sum(plain_spread) / len(plain_spread), 3)
    rows = aggregate(runs)
    plain = engines[drafters[0]]
    log("plain decoding at 1 and 16 sequences, prefill excluded")
    decode = [plain_decode(plain, prompts, max_new, 1 if quick else reps, b) for b in (1, 16)]
    draft = engines["model"].drafter.lm.model if "model" in engines and config.draft.model.name else None
    peers = peer_rows(peer_runs(target, draft, prompts, max_new, temperatures, 1 if quick else reps,
                                lambda p: plain.validate(GenerationRequest(p, max_new)), log), CATEGORIES)
    device = select_device(config.target.device)
    others = candidates() if device.type == "cpu" and not quick else [("float32", "mkl" if device.type == "cpu" else device.type)]
    kinds = list(dict.fromkeys([(target.format.dtype, target.format.kernel), *others]))
    forwards = forward_rows(config.target.model, kinds, str(device), log)

    print(format_table(rows))
    print(f"noise floor: identical plain runs of a prompt differed by {100 * noise:.1f}% on average "
          f"(slowest vs fastest of {reps}); each variant keeps its fastest of {reps}")
    print(f"\nthe engine's plain decoding against the raw forward ({target.format.dtype}/{target.format.kernel}):")
    print(format_engine_vs_raw(decode, forwards[0]))
    print("\nraw forward (transformers, its own cache) and specserve's KV store, per weight format:")
    print(format_forward_rows(forwards))
    print("\npeer: transformers' generate on the same prompts (speedup over its own plain generate):")
    print(format_peer_rows(peers))
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"config": config.model_dump(), "machine": machine(), "quick": quick,
                       "max_new_tokens": max_new, "reps": reps, "target_format": str(target.format),
                       "plain_rep_spread": noise, "rows": rows, "plain_decode": decode, "forward": forwards,
                       "peer": peers}, f, indent=2)
        log(f"wrote {json_out}")
    if plot:
        plot_speedup(rows, plot)
        log(f"wrote {plot}")
    return 0


def plain_decode(engine, prompts: list[tuple[str, str]], max_new: int, reps: int, sequences: int) -> dict:
    """Plain decoding of `sequences` requests at once (the prompts cycled), greedy: decode tokens/s
    of all of them, prefill excluded (the time of a one-token run of the same requests is taken
    off), each run its fastest of `reps`."""
    def fastest(n: int) -> tuple[float, int]:
        requests = [GenerationRequest(prompts[i % len(prompts)][1], n, num_draft_tokens=0) for i in range(sequences)]
        runs = []
        for _ in range(reps):
            t = time.perf_counter()
            results = engine.generate(requests)
            runs.append((time.perf_counter() - t, sum(len(r.token_ids) for r in results)))
        return min(runs)

    (total_s, tokens), (prefill_s, first) = fastest(max_new), fastest(1)
    return dict(sequences=sequences, tokens=tokens, seconds=round(total_s, 3), prefill_seconds=round(prefill_s, 3),
                tokens_per_s=round((tokens - first) / (total_s - prefill_s), 2))


def format_engine_vs_raw(decode: list[dict], forward: dict) -> str:
    """The engine's plain decode tokens/s over the raw forward's one-token step rate, per batch."""
    cells = [["sequences", "engine plain decode tok/s", "raw forward tok/s", "ratio"]]
    for d in decode:
        b = d["sequences"]
        raw = b * 1e3 / forward["raw_ms"][f"{b}x1"]
        cells.append([str(b), str(d["tokens_per_s"]), f"{raw:.2f}", f"{d['tokens_per_s'] / raw:.2f}x"])
    return text_table(cells)


def aggregate(runs: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for r in runs:
        for prompts in (r["category"], "all"):
            groups[(r["drafter"], r["shape"], r["stages"], r["k"], r["temperature"], prompts)].append(r)
    plain = {}
    for r in runs:
        if r["drafter"] == "none":
            plain[(r["temperature"], r["prompt"])] = r["token_ids"]
    rows = []
    for (drafter, shape, stages, k, temperature, prompts), rs in groups.items():
        tokens = sum(len(r["token_ids"]) for r in rs)
        seconds = sum(r["seconds"] for r in rs)
        calls = sum(r["stats"].target_calls for r in rs)
        accepted = sum(r["stats"].accepted_tokens for r in rs)
        evaluated = sum(r["stats"].evaluated_tokens for r in rs)
        alpha = accepted / evaluated if evaluated else None  # None: no draft was judged
        rounds = [kr for r in rs for kr in r["stats"].rounds_k]
        drafted = sum(r["stats"].draft_tokens for r in rs)
        draft_s = sum(r["stats"].draft_s for r in rs)
        row = dict(
            drafter=drafter, shape=shape, stages=stages, k=k, temperature=temperature, prompts=prompts,
            tokens=tokens, seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 2),
            acceptance_rate=None if alpha is None else round(alpha, 4),
            tokens_per_target_call=round(tokens / calls, 3),
            expected_tokens_per_target_call=round(mean_expected_tokens(alpha or 0.0, rounds), 3),
            mean_k=round(sum(rounds) / len(rounds), 2),
            mean_accepted=round(accepted / calls, 3),
            draft_s=round(draft_s, 3),
            draft_ms_per_token=round(1000 * draft_s / drafted, 3) if drafted else None,
            verify_s=round(sum(r["stats"].verify_s for r in rs), 3),
            # acceptance's reads from the target's device: a constant a round; ids and counts only
            host_syncs_per_round=round(sum(r["stats"].host_syncs for r in rs) / calls, 2),
            host_bytes_per_round=round(sum(r["stats"].host_bytes for r in rs) / calls, 1),
        )
        if temperature == 0:
            row["matches_plain"] = all(r["token_ids"] == plain[(0.0, r["prompt"])] for r in rs)
        rows.append(row)
    base = {(r["temperature"], r["prompts"]): r["tokens_per_s"] for r in rows if r["drafter"] == "none"}
    for row in rows:
        row["speedup"] = round(row["tokens_per_s"] / base[(row["temperature"], row["prompts"])], 3)
    order = {name: i for i, name in enumerate(("none", *DRAFTERS))}
    kkey = lambda k: 99 if k == "adaptive" else k  # noqa: E731
    prompt_order = {p: i for i, p in enumerate((*CATEGORIES, "all"))}
    rows.sort(key=lambda r: (r["temperature"], prompt_order[r["prompts"]], order[r["drafter"]], r["shape"], r["stages"],
                             kkey(r["k"])))
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [("T", "temperature"), ("prompts", "prompts"), ("drafter", "drafter"), ("shape", "shape"),
            ("stages", "stages"), ("K", "k"),
            ("tok/s", "tokens_per_s"), ("speedup", "speedup"), ("alpha", "acceptance_rate"),
            ("tok/call", "tokens_per_target_call"), ("expected", "expected_tokens_per_target_call"),
            ("mean K", "mean_k"), ("draft ms/tok", "draft_ms_per_token"), ("syncs/round", "host_syncs_per_round"),
            ("bytes/round", "host_bytes_per_round"), ("= plain", "matches_plain")]
    show = lambda v: "-" if v is None else str(v)  # noqa: E731
    return text_table([[h for h, _ in cols]] + [[show(r.get(key, "")) for _, key in cols] for r in rows])


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


def plot_speedup(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, prompts in zip(axes, ("all", "grounded")):
        sel = [r for r in rows if r["prompts"] == prompts and r["temperature"] == 0 and r["shape"] == "chain"
               and r["stages"] == 1]
        for drafter in sorted({r["drafter"] for r in sel} - {"none"}):
            fixed = sorted((r["k"], r["speedup"]) for r in sel if r["drafter"] == drafter and r["k"] != "adaptive")
            line, = ax.plot([0] + [k for k, _ in fixed], [1.0] + [s for _, s in fixed], marker="o", label=drafter)
            for r in sel:
                if r["drafter"] == drafter and r["k"] == "adaptive":
                    ax.axhline(r["speedup"], color=line.get_color(), linestyle="--", linewidth=1,
                               label=f"{drafter}, adaptive K")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(f"prompts: {prompts}, greedy")
        ax.set_xlabel("K (draft tokens per round)")
    axes[0].set_ylabel("speedup over K = 0")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
