"""Logits -> probabilities under temperature, top-k and top-p, identically for p and q.

Because the same warp is applied to the target's and the draft's logits, speculative sampling
returns exactly the warped target distribution.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .params import SamplingParams


def warp_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [N, V] -> probs [N, V] float32; params holds one SamplingParams per row.

    Greedy rows (temperature 0) become one-hot on the argmax (lowest index on ties).
    """
    assert logits.dim() == 2 and logits.shape[0] == len(params)
    logits = logits.float()
    n, vocab = logits.shape
    probs = torch.empty_like(logits)
    device = logits.device  # per-row settings go where the rows are; branches read the params, not tensors
    greedy_rows = [i for i, sp in enumerate(params) if sp.greedy]  # decided on the host, from the params
    if greedy_rows:
        rows = torch.tensor(greedy_rows, device=device)
        probs[rows] = torch.nn.functional.one_hot(logits[rows].argmax(dim=-1), vocab).float()
    if len(greedy_rows) == n:
        return probs
    sampled_rows = [i for i, sp in enumerate(params) if not sp.greedy]
    rows = torch.tensor(sampled_rows, device=device)
    sampled = [params[i] for i in sampled_rows]
    x = logits[rows] / torch.tensor([sp.temperature for sp in sampled], device=device).unsqueeze(1)
    if any(0 < sp.top_k < vocab for sp in sampled):
        x = _apply_top_k(x, torch.tensor([sp.top_k if 0 < sp.top_k < vocab else vocab for sp in sampled], device=device))
    if any(sp.top_p < 1.0 for sp in sampled):
        x = _apply_top_p(x, torch.tensor([sp.top_p for sp in sampled], device=device))
    probs[rows] = torch.softmax(x, dim=-1)
    return probs


def _apply_top_k(x: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    # Keep every logit >= the k-th largest: ties at the boundary are kept, deterministically.
    kth = x.sort(dim=-1, descending=True).values.gather(1, (top_k - 1).unsqueeze(1))
    return x.masked_fill(x < kth, float("-inf"))


def _apply_top_p(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # Keep the smallest prefix (by descending probability, ties by index) whose mass reaches top_p.
    probs = torch.softmax(x, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # Rows with top_p = 1 keep everything: float32 rounding can push mass_before to 1.0 on the tail.
    drop_sorted = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return x.masked_fill(drop, float("-inf"))
