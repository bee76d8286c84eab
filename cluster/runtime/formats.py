"""dtype `auto`: the weight format a model runs in on this machine, chosen by measurement.

On a GPU, bfloat16. On a CPU, every candidate format is loaded in turn and the whole model is
timed through the KV store at the round's shapes (a decode step, verify blocks of 5 and 9 tokens,
16 sequences of one token): float32 through MKL and through oneDNN, bfloat16 where the CPU
computes it natively (AVX512-BF16 or AMX), int8 with each of its kernels. The fastest wins
(geometric mean over the shapes). int8 wins only if its quality cost is within QUALITY_GOAL:
the int8 model's perplexity on the bench's texts against float32's (runtime/quality.py);
otherwise the fastest other format is kept and the reason says so. The choice is cached per
model, CPU flags, torch version and thread count, printed at start and shown by Health.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

QUALITY_GOAL = 1.02  # int8 perplexity / float32 perplexity at most this for auto to pick int8
SHAPES = ((1, 1), (1, 5), (1, 9), (16, 1))  # (sequences, tokens each) of the round
CONTEXT = 128  # tokens each sequence holds before a timed call


@dataclass(frozen=True)
class Format:
    dtype: str  # float32 | bfloat16 | int8
    kernel: str  # mkl | onednn | native | emulated | cuda | fbgemm | int_mm
    reason: str = ""  # how it was chosen: the measured costs and int8's quality cost, for auto

    def __str__(self) -> str:
        return f"{self.dtype} ({self.kernel})" + (f": {self.reason}" if self.reason else "")


def default_kernel(dtype: str, device: torch.device, flags: frozenset[str] | None = None) -> str:
    """The kernel an explicitly named dtype runs with: torch's own path (int8: the kernel measured
    for this machine, models.int8_kernel)."""
    from .models import NATIVE_BF16_FLAGS, cpu_flags, int8_kernel

    if device.type != "cpu":
        return device.type
    if dtype == "int8":
        return int8_kernel()
    if dtype == "bfloat16":
        flags = cpu_flags() if flags is None else flags
        return "native" if any(f in flags for f in NATIVE_BF16_FLAGS) else "emulated"
    return "mkl"


def resolve(dtype: str, device: torch.device, model: str | None = None) -> Format:
    """The format `dtype` names on `device`; `auto` with a model measures (cached), `auto` without
    one falls back to the flag rule (models.choose_dtype)."""
    from .models import choose_dtype

    if dtype != "auto":
        return Format(dtype, default_kernel(dtype, device))
    if device.type != "cpu":
        return Format("bfloat16", device.type, "auto on a GPU")
    if model is None:
        chosen = choose_dtype("auto", device)
        return Format(chosen, default_kernel(chosen, device), "auto by CPU flags (no model to measure)")
    return cached_choice(model)


def cached_choice(model: str, measure: Callable[[str], Format] | None = None) -> Format:
    from .models import cache_dir, cpu_flags

    key = hashlib.sha256(
        f"{model}|{sorted(cpu_flags())}|{torch.__version__}|{torch.get_num_threads()}".encode()).hexdigest()[:16]
    path = cache_dir() / "formats" / f"{key}.json"
    try:
        chosen = Format(**json.loads(path.read_text())["format"])
        print(f"specserve: dtype auto for {model}: {chosen.dtype} ({chosen.kernel}), as measured before ({path})",
              file=sys.stderr)
        return chosen
    except (OSError, ValueError, KeyError, TypeError):
        pass
    chosen = (measure or measure_formats)(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model, "format": asdict(chosen)}))
    return chosen


def candidates(flags: frozenset[str] | None = None) -> list[tuple[str, str]]:
    from . import onednn
    from .int8 import KERNELS
    from .models import NATIVE_BF16_FLAGS, cpu_flags

    flags = cpu_flags() if flags is None else flags
    out = [("float32", "mkl")]
    if onednn.available():
        out.append(("float32", "onednn"))
    if any(f in flags for f in NATIVE_BF16_FLAGS):
        out.append(("bfloat16", "native"))
    return out + [("int8", k) for k in KERNELS]


def time_model(model: torch.nn.Module, shapes=SHAPES, reps: int = 3,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of one target call through the KV store per shape "BxN" after CONTEXT tokens."""
    from .kv import CausalLM

    lm = CausalLM(model)
    ctx = [(7 * i + 3) % lm.vocab_size for i in range(CONTEXT + max(n for _, n in shapes))]
    caches = [lm.new_cache() for _ in range(max(b for b, _ in shapes))]
    with torch.inference_mode():
        lm.forward_batch(caches, [ctx[:CONTEXT]] * len(caches), last=[0] * len(caches))

        def call(b: int, n: int) -> None:
            lm.forward_batch(caches[:b], [ctx[CONTEXT:CONTEXT + n]] * b)
            for c in caches[:b]:
                lm.rollback(c, n)

        times = median_times(call, shapes, reps, clock)
    for c in caches:
        lm.release(c)
    return times


def median_times(call: Callable[[int, int], None], shapes, reps: int,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of call(b, n) per shape "BxN": each shape once untimed (oneDNN builds its
    kernels per shape on first use), then `reps` interleaved passes, so a stall spoils one sample."""
    samples: dict[tuple[int, int], list[float]] = {s: [] for s in shapes}
    for s in shapes:
        call(*s)
    for _ in range(reps):
        for s in shapes:
            t = clock()
            call(*s)
            samples[s].append(clock() - t)
    return {f"{b}x{n}": statistics.median(v) for (b, n), v in samples.items()}


def score(times: dict[str, float]) -> float:
    return math.exp(sum(math.log(t) for t in times.values()) / len(times))


def measure_formats(model: str, quality: Callable[[str], dict] | None = None) -> Format:
    """Loads `model` in every candidate format in turn (one in memory at a time), times it, and
    picks (see pick); quality defaults to runtime/quality.int8_quality."""
    from . import onednn
    from .int8 import quantize_model
    from .models import load_model

    costs: dict[str, dict[str, float]] = {}
    todo = candidates()
    for i, (dtype, kernel) in enumerate(todo):
        print(f"specserve: dtype auto for {model}: timing {dtype}/{kernel} ({i + 1}/{len(todo)})", file=sys.stderr)
        loaded = load_model(model, "float32" if dtype == "int8" else dtype, "cpu")
        m = loaded.model
        if kernel == "onednn":
            m = onednn.to_onednn(m)
        elif dtype == "int8":
            m = quantize_model(m, kernel)
        try:
            costs[f"{dtype}/{kernel}"] = time_model(m)
        except (RuntimeError, NotImplementedError) as e:  # a kernel that does not run here
            print(f"specserve: {dtype}/{kernel} does not run here ({e})", file=sys.stderr)
        del loaded, m
    chosen = pick(costs, lambda: (quality or _int8_quality)(model))
    print(f"specserve: dtype auto for {model}: {chosen}", file=sys.stderr)
    return chosen


def pick(costs: dict[str, dict[str, float]], quality: Callable[[], dict]) -> Format:
    """The fastest of `costs` ("dtype/kernel" -> seconds per shape); int8 only if quality()'s
    ratio (int8 perplexity / float32) is within QUALITY_GOAL, else the fastest other format.
    quality is called only when int8 is the fastest."""
    if not costs:
        raise RuntimeError("no weight format runs on this machine")
    ranked = sorted(costs, key=lambda name: score(costs[name]))
    shapes = "/".join(costs[ranked[0]])
    reason = f"measured here (ms, geometric mean over {shapes}): " + ", ".join(
        f"{name} {1e3 * score(costs[name]):.1f}" for name in ranked)
    best, goal = ranked[0], f"{100 * (QUALITY_GOAL - 1):.0f}%"
    if best.startswith("int8/"):
        q = quality()
        cost = f"int8 perplexity {q['int8']:.3f} against float32 {q['float32']:.3f} ({100 * (q['ratio'] - 1):+.1f}%)"
        if q["ratio"] <= QUALITY_GOAL:
            reason += f"; {cost}, within {goal}"
        else:
            others = [n for n in ranked if not n.startswith("int8/")]
            if not others:
                raise RuntimeError(f"only int8 runs here and {cost} misses the {goal} goal")
            best = others[0]
            reason += f"; int8 is fastest but {cost} misses the {goal} goal: kept {best}"
    dtype, kernel = best.split("/")
    return Format(dtype, kernel, reason)


def _int8_quality(model: str) -> dict:
    from .quality import int8_quality

    return int8_quality(model)


if __name__ == "__main__":  # python -m specserve.cluster.runtime.formats MODEL: measure (or read) the choice
    print(resolve("auto", torch.device("cpu"), sys.argv[1]))
