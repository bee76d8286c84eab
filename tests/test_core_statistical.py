"""Sampled exactness: the fast rejection_sample on a big ragged batch matches the warped target.

Target and draft are Markov chains over V tokens (p(. | prev) = warp(Lp[prev]), q likewise).
Every sequence starts from the same context, drafts K_i in 1..4 tokens from q and is verified by
rejection_sample with its own seeded generator; sequences that emitted one token run a second
round. Exactly testable, and tested with chi-square (p-value > 1e-3):
- first token ~ p(. | context), whatever K_i is;
- first two tokens (over both rounds) ~ p(y1 | context) p(y2 | y1), the chain;
- within round 1, given num_accepted >= 1: (y1, y2) ~ min(p, q)(y1 | context) p(y2 | y1),
  normalised (y1 is an accepted draft, y2 is the next verify step on row p(. | y1)).
Negative controls, same sample size, must give p-value < 1e-6 on the first token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import specserve.cluster.speculation.rejection as rejection_module
from specserve.cluster.speculation import SamplingParams, make_generator, rejection_sample, warp_probs


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


B = 20_000
V = 6
CONTEXT = 0
PASS = 1e-3
FAIL = 1e-6


def p_value(samples: np.ndarray, probs: torch.Tensor) -> float:
    """Chi-square of integer samples (cells 0..probs.numel()-1) against probs; 0 if off support."""
    probs = probs.double().flatten().numpy()
    counts = np.bincount(samples, minlength=probs.size)
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    observed = counts[support]
    expected = probs[support] / probs[support].sum() * counts.sum()
    # Pool the cells expecting fewer than 5 into one, the usual chi-square rule.
    small = expected < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    assert expected.min() >= 5 and len(expected) >= 2, "too few counts for chi-square; change the case"
    return float(chisquare(observed, expected).pvalue)


class Case:
    def __init__(self, lp, lq, params, one_hot=False, seed=0):
        self.p = warp_probs(lp, [params] * V)
        if one_hot:  # n-gram style drafter: proposes drafter[prev], draft_probs=None
            self.drafter = warp_probs(lq, [SamplingParams(temperature=0)] * V).argmax(dim=1)
            self.q = None
            self.q_eff = torch.nn.functional.one_hot(self.drafter, V).float()
        else:
            self.q = warp_probs(lq, [params] * V)
            self.q_eff = self.q
        self.seed = seed
        self.k = torch.randint(1, 5, (B,), generator=torch.Generator().manual_seed(seed))

    def draft(self, ctx: torch.Tensor, k: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """[n, max_k] drafts, x_j ~ q(. | x_{j-1}); entries past k_i are unused."""
        max_k = int(k.max())
        xs = torch.zeros(len(ctx), max_k, dtype=torch.long)
        prev = ctx
        for j in range(max_k):
            if self.q is None:
                prev = self.drafter[prev]
            else:
                prev = torch.multinomial(self.q[prev], 1, generator=g).squeeze(1)
            xs[:, j] = prev
        return xs

    def round(self, ctx, k, gens, g_draft):
        xs = self.draft(ctx, k, g_draft)
        max_k = xs.shape[1]
        prevs = torch.cat([ctx.unsqueeze(1), xs], dim=1)  # [n, max_k + 1]
        target_rows = torch.arange(max_k + 1) <= k.unsqueeze(1)
        draft_rows = torch.arange(max_k) < k.unsqueeze(1)
        target_probs = self.p[prevs[target_rows]]  # row-major: sequences in order
        draft_probs = None if self.q is None else self.q[prevs[:, :max_k][draft_rows]]
        return rejection_sample(target_probs, xs[draft_rows], draft_probs, k.tolist(), [False] * len(k), gens)

    def run(self):
        """Round 1 for all B sequences, round 2 for those with one token. Returns (round 1, first two)."""
        g_draft = torch.Generator().manual_seed(self.seed + 1)
        gens = [make_generator(self.seed * B + i) for i in range(B)]
        first = self.round(torch.full((B,), CONTEXT), self.k, gens, g_draft)
        two = first.token_ids[:, :2].clone()
        short = (first.num_accepted == 0).nonzero().squeeze(1)
        if len(short):
            second = self.round(two[short, 0], self.k[short], [gens[i] for i in short.tolist()], g_draft)
            two[short, 1] = second.token_ids[:, 0]
        return first, two

    def check(self, first, two):
        assert bool((first.num_accepted <= self.k).all())
        y1 = first.token_ids[:, 0].numpy()
        assert p_value(y1, self.p[CONTEXT]) > PASS
        chain = self.p[CONTEXT].unsqueeze(1) * self.p  # [y1, y2]
        assert p_value((two[:, 0] * V + two[:, 1]).numpy(), chain) > PASS
        acc = first.num_accepted >= 1
        if acc.sum() > 0:
            pairs = first.token_ids[acc][:, :2]
            within = torch.minimum(self.p[CONTEXT], self.q_eff[CONTEXT]).unsqueeze(1) * self.p
            assert p_value((pairs[:, 0] * V + pairs[:, 1]).numpy(), within) > PASS


def tables(seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, V, generator=g) * scale, torch.randn(V, V, generator=g) * scale


def near_tables(seed: int):
    # A drafter that guesses the target's likely tokens, so its proposals are sometimes accepted.
    lp, noise = tables(seed)
    return lp, lp + noise


def disjoint_tables(seed: int):
    # Under top_k=3 the target keeps {0, 1, 2} and the draft keeps {3, 4, 5}.
    noise = torch.rand(V, V, generator=torch.Generator().manual_seed(seed)) * 0.5
    hi, lo = torch.tensor([3.0, 3.0, 3.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 3.0, 3.0, 3.0])
    return hi + noise, lo + noise.flip(1)


def reduced_vocab_tables(seed: int):
    # A draft over part of the vocabulary (a draft head's most frequent ids): q is 0 for ids 4 and 5,
    # which only the residual max(0, p - q) can produce.
    lp, lq = near_tables(seed)
    lq[:, 4:] = float("-inf")
    return lp, lq


CASES = {
    "t1": lambda: Case(*tables(1), SamplingParams(), seed=10),
    "t0.7": lambda: Case(*tables(2), SamplingParams(temperature=0.7), seed=2),
    "t1.5": lambda: Case(*tables(3), SamplingParams(temperature=1.5), seed=3),
    "top_k3": lambda: Case(*tables(4), SamplingParams(top_k=3), seed=4),
    "top_p0.6": lambda: Case(*tables(5, scale=0.5), SamplingParams(top_p=0.6), seed=5),
    "one_hot": lambda: Case(*near_tables(6), SamplingParams(), one_hot=True, seed=6),
    "one_hot_t0.8_top_k4": lambda: Case(*near_tables(7), SamplingParams(temperature=0.8, top_k=4), one_hot=True, seed=7),
    "reduced_vocab": lambda: Case(*reduced_vocab_tables(11), SamplingParams(), seed=11),
    "reduced_vocab_t0.8": lambda: Case(*reduced_vocab_tables(12), SamplingParams(temperature=0.8), seed=12),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_target(name):
    case = CASES[name]()
    first, two = case.run()
    assert 0 < int((first.num_accepted >= 1).sum()) < B  # both branches exercised
    case.check(first, two)


def test_draft_equals_target():
    lp, _ = tables(8)
    case = Case(lp, lp.clone(), SamplingParams(temperature=1.3, top_p=0.9), seed=8)
    first, two = case.run()
    assert torch.equal(first.num_accepted, case.k)
    case.check(first, two)


def test_disjoint_supports():
    case = Case(*disjoint_tables(9), SamplingParams(top_k=3), seed=9)
    assert bool((case.p[:, 3:] == 0).all()) and bool((case.q[:, :3] == 0).all())
    first, two = case.run()
    assert int(first.num_accepted.sum()) == 0
    case.check(first, two)


NEGATIVE = ["t1", "t0.7", "top_k3", "one_hot", "reduced_vocab"]


BROKEN = {
    # accept every draft: the first token is x_1 ~ q
    "sample_from_q": ("acceptance_probs", lambda p_x, q_x: torch.ones_like(p_x)),
    # on rejection draw from p instead of norm(max(0, p - q))
    "skip_residual": ("recovered_probs", lambda p, q, x: p),
}


@pytest.mark.parametrize("name", NEGATIVE)
@pytest.mark.parametrize("broken", list(BROKEN))
def test_broken_sampler_fails(name, broken, monkeypatch):
    case = CASES[name]()
    monkeypatch.setattr(rejection_module, *BROKEN[broken])
    gens = [make_generator(case.seed * B + i) for i in range(B)]
    first = case.round(torch.full((B,), CONTEXT), case.k, gens, torch.Generator().manual_seed(case.seed + 1))
    assert p_value(first.token_ids[:, 0].numpy(), case.p[CONTEXT]) < FAIL


def test_residual_within_the_draft_vocabulary_fails():
    """Negative control for reduced-vocabulary drafts: a residual kept to the ids q covers never
    produces the others, and the first token is then off p."""
    case = CASES["reduced_vocab"]()

    def within_q(p, q, x):
        residual = torch.clamp(p - q, min=0) * (q > 0)
        mass = residual.sum(-1, keepdim=True)
        return torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)

    gens = [make_generator(case.seed * B + i) for i in range(B)]
    original = rejection_module.recovered_probs
    rejection_module.recovered_probs = within_q
    try:
        first = case.round(torch.full((B,), CONTEXT), case.k, gens, torch.Generator().manual_seed(case.seed + 1))
    finally:
        rejection_module.recovered_probs = original
    assert p_value(first.token_ids[:, 0].numpy(), case.p[CONTEXT]) < FAIL
