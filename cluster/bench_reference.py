"""The bench's reference rows: what the target's forward costs without the engine, per weight
format, and a peer: transformers' own generate (plain, prompt lookup, assisted generation with the
config's draft model) on the same prompts, so each system is measured against its own plain
decoding in the same run.

The raw forward is the Hugging Face model with its own cache (DynamicCache, its default
attention): a step of N tokens for B sequences after a context, the cache cropped back after
each call. Ratios are to the one-token step of the same format.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import torch

RAW_SHAPES = ((1, 1), (1, 5), (1, 9), (16, 1))  # (sequences, tokens each)
RAW_CONTEXT = 224  # tokens of context before each timed call (a prompt of a few hundred tokens)


def raw_step_s(model: torch.nn.Module, shapes=RAW_SHAPES, context: int = RAW_CONTEXT, reps: int = 3,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of one HF forward per shape "BxN", the model's own KV cache, after `context`."""
    from transformers import DynamicCache

    from .runtime.formats import median_times

    vocab, device = int(model.config.vocab_size), next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    caches = {}
    with torch.inference_mode():
        for b in sorted({b for b, _ in shapes}):
            cache = DynamicCache()
            ids = torch.randint(vocab, (b, context), generator=gen).to(device)
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            caches[b] = cache

        def call(b: int, n: int) -> None:
            ids = torch.randint(vocab, (b, n), generator=gen).to(device)
            model(input_ids=ids, past_key_values=caches[b], use_cache=True)
            caches[b].crop(-n)  # drop the n new positions

        return median_times(call, shapes, reps, clock)


def forward_rows(model_name: str, formats: list[tuple[str, str]], device: str = "cpu", log=print) -> list[dict]:
    """One row per (dtype, kernel): the raw forward's ms per shape and ratio to its one-token step,
    and the same through specserve's KV store (formats.time_model, the engine's forward)."""
    from .runtime.formats import time_model
    from .runtime.models import in_format, load_model

    rows = []
    for dtype, kernel in formats:
        log(f"reference forward: {model_name} in {dtype}/{kernel}")
        loaded = load_model(model_name, "float32" if dtype == "int8" else dtype, device)
        model = in_format(loaded.model, dtype, kernel)
        raw, engine = raw_step_s(model), time_model(model)
        one = raw["1x1"]
        rows.append(dict(format=f"{dtype}/{kernel}", raw_ms={k: round(1e3 * v, 2) for k, v in raw.items()},
                         raw_ratio={k: round(v / one, 3) for k, v in raw.items()},
                         kv_store_ms={k: round(1e3 * v, 2) for k, v in engine.items()}))
        del loaded, model
    return rows


def text_table(cells: list[list[str]]) -> str:
    """Left-aligned columns, a rule under the first (header) line."""
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_forward_rows(rows: list[dict]) -> str:
    shapes = [f"{b}x{n}" for b, n in RAW_SHAPES]
    head = ["format", *(f"raw {s} ms" for s in shapes), *(f"{s}/1x1" for s in shapes[1:]), "kv store 1x1 ms"]
    return text_table([head] + [[r["format"], *(str(r["raw_ms"][s]) for s in shapes),
                                 *(f"{r['raw_ratio'][s]}x" for s in shapes[1:]), str(r["kv_store_ms"]["1x1"])]
                                for r in rows])


def peer_runs(target, draft_model: torch.nn.Module | None, prompts: list[tuple[str, str]], max_new: int,
              temperatures: list[float], reps: int, encode: Callable[[str], list[int]], log=print) -> list[dict]:
    """transformers' generate on the bench's prompts: plain, prompt lookup and (with a draft model)
    assisted generation; each variant its fastest of `reps`. Rows of {temperature, category,
    prompt, variant, seconds, tokens}."""
    model = target.model
    variants = {"plain": {}, "prompt_lookup": {"prompt_lookup_num_tokens": 10}}
    if draft_model is not None:
        variants["assisted"] = {"assistant_model": draft_model}
    eos = getattr(model.generation_config, "eos_token_id", None)
    runs = []
    for temperature in temperatures:
        for i, (category, prompt) in enumerate(prompts):
            log(f"peer T={temperature} prompt {i + 1}/{len(prompts)} ({category})")
            ids = torch.tensor([encode(prompt)], device=model.device)
            for name, extra in variants.items():
                best = None
                for _ in range(reps):
                    torch.manual_seed(1000 + i)
                    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 \
                        else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
                    t = time.perf_counter()
                    with torch.inference_mode():
                        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                             min_new_tokens=max_new, pad_token_id=eos if isinstance(eos, int) else 0,
                                             **sampling, **extra)
                    seconds = time.perf_counter() - t
                    tokens = out.shape[1] - ids.shape[1]
                    if best is None or seconds < best["seconds"]:
                        best = dict(temperature=temperature, category=category, prompt=i, variant=name,
                                    seconds=seconds, tokens=tokens, token_ids=out[0, ids.shape[1]:].tolist())
                runs.append(best)
    return runs


def peer_rows(runs: list[dict], categories: tuple[str, ...]) -> list[dict]:
    """Per (temperature, category and "all", variant): tokens/s and speedup over its own plain."""
    rows = []
    for temperature in sorted({r["temperature"] for r in runs}):
        for prompts in (*categories, "all"):
            sel = [r for r in runs if r["temperature"] == temperature and prompts in (r["category"], "all")]
            rates = {}
            for variant in dict.fromkeys(r["variant"] for r in sel):
                rs = [r for r in sel if r["variant"] == variant]
                rates[variant] = sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs)
            for variant, rate in rates.items():
                rows.append(dict(system="transformers", temperature=temperature, prompts=prompts, variant=variant,
                                 tokens_per_s=round(rate, 2), speedup=round(rate / rates["plain"], 3)))
    return rows


def format_peer_rows(rows: list[dict]) -> str:
    head = ["T", "prompts", "transformers", "tok/s", "speedup"]
    return text_table([head] + [[str(r["temperature"]), r["prompts"], r["variant"], str(r["tokens_per_s"]),
                                 f"{r['speedup']}x"] for r in rows])


def log_stderr(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)
