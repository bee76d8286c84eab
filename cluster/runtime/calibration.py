"""What adaptive K starts from: step costs measured on a few shapes (the rest interpolated) and
the drafter's prior acceptance, cached on disk per model, dtype, device, threads and torch
version so that a restart answers at once. Real rounds refine the costs online (CostModel.observed)."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..speculation import CostModel, DraftRequest, SamplingParams
from ..speculation.round import Drafter, capabilities_of
from .models import cache_dir

CALIBRATION_TEXT = (
    "The committee meets every Tuesday in the small library on the second floor. Each member brings a short "
    "report on the progress of their project, and the group discusses any problems that come up.\n"
    "def mean(values):\n    return sum(values) / len(values)\n"
    "Spring arrived early that year, and the river rose quickly as the snow melted in the hills."
)
FORMAT = 7  # bump when what is measured (or how fast the code runs it) changes: older files are ignored


@dataclass(frozen=True)
class Calibration:
    cost: CostModel
    prior_alpha: float  # the acceptance rate new sequences start from


def measured_lengths(max_k: int, batch: int) -> list[int]:
    """Block lengths (1..max_k + 1) measured at this batch size; the others are interpolated. The
    first draft token is measured everywhere: matmul kernels step in cost with the row count, so
    one token more per sequence can cost far more than its share of the longest block."""
    top = max_k + 1
    points = {1, 2, top} if batch > 1 else {1, 2, (top + 1) // 2, top}
    return sorted(points)


def interpolate(measured: dict[int, float], top: int) -> tuple[float, ...]:
    """Costs for block lengths 1..top, linear between measured lengths, never decreasing."""
    xs = sorted(measured)
    out = []
    for n in range(1, top + 1):
        lo = max(x for x in xs if x <= n)
        hi = min(x for x in xs if x >= n)
        w = 0.0 if hi == lo else (n - lo) / (hi - lo)
        out.append(max(measured[lo] + w * (measured[hi] - measured[lo]), out[-1] if out else 0.0))
    return tuple(out)


def measure_costs(target, drafter: Drafter | None, vocab: int, max_k: int, clock: Callable[[], float] = time.perf_counter,
                  context_len: int = 48, reps: int = 3, batch_sizes: tuple[int, ...] = (4, 16, 64)) -> CostModel:
    """One target call verifying blocks of 1..max_k + 1 tokens for 1 and for each of batch_sizes
    sequences at once after context_len tokens (a few lengths measured, see measured_lengths),
    and one draft step. `target` has CausalLM's interface.

    Every shape is run once before it is timed (oneDNN builds its kernels per shape on first use:
    an untimed first call measured a 2-token verify 50% dearer than a 9-token one), then timed
    `reps` times in interleaved passes, so that a stall of the machine spoils one sample of a
    shape, not all of them; the median counts. A larger batch never costs less than a smaller one."""
    ctx = [(7 * i + 3) % vocab for i in range(context_len)]
    caches = [target.new_cache() for _ in range(max((1, *batch_sizes)))]
    target.forward_batch(caches, [ctx[:-1]] * len(caches), last=[0] * len(caches))  # one flattened prefill

    def verify(b: int, n: int) -> None:
        target.forward_batch(caches[:b], [ctx[-n:]] * b)
        for c in caches[:b]:
            target.rollback(c, n)

    sizes = sorted({1, *(b for b in batch_sizes if b > 1)})
    shapes = [(b, n) for b in sizes for n in measured_lengths(max_k, b)]
    for shape in shapes:
        verify(*shape)
    samples: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
    for _ in range(reps):
        for shape in shapes:
            t = clock()
            verify(*shape)
            samples[shape].append(clock() - t)
    tables: dict[int, tuple[float, ...]] = {}
    for b in sizes:
        row = interpolate({n: statistics.median(samples[(b, n)]) for n in measured_lengths(max_k, b)}, max_k + 1)
        below = tables[max(tables)] if tables else (0.0,) * len(row)
        tables[b] = tuple(map(max, row, below))
    for c in caches:
        target.release(c)
    verify_s = tables.pop(1)
    draft_s: dict[int, float] = {}
    caps = capabilities_of(drafter)
    if drafter is not None:  # one draft step for one sequence; for each batch size too where drafts batch
        draft_sizes = sizes if caps.batches_drafts else [1]
        draft_s = {b: _draft_step_s(drafter, b, ctx, vocab, reps, clock) for b in draft_sizes}
    draft_batch_s = {b: max(t, max(draft_s[c] for c in draft_s if c < b)) for b, t in draft_s.items() if b > 1}
    return CostModel(draft_s.get(1, 0.0), verify_s, tables, draft_parallelism=caps.parallelism,
                     draft_batch_s=draft_batch_s)


def _draft_step_s(drafter: Drafter, b: int, ctx: list[int], vocab: int, reps: int, clock: Callable[[], float]) -> float:
    """Median seconds of one draft token for each of b probe sequences drafting together."""
    greedy, k = SamplingParams(temperature=0.0), 4
    probe_ids = [2**63 - 1 - i for i in range(b)]  # no request gets these ids
    feature_size = capabilities_of(drafter).feature_size
    if feature_size:
        propose = _feature_probe(drafter, feature_size, probe_ids, vocab, len(ctx), k, greedy)
    else:
        propose = lambda: drafter.propose_many([DraftRequest(i, ctx, k, greedy, 0) for i in probe_ids])  # noqa: E731
    propose()  # prefill the probes' draft caches
    propose()  # and a first block: warm
    times = []
    for _ in range(reps):
        t = clock()
        propose()
        times.append(clock() - t)
    for i in probe_ids:
        drafter.release(i)
    return statistics.median(times) / k


def _feature_probe(drafter, feature_size: int, probe_ids: list[int], vocab: int, start: int, k: int,
                   params: SamplingParams) -> Callable[[], None]:
    """Proposals for probe sequences of a drafter that reads the target: one more committed token
    (and a zero feature) a call, as in decoding. The context never repeats itself, so a drafter
    that looks up repeats first (ngram_head) is timed drafting with its model."""
    sent, length = [0], [start - 1]

    def propose() -> None:
        length[0] += 1
        context = [(7 * i + 3) % vocab for i in range(length[0])]
        features = torch.zeros(length[0] - 1 - sent[0], feature_size)
        drafter.propose_many([DraftRequest(i, context, k, params, 0, features, sent[0]) for i in probe_ids])
        sent[0] = length[0] - 1

    return propose


AGREEMENT_INSTRUCTION = "Explain what this text says:\n"  # chat models: the prior is measured on an answer
AGREEMENT_TOKENS = 24


def measure_agreement(target, drafter: Drafter | None, tokenizer) -> float:
    """Greedy agreement of a draft model with the target, teacher-forced, deterministic for given
    weights. With a chat template (served requests are chat turns) it is measured where a draft
    works: on the target's own greedy answer (AGREEMENT_TOKENS) to an instruction about the
    calibration text; the fixed text's own tokens, which no one asked the target to write, agree
    far less (a 0.5B draft of a 1.5B target: 0.56 there, 0.72 on the answer, about 0.9 measured
    serving). Without one, on the fixed text. A drafter that declares its prior (PaSS: measured
    where it was trained) gets it; drafters without a model of their own get 0.5."""
    caps = capabilities_of(drafter)
    if caps.prior_alpha is not None:
        return float(caps.prior_alpha)
    if not caps.own_model:
        return 0.5
    draft = drafter.lm
    if getattr(tokenizer, "has_chat_template", False):
        prompt = tokenizer.encode_chat(AGREEMENT_INSTRUCTION + CALIBRATION_TEXT)[: target.max_context - 1 - AGREEMENT_TOKENS]
        answer = _greedy(target, prompt, AGREEMENT_TOKENS)
        ids, want = prompt + answer[:-1], torch.tensor(answer)
        scored = slice(len(prompt) - 1, None)
    else:
        ids = tokenizer.encode(CALIBRATION_TEXT)[: target.max_context - 1]
        cache = target.new_cache()
        with torch.inference_mode():
            want = target.forward(cache, ids).argmax(dim=-1)
        target.release(cache)
        scored = slice(None)
    cache = draft.new_cache()
    with torch.inference_mode():
        got = draft.forward(cache, ids).argmax(dim=-1)[scored]
    draft.release(cache)
    return float((got == want.to(got.device)).float().mean())


def _greedy(target, prompt: list[int], n: int) -> list[int]:
    cache, out = target.new_cache(), []
    with torch.inference_mode():
        logits = target.forward(cache, prompt, last_only=True)
        for _ in range(n):
            out.append(int(logits[-1].argmax()))
            logits = target.forward(cache, out[-1:], last_only=True)
    target.release(cache)
    return out


def calibration_key(**parts) -> dict:
    """What a calibration depends on: the caller's parts plus this process's torch version and threads."""
    return {"format": FORMAT, "torch": torch.__version__, "threads": torch.get_num_threads()} | parts


def _path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / "calibration" / f"{digest}.json"


def _to_json(c: Calibration) -> dict:
    cost = c.cost
    return {"draft_step_s": cost.draft_step_s, "draft_batch_s": {str(b): t for b, t in cost.draft_batch_s.items()},
            "verify_s": list(cost.verify_s),
            "batch_verify_s": {str(b): list(v) for b, v in cost.batch_verify_s.items()},
            "draft_parallelism": cost.draft_parallelism, "prior_alpha": c.prior_alpha}


def _from_json(d: dict) -> Calibration:
    cost = CostModel(float(d["draft_step_s"]), tuple(map(float, d["verify_s"])),
                     {int(b): tuple(map(float, v)) for b, v in d["batch_verify_s"].items()}, int(d["draft_parallelism"]),
                     {int(b): float(t) for b, t in d["draft_batch_s"].items()})
    return Calibration(cost, float(d["prior_alpha"]))


def recheck_draft_cost(cached: Calibration, drafter: Drafter, vocab: int, clock: Callable[[], float] = time.perf_counter,
                       context_len: int = 48, reps: int = 3) -> Calibration | None:
    """A cached calibration's draft cost against a quick fresh measurement (one sequence, a few
    blocks): if the cache says drafting costs more than twice what it costs now (measured while the
    machine was busy), every draft cost is scaled down to now's; else None (kept). Only downwards:
    a draft cost too high keeps K at 0, so rounds never draft and never correct it, while one too
    low is corrected by the rounds themselves (CostModel.observed_draft)."""
    cached_s = cached.cost.draft_step_s
    if cached_s <= 0:
        return None
    ctx = [(7 * i + 3) % vocab for i in range(context_len)]
    now_s = _draft_step_s(drafter, 1, ctx, vocab, reps, clock)
    if not 0 < now_s < cached_s / 2:
        return None
    print(f"specserve: the cached draft step ({cached_s * 1e3:.1f} ms) is {cached_s / now_s:.1f}x what it measures now "
          f"({now_s * 1e3:.1f} ms): draft costs rescaled", file=sys.stderr, flush=True)
    return Calibration(cached.cost.scaled_draft(now_s / cached_s), cached.prior_alpha)


def load_or_measure(key: dict | None, measure: Callable[[], Calibration],
                    recheck: Callable[[Calibration], Calibration | None] | None = None) -> Calibration:
    """The cached calibration for `key`, else a fresh measurement, saved for next time. key None: no cache.
    recheck(cached) may return a corrected calibration, which replaces the cached one."""
    if key is None:
        return measure()
    path = _path(key)
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == json.loads(json.dumps(key, default=str)):
            cached = _from_json(saved["calibration"])
            corrected = recheck(cached) if recheck is not None else None
            if corrected is None:
                return cached
            _save(path, key, corrected)
            return corrected
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable: measure again
    start = time.perf_counter()
    calibration = measure()
    print(f"specserve: calibrated step costs in {time.perf_counter() - start:.1f} s (cached in {path})",
          file=sys.stderr, flush=True)
    _save(path, key, calibration)
    return calibration


def _save(path: Path, key: dict, calibration: Calibration) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibration-")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "calibration": _to_json(calibration)}, f, default=str)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache only costs the next start a measurement
        print(f"specserve: calibration not cached: {e}", file=sys.stderr)
