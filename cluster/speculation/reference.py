"""Slow, step-by-step speculative sampling: the test oracle for rejection.py.

Written from the paper's algorithm with Python loops and no vectorisation. It draws from each
generator what the fast path draws (K + 1 uniforms in one call: u_1..u_K for the tests, u_{K+1}
for the final token by sample_rows), so with equally seeded generators the two must agree token
for token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .sample import sample_rows, uniforms


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
        u = uniforms(k + 1, g, p.device)  # [K + 1]
        emitted = []
        for j in range(k):
            x = xs[j]
            qx = torch.ones((), dtype=p.dtype) if q is None else q[j, x]
            assert float(qx) > 0, "a draft token had q(x) = 0: the drafter did not sample from q"
            if float(u[j]) < float((p[j, x] / qx).clamp(max=1.0)):
                emitted.append(x)
                continue
            qj = torch.zeros_like(p[j]) if q is None else q[j]
            if q is None:
                qj[x] = 1.0
            residual = torch.clamp(p[j] - qj, min=0.0)
            if float(residual.sum()) <= 0:
                residual = p[j]
            else:
                residual = residual / residual.sum()
            emitted.append(int(sample_rows(residual[None], u[k:])[0]))
            break
        else:
            emitted.append(int(sample_rows(p[k][None], u[k:])[0]))
        out.append(emitted)
    return out
