"""Analytic exactness: enumerate every outcome of speculative decoding on tiny Markov models.

Target and draft are Markov chains over V tokens: p(y | prev) = warp(Lp[prev]) and
q(x | prev) = warp(Lq[prev]). The enumerator runs speculative rounds with K drafts from a fixed
context until N tokens are out (the last round truncated) and sums the exact probability of
every length-N output, using the core's own warp_probs, acceptance_probs and recovered_probs.
The result must equal the warped target chain prod p(y_t | y_{t-1}).
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch

from specserve.cluster.speculation import SamplingParams, acceptance_probs, recovered_probs, warp_probs


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


N = 3  # output length
CONTEXT = 0
TOL = 1e-6
BROKEN = 1e-2  # a broken variant must miss by more than this


class Model:
    """Warped p and q tables plus the core's accept / residual tables for every (prev, x)."""

    def __init__(self, lp: torch.Tensor, lq: torch.Tensor | None, params: SamplingParams, drafter=None):
        v = lp.shape[0]
        self.v = v
        self.p = warp_probs(lp, [params] * v).double()  # [prev, y]
        if lq is None:  # one-hot drafter: proposes drafter[prev] with certainty
            self.drafter = list(drafter)
            self.q = None
            x = torch.tensor(self.drafter)
            self.accept = acceptance_probs(self.p[torch.arange(v), x], None)  # [prev]
            self.residual = recovered_probs(self.p, None, x)  # [prev, y]
        else:
            self.q = warp_probs(lq, [params] * v).double()
            prev, x = (self.q > 0).nonzero(as_tuple=True)
            self.accept = torch.zeros(v, v, dtype=torch.float64)
            self.accept[prev, x] = acceptance_probs(self.p[prev, x], self.q[prev, x])
            self.residual = torch.zeros(v, v, v, dtype=torch.float64)  # [prev, x, y]
            self.residual[prev, x] = recovered_probs(self.p[prev], self.q[prev], x)

    def drafts(self, c: int, k: int):
        """Every draft sequence x_1..x_k from context c with its probability."""
        if self.q is None:
            xs, prev = [], c
            for _ in range(k):
                prev = self.drafter[prev]
                xs.append(prev)
            yield tuple(xs), 1.0
            return
        for xs in itertools.product(range(self.v), repeat=k):
            prob, prev = 1.0, c
            for x in xs:
                prob *= float(self.q[prev, x])
                prev = x
            if prob > 0:
                yield xs, prob

    def accept_prob(self, prev: int, x: int) -> float:
        return float(self.accept[prev] if self.q is None else self.accept[prev, x])

    def residual_row(self, prev: int, x: int) -> torch.Tensor:
        return self.residual[prev] if self.q is None else self.residual[prev, x]


def round_dist(m: Model, c: int, k: int, variant: str = "exact", seen_accept=None) -> dict:
    """Exact distribution of the tokens one round emits from context c."""
    out = defaultdict(float)
    for xs, prob in m.drafts(c, k):
        prevs = (c,) + xs
        reach = prob  # probability of drawing xs and accepting x_1..x_j
        for j, x in enumerate(xs):
            a = m.accept_prob(prevs[j], x)
            if seen_accept is not None:
                seen_accept.append(a)
            if variant == "accept_all":
                a = 1.0
            row = m.p[prevs[j]] if variant == "skip_residual" else m.residual_row(prevs[j], x)
            for y in range(m.v):
                out[xs[:j] + (y,)] += reach * (1.0 - a) * float(row[y])
            reach *= a
        if variant == "no_bonus" and k > 0:
            out[xs] += reach
            continue
        bonus = m.p[prevs[k - 1]] if variant == "wrong_bonus_row" else m.p[prevs[k]]
        for y in range(m.v):
            out[xs + (y,)] += reach * float(bonus[y])
    return out


def spec_dist(m: Model, k: int, variant: str = "exact", seen_accept=None, n: int = N) -> dict:
    """Exact distribution of the first n tokens of speculative decoding from CONTEXT."""
    rounds = {}
    done = defaultdict(float)
    frontier = {(): 1.0}
    while frontier:
        nxt = defaultdict(float)
        for prefix, w in frontier.items():
            last = prefix[-1] if prefix else CONTEXT
            if last not in rounds:
                rounds[last] = round_dist(m, last, k, variant, seen_accept)
            for toks, pr in rounds[last].items():
                seq = (prefix + toks)[:n]
                (done if len(seq) == n else nxt)[seq] += w * pr
        frontier = nxt
    return done


def chain_dist(m: Model, n: int = N) -> dict:
    out = {}
    for ys in itertools.product(range(m.v), repeat=n):
        prob, prev = 1.0, CONTEXT
        for y in ys:
            prob *= float(m.p[prev, y])
            prev = y
        out[ys] = prob
    return out


def max_diff(m: Model, k: int, variant: str = "exact", seen_accept=None, n: int = N) -> float:
    got = spec_dist(m, k, variant, seen_accept, n)
    want = chain_dist(m, n)
    assert set(got) <= set(want)
    assert abs(sum(got.values()) - 1.0) < TOL
    return max(abs(got.get(ys, 0.0) - pw) for ys, pw in want.items())


def tables(v: int, seed: int, scale: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, v, generator=g) * scale, torch.randn(v, v, generator=g) * scale


CASES = {
    "t1": SamplingParams(),
    "t0.7": SamplingParams(temperature=0.7),
    "t1.5": SamplingParams(temperature=1.5),
    "top_k2": SamplingParams(top_k=2),
    "top_p0.6": SamplingParams(top_p=0.6),
    "mixed": SamplingParams(temperature=0.8, top_k=3, top_p=0.8),
    "greedy": SamplingParams(temperature=0.0),
}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("v", [3, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_exact(case, v, k):
    lp, lq = tables(v, seed=100 * v + k)
    m = Model(lp, lq, CASES[case])
    assert max_diff(m, k) < TOL


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("v", [3, 4])
def test_exact_one_hot_drafter(v, k):
    lp, _ = tables(v, seed=7 + v + k)
    for params in (SamplingParams(), SamplingParams(temperature=0.7, top_k=2)):
        m = Model(lp, None, params, drafter=[(prev + 1) % v for prev in range(v)])
        assert max_diff(m, k) < TOL


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("v", [3, 4])
def test_draft_equals_target(v, k):
    lp, _ = tables(v, seed=11 * v + k)
    for params in (SamplingParams(), SamplingParams(temperature=1.5, top_p=0.6)):
        m = Model(lp, lp.clone(), params)
        seen = []
        assert max_diff(m, k, seen_accept=seen) < TOL
        assert seen and all(a == 1.0 for a in seen)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_disjoint_supports(k):
    # top_k=2 leaves the target on {0, 1} and the draft on {2, 3}: nothing is ever accepted.
    v = 4
    g = torch.Generator().manual_seed(k)
    noise = torch.rand(v, v, generator=g)
    lp = torch.tensor([5.0, 4.0, 0.0, 0.0]).expand(v, v) + noise
    lq = torch.tensor([0.0, 0.0, 5.0, 4.0]).expand(v, v) + noise
    m = Model(lp, lq, SamplingParams(top_k=2))
    assert bool((m.p[:, 2:] == 0).all()) and bool((m.q[:, :2] == 0).all())
    seen = []
    assert max_diff(m, k, seen_accept=seen) < TOL
    assert seen and all(a == 0.0 for a in seen)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("v", [3, 4])
def test_without_bonus_still_exact(v, k):
    # Dropping the bonus token wastes work but every emitted token is still ~ p given its prefix.
    lp, lq = tables(v, seed=100 * v + k)
    m = Model(lp, lq, SamplingParams(temperature=0.7))
    assert max_diff(m, k, "no_bonus") < TOL


NEGATIVE_CASES = ["t1", "t0.7", "t1.5", "top_k2"]


@pytest.mark.parametrize("variant", ["accept_all", "skip_residual"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("v", [3, 4])
@pytest.mark.parametrize("case", NEGATIVE_CASES)
def test_broken_variants_fail(case, v, k, variant):
    # accept_all: emit the drafts as sampled from q; skip_residual: on rejection sample p itself.
    lp, lq = tables(v, seed=100 * v + k)
    m = Model(lp, lq, CASES[case])
    assert max_diff(m, k) < TOL
    assert max_diff(m, k, variant) > BROKEN


@pytest.mark.parametrize("k", [1, 2])  # with k = 3 the bonus is the 4th token, past N
@pytest.mark.parametrize("v", [3, 4])
@pytest.mark.parametrize("case", NEGATIVE_CASES)
def test_wrong_bonus_row_fails(case, v, k):
    # Bonus drawn from p(. | x_{k-1}) instead of p(. | x_k). A draft close to the target
    # accepts often enough for the bonus to show.
    lp, lq = tables(v, seed=100 * v + k)
    m = Model(lp, lp + lq / 3, CASES[case])
    assert max_diff(m, k) < TOL
    assert max_diff(m, k, "wrong_bonus_row") > BROKEN


@pytest.mark.parametrize("variant", ["accept_all", "skip_residual"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_broken_variants_fail_one_hot_drafter(k, variant):
    v = 4
    lp, _ = tables(v, seed=7 + v + k)
    m = Model(lp, None, SamplingParams(), drafter=[(prev + 1) % v for prev in range(v)])
    assert max_diff(m, k, variant) > BROKEN


def test_greedy_accept_equals_rejection_sampling_on_one_hot_p():
    """The argmax-only greedy path gives rejection_sample's tokens on the same logits (ragged K,
    K = 0, all accepted, first rejected), and a wrong variant (no bonus row offset) does not."""
    from specserve.cluster.speculation import greedy_accept, rejection_sample

    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        ks = [int(x) for x in torch.randint(0, 5, (4,), generator=gen)]
        logits = torch.randn(sum(ks) + len(ks), 6, generator=gen)
        argmax = logits.argmax(dim=-1)
        drafts, row = [], 0
        for k in ks:  # drafts agree with the argmax for a random prefix, then anything
            agree = int(torch.randint(0, k + 1, (1,), generator=gen))
            drafts += [int(argmax[row + j]) if j < agree else int(torch.randint(0, 6, (1,), generator=gen)) for j in range(k)]
            row += k + 1
        draft_ids = torch.tensor(drafts, dtype=torch.long)
        p = warp_probs(logits, [SamplingParams(temperature=0.0)] * len(logits))
        want = rejection_sample(p, draft_ids, None, ks, [True] * len(ks), [None] * len(ks))
        got = greedy_accept(argmax, draft_ids, ks)
        assert torch.equal(got.num_accepted, want.num_accepted) and torch.equal(got.token_ids, want.token_ids)
    shifted = greedy_accept(torch.roll(argmax, 1), draft_ids, ks)  # negative control: rows misaligned
    assert not torch.equal(shifted.token_ids, want.token_ids)


def pass_dist(p: torch.Tensor, q: torch.Tensor, k: int, sent: torch.Tensor | None = None, n: int = N) -> dict:
    """Exact distribution of the first n tokens of PaSS from CONTEXT. A round starting at token c
    drafts k tokens drawn independently, draft i from q[a, i] where a is the token before c: the
    look-ahead block sat after a, before c (the previous round's last token) was drawn. Acceptance
    is told `sent` ([V, L, V]; default q), the q the drafter reports."""
    sent = q if sent is None else sent
    v = p.shape[0]
    done, frontier = defaultdict(float), {(CONTEXT, CONTEXT, ()): 1.0}  # (a, c, emitted) -> probability
    while frontier:
        nxt = defaultdict(float)
        for (a, c, emitted), w in frontier.items():
            for xs in itertools.product(range(v), repeat=k):
                prob = 1.0
                for i, x in enumerate(xs):
                    prob *= float(q[a, i, x])
                if prob == 0:
                    continue
                prevs, reach, outcomes = (c,) + xs, prob, []
                for j, x in enumerate(xs):
                    told = sent[a, j]
                    accept = float(acceptance_probs(p[prevs[j], x : x + 1], told[x : x + 1])[0])
                    residual = recovered_probs(p[prevs[j]][None], told[None], torch.tensor([x]))[0]
                    outcomes += [(xs[:j] + (y,), reach * (1 - accept) * float(residual[y])) for y in range(v)]
                    reach *= accept
                outcomes += [(xs + (y,), reach * float(p[prevs[k], y])) for y in range(v)]
                for toks, pr in outcomes:
                    if pr == 0:
                        continue
                    seq = emitted + toks
                    if len(seq) >= n:
                        done[seq[:n]] += w * pr
                    else:
                        nxt[((c,) + toks)[-2], toks[-1], seq] += w * pr
        frontier = nxt
    return done


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("case", ["t1", "t0.7", "top_k2", "mixed"])
def test_pass_drafting_is_exact(case, k):
    """PaSS: drafts drawn position by position from the warped look-ahead rows (independent of each
    other and of the round's first token), that q sent to rejection sampling: the output is the
    target's chain exactly. Negative control: acceptance told the unwarped look-ahead rows (a q the
    drafts were not drawn from) is biased."""
    v, params = 3, CASES[case]
    lp, _ = tables(v, seed=7 + k)
    p = warp_probs(lp, [params] * v).double()
    g = torch.Generator().manual_seed(11 + k)
    rows = torch.randn(v, 2, v, generator=g) * 1.5  # [a, position, V] look-ahead logits
    q = warp_probs(rows.reshape(-1, v), [params] * (2 * v)).double().reshape(v, 2, v)
    want = chain_dist(Model(lp, lp, params))
    got = pass_dist(p, q, k)
    assert abs(sum(got.values()) - 1.0) < TOL
    assert max(abs(got.get(ys, 0.0) - pw) for ys, pw in want.items()) < TOL
    shifted = q.roll(1, dims=1).clamp(min=1e-12)  # each draft checked against the other position's row
    wrong = pass_dist(p, q, k, sent=shifted / shifted.sum(-1, keepdim=True))
    assert max(abs(wrong.get(ys, 0.0) - pw) for ys, pw in want.items()) > BROKEN
