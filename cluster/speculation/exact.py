"""Exact distributions and the checks against them: what the distribution tests (tests/) and the
GPU check's distribution part (cluster/gpu_check) both use, so neither imports the other.

torch and the standard library only, as the rest of the core (tests/test_boundary.py).
"""

from __future__ import annotations

import torch

from .params import SamplingParams
from .sample import sample_token
from .tree import TreeAcceptance
from .warp import warp_probs

# The warp the distribution tests sample with: small enough a support to enumerate, wide enough
# that a biased rule shows.
DISTRIBUTION_TEST_PARAMS = SamplingParams(temperature=1.0, top_k=3)


def exact_joint(loaded, prompt_ids, params, n):
    """P(y1..yn) of the warped target, by enumeration over the support at each step: the exact
    joint distribution of an n-token continuation of prompt_ids, {tokens: probability}.
    `loaded` is anything with a `.model` returning logits (a loaded target)."""
    joint = {(): 1.0}
    with torch.inference_mode():
        for _ in range(n):
            grown = {}
            for prefix, mass in joint.items():
                logits = loaded.model(torch.tensor([prompt_ids + list(prefix)])).logits[0, -1:].float()
                p = warp_probs(logits, [params])[0]
                for y in p.nonzero().squeeze(1).tolist():
                    grown[prefix + (y,)] = mass * float(p[y])
            joint = grown
    return joint


def chi2_pvalue(pairs, joint):
    """Pearson chi-square p-value of the sampled sequences (`pairs`, tuples of tokens) against the
    exact joint (as exact_joint returns); 0 if any falls outside its support. The statistic and
    the upper tail of chi-square with len(joint) - 1 degrees of freedom, as
    scipy.stats.chisquare computes them."""
    if any(x not in joint for x in pairs):
        return 0.0
    cells = sorted(joint)
    counts = [sum(1 for x in pairs if x == c) for c in cells]
    mass = sum(joint[c] for c in cells)  # 1 up to float32 rounding
    expected = [joint[c] / mass * len(pairs) for c in cells]
    statistic = sum((o - e) ** 2 / e for o, e in zip(counts, expected))
    dof = torch.tensor((len(cells) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(statistic / 2, dtype=torch.float64)))


def first_children(p, tree, generator):
    """A wrong tree acceptance (negative controls): takes every first child, then samples at the
    leaf. Biased; a stand-in for tree.accept_tree that the distribution checks must reject."""
    path, node = [], -1
    while tree.children(node):
        node = tree.children(node)[0]
        path.append(node)
    return TreeAcceptance(tuple(path), tuple(tree.tokens[c] for c in path) + (sample_token(p[node + 1], generator),))
