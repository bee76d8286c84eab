"""Sampling and acceptance without per-sequence host synchronisation.

- sample_rows (inverse CDF) follows the distribution exactly, never draws a token of probability 0,
  and an off-by-one CDF fails the same test;
- the batched rejection_sample and accept_trees equal the slow references draw for draw (same
  uniforms in the same places) over many seeds: mixed greedy / sampled, K = 0, ragged chains,
  trees with duplicate and with chosen children, empty trees; generators end in the same state;
- a sequence's output is the same alone and in any batch;
- a round's result leaves the device in exactly one transfer whatever the batch size (a per-sequence
  reader, the negative control, makes B), and nothing inside reads a tensor back;
- on CUDA (skipped without one) the same, with generators on the device or on the host, and
  torch's sync debug mode raising on any synchronisation inside.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import specserve.cluster.speculation.tree as tree_module
from specserve.cluster.speculation import (DraftTree, HostTransfers, SamplingParams, accept_trees, greedy_accept,
                                           make_generator, reference_accept_tree, reference_rejection_sample,
                                           rejection_sample, sample_rows, sample_token, tree_uniforms, uniforms,
                                           warp_probs)
from specserve.cluster.speculation.exact import first_children
from test_core_statistical import p_value

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", CUDA]
PARAMS = [SamplingParams(), SamplingParams(temperature=0.7, top_k=3), SamplingParams(top_p=0.8),
          SamplingParams(temperature=1.4, top_k=4, top_p=0.9)]
PASS, FAIL = 1e-3, 1e-6


# (a) sample_rows

PROBS = torch.tensor([0.0, 0.1, 0.0, 0.3, 0.2, 0.4, 0.0])  # zeros first, inside and last


def off_by_one(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A broken rule (negative control): the exclusive CDF, so each token gets the previous one's mass."""
    cdf = probs.double().cumsum(dim=-1) - probs.double()
    target = u.double().unsqueeze(1) * probs.double().sum(-1, keepdim=True)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def test_sample_rows_follows_the_distribution():
    """60,000 draws, two different rows in one batch (one unnormalised): chi-square per row; no
    zero-probability token ever; the off-by-one CDF fails on the same uniforms."""
    n = 30_000
    rows = torch.stack([PROBS, torch.tensor([2.0, 0.0, 0.5, 0.0, 1.5, 0.0, 1.0])])  # [2, V]
    u = torch.rand(2 * n, generator=torch.Generator().manual_seed(0))
    probs = rows.repeat(n, 1)  # [2n, V]
    got = sample_rows(probs, u)
    assert got.dtype == torch.int64 and got.shape == (2 * n,)
    assert bool((probs.gather(1, got.unsqueeze(1)) > 0).all())
    for b in range(2):
        assert p_value(got[b::2].numpy(), rows[b]) > PASS
        assert p_value(off_by_one(probs, u)[b::2].numpy(), rows[b]) < FAIL


def test_sample_rows_never_draws_a_zero_at_the_boundaries():
    """Uniforms on every CDF step, at 0, at the largest float below 1 and at 1 itself: the first
    token with mass past u (the last one at u = 1); a rule searching left of the step
    (right=False) lands on the zeros."""
    cdf = PROBS.double().cumsum(0)
    edges = torch.tensor([0.0, 1.0 - 2.0**-24, 1.0] + (cdf / cdf[-1]).tolist(), dtype=torch.float32)
    got = sample_rows(PROBS.expand(len(edges), -1), edges)
    assert bool((PROBS[got] > 0).all()), got
    assert got[:3].tolist() == [1, 5, 5]  # the first and the last token with mass
    steps = cdf.expand(len(edges), -1).contiguous()
    left = torch.searchsorted(steps, (edges.double() * cdf[-1]).unsqueeze(1)).squeeze(1)
    assert not bool((PROBS[left] > 0).all())  # the negative control picks a zero


def test_sample_token_is_one_uniform_then_sample_rows():
    for seed in range(20):
        p = warp_probs(torch.randn(1, 9, generator=torch.Generator().manual_seed(seed)), [PARAMS[seed % 4]])[0]
        g, replay = make_generator(seed), make_generator(seed)
        assert sample_token(p, g) == int(sample_rows(p[None], uniforms(1, replay))[0])
        assert torch.equal(g.get_state(), replay.get_state())


# (b), (c) rejection_sample: fast against the reference, and alone against batched


class Chains:
    """A random ragged batch over a small vocabulary: K_i in 0..5 (0 and 5 always present),
    greedy and sampled rows, drafts from q (dense) or one-hot proposals, some q equal to p."""

    def __init__(self, seed: int, b: int = 12, v: int = 5, dense: bool = True, device: str = "cpu"):
        g = torch.Generator().manual_seed(seed)
        self.seed, self.dense, self.device = seed, dense, device
        self.k = torch.randint(0, 6, (b,), generator=g).tolist()
        self.k[0], self.k[-1] = (0, 5) if b > 1 else (5, 5)
        self.greedy = (torch.rand(b, generator=g) < 0.3).tolist()
        self.greedy[min(1, b - 1)] = False
        self.p, self.q, self.x = [], [], []
        for i, k in enumerate(self.k):
            pick = int(torch.randint(4, (1,), generator=g))
            params = SamplingParams(temperature=0.0) if self.greedy[i] else PARAMS[pick]
            lp = torch.randn(k + 1, v, generator=g) * 1.5
            p = warp_probs(lp, [params] * (k + 1))
            q = warp_probs(lp[:k] + torch.randn(k, v, generator=g), [params] * k)
            if k and float(torch.rand(1, generator=g)) < 0.2:
                q = p[:k].clone()  # q = p: every draft accepted
            if dense:
                x = torch.multinomial(q, 1, generator=g).squeeze(1) if k else torch.zeros(0, dtype=torch.long)
            else:
                x = torch.randint(0, v, (k,), generator=g)
                q = None
            self.p.append(p.to(device))
            self.q.append(None if q is None else q.to(device))
            self.x.append(x.to(device))

    def generators(self, offset: int = 0, device: str = "cpu"):
        return [make_generator(1000 * self.seed + i + offset, device) for i in range(len(self.k))]

    def fast(self, gens, idx=None):
        idx = range(len(self.k)) if idx is None else idx
        q = torch.cat([self.q[i] for i in idx]) if self.dense else None
        return rejection_sample(torch.cat([self.p[i] for i in idx]), torch.cat([self.x[i] for i in idx]), q,
                                [self.k[i] for i in idx], [self.greedy[i] for i in idx], list(gens))

    def reference(self, gens):
        return reference_rejection_sample(self.p, [x.tolist() for x in self.x], self.q, self.greedy, gens)


def states(gens):
    return [g.get_state() for g in gens]


def check_chains(batch: Chains, gen_device: str) -> tuple[int, int]:
    fast_gens, ref_gens = batch.generators(device=gen_device), batch.generators(device=gen_device)
    out = batch.fast(fast_gens)
    assert out.token_ids.device.type == batch.device and out.num_accepted.device.type == batch.device
    tokens, counts = out.to_host()
    assert tokens == batch.reference(ref_gens)
    assert all(torch.equal(a, b) for a, b in zip(states(fast_gens), states(ref_gens)))
    for i, (t, n) in enumerate(zip(tokens, counts)):
        assert len(t) == n + 1 and t[:n] == batch.x[i][:n].tolist()
        assert out.token_ids[i, n + 1 :].eq(-1).all()
    return sum(counts), sum(k - n for k, n in zip(batch.k, counts))


@pytest.mark.parametrize("dense", [True, False], ids=["dense_q", "one_hot_q"])
@pytest.mark.parametrize("device", DEVICES)
def test_rejection_sample_equals_the_reference_draw_for_draw(device, dense):
    accepted = rejected = 0
    for seed in range(60):
        a, r = check_chains(Chains(seed, dense=dense, device=device), "cpu")
        accepted, rejected = accepted + a, rejected + r
    assert accepted > 50 and rejected > 50  # both branches, many times


@pytest.mark.parametrize("dense", [True, False], ids=["dense_q", "one_hot_q"])
def test_rejection_sample_alone_equals_in_a_batch(dense):
    for seed in range(5):
        batch = Chains(100 + seed, b=16, dense=dense)
        together, _ = batch.fast(batch.generators()).to_host()
        gens = batch.generators()
        for i in range(len(batch.k)):
            assert batch.fast([gens[i]], idx=[i]).to_host()[0] == [together[i]]
        order = list(range(len(batch.k)))[::-1]
        gens = batch.generators()
        rev, _ = batch.fast([gens[i] for i in order], idx=order).to_host()
        assert rev == [together[i] for i in order]
        assert batch.fast(batch.generators(offset=7)).to_host()[0] != together  # the seeds decide


def test_a_draft_with_q_zero_is_refused_when_read():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    out = rejection_sample(p, torch.tensor([1]), q, [1], [False], [make_generator(0)])
    with pytest.raises(AssertionError, match="q\\(x\\) = 0"):
        out.to_host()


# (b), (c) accept_trees: fast against the reference, and alone against batched


def random_tree(g: torch.Generator, v: int, rule: str, max_nodes: int = 8,
                max_branch: int = 3) -> tuple[DraftTree, torch.Tensor]:
    """A random tree and its target rows p [n + 1, V]. rule: "sampled" (children drawn from their
    parent's q, duplicates kept), "chosen" (arbitrary tokens, duplicates too) or "greedy"."""
    n = int(torch.randint(0, max_nodes + 1, (1,), generator=g))
    parents, children = [], {-1: 0}
    for j in range(n):
        open_ = [a for a in range(-1, j) if children.get(a, 0) < max_branch]
        parent = open_[int(torch.randint(len(open_), (1,), generator=g))]
        parents.append(parent)
        children[parent] = children.get(parent, 0) + 1
    params = PARAMS[int(torch.randint(4, (1,), generator=g))]
    p = warp_probs(torch.randn(n + 1, v, generator=g) * 1.5, [params] * (n + 1))
    if rule != "sampled":
        tokens = torch.randint(0, v, (n,), generator=g).tolist()
        return DraftTree(tuple(tokens), tuple(parents)), p
    q_at = {}  # parent -> the q its children were drawn from
    for a in range(-1, n):
        q_at[a] = warp_probs(torch.randn(1, v, generator=g) * 1.5, [params])[0]
        if float(torch.rand(1, generator=g)) < 0.2:
            q_at[a] = p[a + 1].clone()  # q = p there: the first child is accepted
    q = torch.stack([q_at[a] for a in parents]) if n else torch.zeros(0, v)
    tokens = [int(torch.multinomial(q_at[a], 1, generator=g)) for a in parents]
    return DraftTree(tuple(tokens), tuple(parents), q), p


class Trees:
    def __init__(self, seed: int, b: int = 12, v: int = 4, device: str = "cpu"):
        g = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.rules = [("sampled", "chosen", "greedy")[int(torch.randint(3, (1,), generator=g))] for _ in range(b)]
        self.rules[: min(3, b)] = ["sampled", "chosen", "greedy"][:b]
        made = [random_tree(g, v, rule) for rule in self.rules]
        self.trees = [DraftTree(t.tokens, t.parents, None if t.q is None else t.q.to(device)) for t, _ in made]
        self.p = [p.to(device) for _, p in made]
        self.greedy = [rule == "greedy" for rule in self.rules]

    def rows(self, i: int) -> torch.Tensor:
        return self.p[i].argmax(dim=-1) if self.greedy[i] else self.p[i]

    def generators(self, offset: int = 0, device: str = "cpu"):
        return [make_generator(1000 * self.seed + i + offset, device) for i in range(len(self.trees))]

    def fast(self, gens, idx=None, host=None):
        idx = range(len(self.trees)) if idx is None else idx
        return accept_trees([self.rows(i) for i in idx], [self.trees[i] for i in idx], [self.greedy[i] for i in idx],
                            gens, host=host)


def check_trees(batch: Trees, gen_device: str) -> int:
    fast_gens, ref_gens = batch.generators(device=gen_device), batch.generators(device=gen_device)
    out = batch.fast(fast_gens)
    moved = 0
    for i, (tree, result) in enumerate(zip(batch.trees, out)):
        want = reference_accept_tree(batch.p[i], tree, batch.greedy[i], ref_gens[i])
        assert list(result.tokens) == want, (batch.seed, i, batch.rules[i])
        assert [tree.tokens[c] for c in result.path] == want[:-1]
        assert all(tree.parents[c] == (result.path[j - 1] if j else -1) for j, c in enumerate(result.path))
        moved += len(result.path)
    assert all(torch.equal(a, b) for a, b in zip(states(fast_gens), states(ref_gens)))
    return moved


@pytest.mark.parametrize("device", DEVICES)
def test_accept_trees_equals_the_reference_draw_for_draw(device):
    moved = 0
    for seed in range(60):
        moved += check_trees(Trees(seed, device=device), "cpu")
    assert moved > 100


def test_tree_draws_are_the_table():
    """Each sampled tree draws its [n + 1, w] table in one call, greedy trees nothing; chosen
    children take one column (the stop), sampled ones one per child of the widest node and the stop."""
    batch = Trees(3)
    gens = batch.generators()
    batch.fast(gens)
    for i, (g, replay) in enumerate(zip(gens, batch.generators())):
        tree = batch.trees[i]
        if not batch.greedy[i]:
            table = tree_uniforms(tree, replay)
            widest = max([len(tree.children(a)) for a in range(-1, len(tree))])
            assert table.shape == (len(tree) + 1, widest + 1 if tree.sampled else 1)
        assert torch.equal(g.get_state(), replay.get_state()), i


def test_duplicate_and_chosen_children():
    """Hand-made: two sampled children with the same token (the second meets the residual), and
    chosen children with a duplicate (the first is taken); an empty tree samples from p."""
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    q = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.2, 0.2, 0.6]])  # siblings share the root's
    sampled = DraftTree((0, 0, 2), (-1, -1, 0), q)
    chosen = DraftTree((1, 1, 0), (-1, -1, -1))
    empty = DraftTree((), ())
    first = second = 0
    for seed in range(200):
        trees, rows = [sampled, chosen, empty], [p, p, p[:1]]
        fast = accept_trees(rows, trees, [False] * 3, [make_generator(seed + k) for k in range(3)])
        for k, (t, r) in enumerate(zip(trees, rows)):
            assert list(fast[k].tokens) == reference_accept_tree(r, t, False, make_generator(seed + k))
        assert fast[1].path in ((0,), (2,))  # never the duplicate (node 1); p has mass 0.5 on each token
        second += fast[0].path[:1] == (1,)
        first += fast[0].path[:1] == (0,)
    assert second == 0 and 50 < first < 150  # r after rejecting token 0 against q = one-hot(0) has no mass on 0


def test_accept_trees_alone_equals_in_a_batch():
    for seed in range(5):
        batch = Trees(200 + seed, b=16)
        together = batch.fast(batch.generators())
        gens = batch.generators()
        for i in range(len(batch.trees)):
            assert batch.fast([gens[i]], idx=[i]) == [together[i]]
        order = list(range(len(batch.trees)))[::-1]
        gens = batch.generators()
        assert batch.fast([gens[i] for i in order], idx=order) == [together[i] for i in order]


def test_a_tree_node_with_q_zero_is_refused():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    tree = DraftTree((1,), (-1,), torch.tensor([[1.0, 0.0, 0.0]]))
    with pytest.raises(AssertionError, match="q\\(x\\) = 0"):
        accept_trees([p], [tree], [False], [make_generator(0)])


def test_a_replaced_accept_tree_decides_each_sampled_tree(monkeypatch):
    """The engine tests' negative controls patch tree.accept_tree: accept_trees then uses it."""
    batch = Trees(9)
    monkeypatch.setattr(tree_module, "accept_tree", first_children)
    out = batch.fast(batch.generators())
    for i, (t, r) in enumerate(zip(batch.trees, out)):
        if not batch.greedy[i]:
            assert r == first_children(batch.p[i], t, batch.generators()[i])


# (d) one transfer per call


@contextlib.contextmanager
def host_reads():
    """Counts every read of a tensor by the host (tolist, item, bool, int, float, index)."""
    names = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    calls: list[str] = []
    for n, f in saved.items():
        def counted(self, *args, _n=n, _f=f, **kwargs):
            calls.append(_n)
            return _f(self, *args, **kwargs)
        setattr(torch.Tensor, n, counted)
    try:
        yield calls
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("b", [1, 4, 16])
def test_one_host_transfer_per_call(b):
    chains, trees = Chains(300 + b, b=b), Trees(300 + b, b=b)
    with host_reads() as calls:
        out = chains.fast(chains.generators())
        greedy = greedy_accept(torch.cat(chains.p).argmax(-1), torch.cat(chains.x), chains.k)
    assert calls == []  # nothing inside reads the device
    host = HostTransfers()
    tokens, counts = out.to_host(host)
    assert host.syncs == 1 and host.bytes == 8 * (b * (max(chains.k) + 1) + b + 1)  # + the q(x) = 0 flag
    host.reset()
    greedy.to_host(host)
    assert (host.syncs, host.bytes) == (1, 8 * (b * (max(chains.k) + 1) + b))
    host.reset()
    with host_reads() as calls:
        result = trees.fast(trees.generators(), host=host)
    assert host.syncs == 1 and calls == ["tolist"]
    assert result == trees.fast(trees.generators())
    # the negative control: reading sequence by sequence costs B
    host.reset()
    per_sequence = [host.read(out.token_ids[i, : counts[i] + 1]) for i in range(b)]
    assert per_sequence == tokens and host.syncs == b


# (e) CUDA: generators on the device or on the host, no synchronisation inside


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("gen_device", ["cuda", "cpu"])
def test_cuda_draw_for_draw_without_synchronisation(gen_device):
    for seed in range(20):
        check_chains(Chains(seed, device="cuda"), gen_device)
        check_chains(Chains(seed, dense=False, device="cuda"), gen_device)
        check_trees(Trees(seed, device="cuda"), gen_device)
        chains, trees = Chains(seed, device="cuda"), Trees(seed, device="cuda")
        want = chains.fast(chains.generators(device=gen_device)).to_host()
        gens = chains.generators(device=gen_device)
        host = HostTransfers()
        with no_sync():
            out = chains.fast(gens)
        assert out.to_host(host) == want and host.syncs == 1
        gens = trees.generators(device=gen_device)
        with no_sync():  # the walks run without a sync; the one read follows
            walks = tree_module._walk([trees.trees[i] for i in range(len(trees.trees)) if not trees.greedy[i]],
                                      torch.device("cuda"), p=torch.cat([trees.p[i] for i in range(len(trees.p))
                                                                        if not trees.greedy[i]]),
                                      generators=[g for g, gr in zip(gens, trees.greedy) if not gr])
        assert walks.device.type == "cuda"
