"""Slow, step-by-step speculative sampling: the test oracle for rejection.py.

Written from the paper's algorithm with Python loops and no vectorisation. It draws from
each generator in the same order as the fast path (K uniforms, then one token), so with
equally seeded generators the two must agree token for token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .sample import sample_token


def reference_rejection_sample(
    target_probs: Sequence[torch.Tensor],  # per sequence [K_i + 1, V]
    draft_token_ids: Sequence[Sequence[int]],  # per sequence K_i ids
    draft_probs: Sequence[torch.Tensor | None],  # per sequence [K_i, V] or None (one-hot)
    greedy: Sequence[bool],
    generators: Sequence[torch.Generator | None],
) -> list[list[int]]:
    out = []
    for p, xs, q, is_greedy, g in zip(target_probs, draft_token_ids, draft_probs, greedy, generators):
        k = len(xs)
        if is_greedy:
            emitted = []
            for j in range(k):
                best = int(torch.argmax(p[j]))
                if xs[j] != best:
                    emitted.append(best)
                    break
                emitted.append(xs[j])
            else:
                emitted.append(int(torch.argmax(p[k])))
            out.append(emitted)
            continue
        u = torch.rand(k, generator=g) if k else torch.empty(0)
        emitted = []
        for j in range(k):
            x = xs[j]
            px = float(p[j, x])
            qx = 1.0 if q is None else float(q[j, x])
            if float(u[j]) < min(1.0, px / qx):
                emitted.append(x)
                continue
            qj = torch.zeros_like(p[j]) if q is None else q[j]
            if q is None:
                qj[x] = 1.0
            residual = torch.clamp(p[j] - qj, min=0.0)
            if float(residual.sum()) <= 0:
                residual = p[j]
            emitted.append(sample_token(residual / residual.sum(), g))
            break
        else:
            emitted.append(sample_token(p[k], g))
        out.append(emitted)
    return out
