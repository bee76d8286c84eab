"""The fast batched rejection_sample against the slow reference, token for token.

Each sequence draws from its own generator: K_i + 1 uniforms in one call, the last for the final
token by inverse CDF (none if greedy).
So with equally seeded generators the fast path, the reference, and the sequence run alone
must agree exactly, and the generators must end in the same state.
"""

from __future__ import annotations

import pytest
import torch

from specserve.cluster.speculation import (
    SamplingParams,
    make_generator,
    reference_rejection_sample,
    rejection_sample,
    sample_token,
    warp_probs,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


V = 50
MAX_K = 6
SAMPLED_PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.8, top_k=10),
    SamplingParams(top_p=0.9),
    SamplingParams(temperature=1.3, top_k=20, top_p=0.95),
]


class Batch:
    """A random ragged batch: per sequence K_i + 1 target rows, K_i draft rows and drafts."""

    def __init__(self, seed: int, b: int = 50, dense: bool = True, greedy_share: float = 0.3):
        g = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.k = torch.randint(0, MAX_K + 1, (b,), generator=g).tolist()
        self.k[0], self.k[1] = 0, MAX_K
        self.greedy = (torch.rand(b, generator=g) < greedy_share).tolist()
        self.greedy[2], self.greedy[3] = True, False
        self.p, self.q, self.x = [], [], []
        for i, k in enumerate(self.k):
            if self.greedy[i]:
                params = SamplingParams(temperature=0.0)
            else:
                params = SAMPLED_PARAMS[int(torch.randint(len(SAMPLED_PARAMS), (1,), generator=g))]
            lp = torch.randn(k + 1, V, generator=g) * 2
            lq = lp[:k] + torch.randn(k, V, generator=g)  # a draft that often agrees
            self.p.append(warp_probs(lp, [params] * (k + 1)))
            if dense:
                q = warp_probs(lq, [params] * k)
                self.q.append(q)
                x = torch.multinomial(q, 1, generator=g).squeeze(1) if k else torch.zeros(0, dtype=torch.long)
            else:
                self.q.append(None)
                x = lq.argmax(dim=1)  # n-gram style: a proposal without a distribution
            self.x.append(x)
        self.dense = dense

    def generators(self, offset: int = 0):
        return [make_generator(1000 * self.seed + i + offset) for i in range(len(self.k))]

    def fast(self, gens, idx=None):
        idx = range(len(self.k)) if idx is None else idx
        p = torch.cat([self.p[i] for i in idx])
        x = torch.cat([self.x[i] for i in idx])
        q = torch.cat([self.q[i] for i in idx]) if self.dense else None
        return rejection_sample(p, x, q, [self.k[i] for i in idx], [self.greedy[i] for i in idx], gens)

    def reference(self, gens):
        return reference_rejection_sample(self.p, [x.tolist() for x in self.x], self.q, self.greedy, gens)


def states(gens):
    return [g.get_state() for g in gens]


@pytest.mark.parametrize("dense", [True, False], ids=["dense_q", "one_hot_q"])
@pytest.mark.parametrize("seed", range(10))
def test_fast_equals_reference(seed, dense):
    batch = Batch(seed, dense=dense)
    gens_fast, gens_ref = batch.generators(), batch.generators()
    out = batch.fast(gens_fast)
    ref = batch.reference(gens_ref)
    b = len(batch.k)
    assert out.token_ids.shape == (b, max(batch.k) + 1)
    for i in range(b):
        n = int(out.num_accepted[i])
        assert 0 <= n <= batch.k[i]
        assert out.tokens(i) == ref[i]
        assert out.tokens(i)[:n] == batch.x[i][:n].tolist()
        assert (out.token_ids[i, n + 1 :] == -1).all()
    assert all(torch.equal(a, r) for a, r in zip(states(gens_fast), states(gens_ref)))
    # Not a degenerate batch: some sequences accept a draft, some reject one.
    accepted = out.num_accepted.tolist()
    assert any(0 < a for a in accepted) and any(a < k for a, k in zip(accepted, batch.k))


@pytest.mark.parametrize("dense", [True, False], ids=["dense_q", "one_hot_q"])
def test_generator_consumption(dense):
    # Sampled: one torch.rand(K_i + 1). Greedy: nothing. Negative control: the old order (K_i
    # uniforms, then a multinomial) leaves the generator elsewhere.
    batch = Batch(11, dense=dense)
    gens = batch.generators()
    batch.fast(gens)
    for i, (g, replay, old) in enumerate(zip(gens, batch.generators(), batch.generators())):
        if not batch.greedy[i]:
            torch.rand(batch.k[i] + 1, generator=replay)
            torch.rand(batch.k[i], generator=old)
            torch.multinomial(torch.ones(V), 1, generator=old)
            assert not torch.equal(g.get_state(), old.get_state()), i
        assert torch.equal(g.get_state(), replay.get_state()), i


@pytest.mark.parametrize("dense", [True, False], ids=["dense_q", "one_hot_q"])
@pytest.mark.parametrize("seed", [20, 21, 22])
def test_batch_equals_alone(seed, dense):
    batch = Batch(seed, dense=dense)
    together = batch.fast(batch.generators())
    gens = batch.generators()
    for i in range(len(batch.k)):
        alone = batch.fast([gens[i]], idx=[i])
        assert alone.tokens(0) == together.tokens(i)
    # Reversed order too: the position in the batch does not matter.
    order = list(range(len(batch.k)))[::-1]
    gens = batch.generators()
    rev = batch.fast([gens[i] for i in order], idx=order)
    assert all(rev.tokens(j) == together.tokens(i) for j, i in enumerate(order))


def test_seeded_reproducibility():
    batch = Batch(30)
    a = batch.fast(batch.generators())
    b = batch.fast(batch.generators())
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.num_accepted, b.num_accepted)
    c = batch.fast(batch.generators(offset=500))
    assert not torch.equal(a.token_ids, c.token_ids)  # the seeds are what decide


@pytest.mark.parametrize("dense", [True, False], ids=["dense_q", "one_hot_q"])
def test_greedy_longest_matching_prefix(dense):
    g = torch.Generator().manual_seed(40)
    b = 60
    ks = [int(k) for k in torch.randint(0, MAX_K + 1, (b,), generator=g)]
    ps, xs, qs, matches = [], [], [], []
    for k in ks:
        p = warp_probs(torch.randn(k + 1, V, generator=g), [SamplingParams(temperature=0)] * (k + 1))
        best = p.argmax(dim=1)
        m = int(torch.randint(0, k + 1, (1,), generator=g))  # drafts 0..m-1 match the argmax
        x = best[:k].clone()
        if m < k:
            x[m] = (best[m] + 1 + int(torch.randint(V - 1, (1,), generator=g))) % V
        ps.append(p)
        xs.append(x)
        qs.append(torch.nn.functional.one_hot(x, V).float())  # a greedy draft is one-hot
        matches.append(m)
    gens = [make_generator(i) for i in range(b)]
    before = states(gens)
    out = rejection_sample(
        torch.cat(ps), torch.cat(xs), torch.cat(qs) if dense else None, ks, [True] * b, gens
    )
    for i, (p, x, m) in enumerate(zip(ps, xs, matches)):
        assert int(out.num_accepted[i]) == m
        assert out.tokens(i) == x[:m].tolist() + [int(p[m].argmax())]
    assert all(torch.equal(s, g.get_state()) for s, g in zip(before, gens))
    assert 0 in matches and any(m == k for m, k in zip(matches, ks) if k > 0)


@pytest.mark.parametrize("dense", [True, False], ids=["dense_q", "one_hot_q"])
def test_no_drafts_is_plain_sampling(dense):
    g = torch.Generator().manual_seed(50)
    b = 50
    p = warp_probs(torch.randn(b, V, generator=g) * 2, [SAMPLED_PARAMS[i % 4] for i in range(b)])
    greedy = [i % 5 == 0 for i in range(b)]
    p[greedy] = warp_probs(torch.randn(sum(greedy), V, generator=g), [SamplingParams(temperature=0)] * sum(greedy))
    x = torch.zeros(0, dtype=torch.long)
    q = torch.zeros(0, V) if dense else None
    out = rejection_sample(p, x, q, [0] * b, greedy, [make_generator(i) for i in range(b)])
    assert out.token_ids.shape == (b, 1) and int(out.num_accepted.abs().sum()) == 0
    for i in range(b):
        if greedy[i]:
            want = int(p[i].argmax())
        else:
            want = sample_token(p[i], make_generator(i))  # one uniform, inverse CDF
        assert out.tokens(i) == [want]
