"""What a weight format costs in quality: held-out perplexity of a target, float32 against int8."""

from __future__ import annotations

import math

import torch

from ..bench_prompts import bench_prompts


def perplexity(model: torch.nn.Module, sequences: list[list[int]]) -> float:
    """exp of the mean negative log-likelihood of every next token, each sequence in its own forward."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for ids in sequences:
            if len(ids) < 2:
                continue
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()  # [n - 1, V]
            nll -= float(logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).sum())
            count += len(ids) - 1
    if count == 0:
        raise ValueError("perplexity needs at least one sequence of two or more tokens")
    return math.exp(nll / count)


def bench_texts() -> list[str]:
    """The prompts the bench ships (cluster/prompts/bench.json), every category."""
    data = bench_prompts()
    return [p if isinstance(p, str) else p.get("prompt", "") for prompts in data.values() for p in prompts]


def int8_quality(name: str, max_tokens: int = 512) -> dict:
    """Perplexity of model `name` in float32 and in int8 on the bench's texts (each cut to
    max_tokens): {"float32": .., "int8": .., "ratio": int8 / float32}."""
    from .int8 import quantize_model
    from .models import int8_kernel, load_model

    loaded = load_model(name, "float32", "cpu")
    sequences = [loaded.tokenizer.encode(t)[:max_tokens] for t in bench_texts()]
    base = perplexity(loaded.model, sequences)
    quantized = perplexity(quantize_model(loaded.model, int8_kernel()), sequences)
    return {"model": name, "float32": base, "int8": quantized, "ratio": quantized / base,
            "tokens": sum(len(s) for s in sequences)}
