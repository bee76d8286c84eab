"""Tree acceptance: exact by enumeration on a tiny vocabulary, seeded chi-square of the sampling
walk, greedy paths, and the fast path against the slow reference; negative controls must fail.

Target and draft are Markov chains over V tokens: p(. | prev) = warp(Lp[prev]), q likewise. A
tree's shape is a parent list; its tokens are either sampled independently from q at each parent
(rule "sampled") or the top-b of q there, in order (rule "chosen", checked without q). The law of
the emitted tokens, each completed to L tokens by the target's chain, must equal the chain's.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from specserve.cluster.speculation import SamplingParams, make_generator, sample_token, warp_probs
from specserve.cluster.speculation.tree import (DraftTree, accept_tree, accept_tree_greedy, accept_trees, child_outcomes,
                                      reference_accept_tree)
from test_core_statistical import p_value

pytestmark = pytest.mark.usefixtures("one_thread")

V = 3
ROOT = 0
SHAPES = {  # parent lists
    "chain2": (-1, 0),
    "two_leaves": (-1, -1),
    "three_leaves": (-1, -1, -1),
    "fork_then_grandchild": (-1, -1, 0),
    "two_deep_children": (-1, 0, 0, -1),
}
PARAMS = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7_topk2": SamplingParams(temperature=0.7, top_k=2),
    "t1.3_topp0.8": SamplingParams(temperature=1.3, top_p=0.8),
}


def chains(params: SamplingParams, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lp, lq = torch.randn(V, V, generator=g) * 1.5, torch.randn(V, V, generator=g) * 1.5
    P, Q = warp_probs(lp, [params] * V).double(), warp_probs(lq, [params] * V).double()
    return P / P.sum(-1, keepdim=True), Q / Q.sum(-1, keepdim=True)  # float64: the enumeration is exact to 1e-12


def depth_of(parents) -> int:
    d = [0] * len(parents)
    for j, parent in enumerate(parents):
        d[j] = 1 if parent < 0 else d[parent] + 1
    return max(d)


def trees(parents, rule: str, Q: torch.Tensor):
    """(probability, DraftTree) for every tree the draft can make with this shape and rule."""
    n = len(parents)
    if rule == "chosen":  # the rank-th child of a node is the rank-th most likely token under q there
        tokens = []
        for j, parent in enumerate(parents):
            prev = ROOT if parent < 0 else tokens[parent]
            rank = sum(1 for i in range(j) if parents[i] == parent)
            tokens.append(int(Q[prev].argsort(descending=True, stable=True)[rank]))
        yield 1.0, DraftTree(tuple(tokens), tuple(parents))
        return
    for tokens in itertools.product(range(V), repeat=n):
        prob, rows = 1.0, []
        for j, parent in enumerate(parents):
            prev = ROOT if parent < 0 else tokens[parent]
            prob *= float(Q[prev, tokens[j]])
            rows.append(Q[prev])
        if prob > 0:
            yield prob, DraftTree(tokens, tuple(parents), torch.stack(rows))


def emitted_law(P, Q, parents, rule, outcomes=child_outcomes, check_with_q=False) -> dict[tuple[int, ...], float]:
    """The exact law of the emitted tokens, each completed to depth + 1 tokens by the target's chain."""
    length = depth_of(parents) + 1
    law: dict[tuple[int, ...], float] = {}

    def complete(tokens: tuple[int, ...], prob: float) -> None:
        if len(tokens) == length:
            law[tokens] = law.get(tokens, 0.0) + prob
            return
        for y in range(V):
            complete(tokens + (y,), prob * float(P[tokens[-1], y]))

    def walk(tree: DraftTree, node: int, emitted: tuple[int, ...], prob: float) -> None:
        prev = ROOT if node < 0 else tree.tokens[node]
        children = tree.children(node)
        q = None
        if children and (tree.q is not None or check_with_q):
            q = tree.q[children[0]] if tree.q is not None else Q[prev]
        move, stop = outcomes(P[prev].double(), [tree.tokens[c] for c in children], None if q is None else q.double())
        for c, m in zip(children, move.tolist()):
            if m > 0:
                walk(tree, c, emitted + (tree.tokens[c],), prob * m)
        for y, s in enumerate(stop.tolist()):
            if s > 0:
                complete(emitted + (y,), prob * s)

    for prob, tree in trees(parents, rule, Q):
        walk(tree, -1, (), prob)
    return law


def chain_law(P, length: int) -> dict[tuple[int, ...], float]:
    out = {}
    for ys in itertools.product(range(V), repeat=length):
        prob, prev = 1.0, ROOT
        for y in ys:
            prob *= float(P[prev, y])
            prev = y
        out[ys] = prob
    return out


def max_gap(a: dict, b: dict) -> float:
    return max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def naive_outcomes(p, child_tokens, q):
    """The naive rule, a negative control: accept the first child that passes against the
    original p (never the residual); when none does, draw from norm(max(0, p - q))."""
    if q is None:  # a leaf
        return child_outcomes(p, child_tokens, q)
    m = len(child_tokens)
    move, reach = torch.zeros(m, dtype=p.dtype), 1.0
    for i, x in enumerate(child_tokens):
        a = min(1.0, float(p[x]) / float(q[x]))
        move[i] = reach * a
        reach *= 1.0 - a
    rest = (p - q).clamp(min=0.0)
    return move, reach * (rest / rest.sum() if rest.sum() > 0 else p)


@pytest.mark.parametrize("params", PARAMS.values(), ids=PARAMS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("rule", ["sampled", "chosen"])
def test_tree_acceptance_is_exact_by_enumeration(rule, shape, params):
    P, Q = chains(params)
    got = emitted_law(P, Q, shape, rule)
    assert abs(sum(got.values()) - 1.0) < 1e-9
    assert max_gap(got, chain_law(P, depth_of(shape) + 1)) < 1e-9


def test_negative_control_the_naive_rule_is_biased():
    """p = (0.5, 0.5), q = (1, 0), two children both A: the naive rule gives P(A) = 0.75."""
    p, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    move, stop = naive_outcomes(p, [0, 0], q)
    assert float(move.sum()) == pytest.approx(0.75)
    move, stop = child_outcomes(p, [0, 0], q)  # the recursive rule: the second A meets the residual
    assert float(move.sum()) == pytest.approx(0.5) and float(stop[1]) == pytest.approx(0.5)
    P, Q = chains(PARAMS["t1"])
    for shape in ("two_leaves", "three_leaves", "two_deep_children"):
        law = emitted_law(P, Q, SHAPES[shape], "sampled", outcomes=naive_outcomes)
        assert max_gap(law, chain_law(P, depth_of(SHAPES[shape]) + 1)) > 1e-3, shape


def test_negative_control_chosen_children_checked_against_q_are_biased():
    P, Q = chains(PARAMS["t1"])
    for shape in ("two_leaves", "fork_then_grandchild"):
        law = emitted_law(P, Q, SHAPES[shape], "chosen", check_with_q=True)
        assert max_gap(law, chain_law(P, depth_of(SHAPES[shape]) + 1)) > 1e-3, shape


def _sample_tree(parents, rule, Q, g) -> DraftTree:
    if rule == "chosen":
        return next(trees(parents, rule, Q))[1]
    tokens, rows = [], []
    for j, parent in enumerate(parents):
        prev = ROOT if parent < 0 else tokens[parent]
        tokens.append(sample_token(Q[prev], g))
        rows.append(Q[prev])
    return DraftTree(tuple(tokens), tuple(parents), torch.stack(rows))


def _target_rows(P, tree: DraftTree) -> torch.Tensor:
    return torch.stack([P[ROOT]] + [P[t] for t in tree.tokens])


def _naive_accept(p, tree: DraftTree, g) -> list[int]:
    """The naive rule as a sampler (the negative control of the chi-square test)."""
    out, node = [], -1
    while True:
        children = tree.children(node)
        if not children:
            return out + [sample_token(p[node + 1], g)]
        q = tree.q[children[0]]
        taken = next((c for c in children
                      if float(torch.rand(1, generator=g)) < min(1.0, float(p[node + 1, tree.tokens[c]] / q[tree.tokens[c]]))),
                     None)
        if taken is None:
            return out + [sample_token((p[node + 1] - q).clamp(min=0.0), g)]
        out.append(tree.tokens[taken])
        node = taken


@pytest.mark.parametrize("rule", ["sampled", "chosen"])
def test_the_sampling_walk_matches_the_chain_by_chi_square(rule):
    """accept_tree on 20,000 seeded trees (two children of the root, one grandchild): the emitted
    tokens completed by the chain follow the chain; the naive rule fails the same test."""
    parents, n = SHAPES["fork_then_grandchild"], 20_000
    P, Q = chains(PARAMS["t1"], seed=1)
    length = depth_of(parents) + 1
    cells = {ys: i for i, ys in enumerate(itertools.product(range(V), repeat=length))}
    expected = torch.tensor([chain_law(P, length)[ys] for ys in cells])

    def draw(accept) -> float:
        g = make_generator(7)
        samples = []
        for _ in range(n):
            tree = _sample_tree(parents, rule, Q, g)
            ys = list(accept(_target_rows(P, tree), tree, g))
            while len(ys) < length:
                ys.append(sample_token(P[ys[-1]], g))
            samples.append(cells[tuple(ys)])
        return p_value(np.array(samples), expected)

    assert draw(lambda p, t, g: accept_tree(p, t, g).tokens) > 1e-3
    if rule == "sampled":
        assert draw(_naive_accept) < 1e-6


def test_greedy_takes_the_longest_path_of_argmax_tokens():
    tree = DraftTree((5, 6, 7, 8, 6), (-1, -1, 1, 1, -1))  # root -> 5 | 6 -> (7 | 8) | 6 (a duplicate)
    # the target's argmax after: root 6, node0 -, node1 8, node2 -, node3 9, node4 -
    got = accept_tree_greedy(torch.tensor([6, 0, 8, 0, 9, 0]), tree)
    assert got.path == (1, 3) and got.tokens == (6, 8, 9)  # the first child with the argmax token
    assert accept_tree_greedy(torch.tensor([4, 0, 0, 0, 0, 0]), tree).tokens == (4,)  # no child: the correction
    assert accept_tree_greedy(torch.tensor([5, 2, 0, 0, 0, 0]), tree).tokens == (5, 2)  # a leaf: the bonus


def test_a_chain_tree_is_the_chain_rule():
    """One child per node: the step law is the chain's (accept min(1, p/q), else the residual of
    rejection.py), and greedy acceptance of a chain tree is greedy_accept's."""
    from specserve.cluster.speculation import greedy_accept
    from specserve.cluster.speculation.rejection import acceptance_probs, recovered_probs

    P, Q = chains(PARAMS["t1"], seed=5)
    for prev in range(V):
        for x in range(V):
            move, stop = child_outcomes(P[prev], [x], Q[prev])
            accept = acceptance_probs(P[prev, x][None], Q[prev, x][None])
            assert float(move[0]) == pytest.approx(float(accept[0]))
            rest = recovered_probs(P[prev][None], Q[prev][None], torch.tensor([x]))[0] * (1 - float(accept[0]))
            assert torch.allclose(stop, rest, atol=1e-12)
    g = make_generator(11)
    for _ in range(100):
        tokens = torch.randint(0, V, (4,), generator=g)
        argmax = torch.randint(0, V, (5,), generator=g)
        chain = greedy_accept(argmax, tokens, [4])
        assert list(accept_tree_greedy(argmax, DraftTree.chain(tokens.tolist())).tokens) == chain.tokens(0)


@pytest.mark.parametrize("rule", ["sampled", "chosen"])
def test_the_batched_path_equals_the_slow_reference(rule):
    """accept_trees over a batch of mixed shapes, greedy and sampled, equals reference_accept_tree
    sequence by sequence with equally seeded generators (both read one uniform table per tree in
    the same places), and leaves the generators in the same state."""
    P, Q = chains(PARAMS["t0.7_topk2"], seed=9)
    g = make_generator(1)
    shapes = list(SHAPES.values()) * 8
    batch = [_sample_tree(shape, rule, Q, g) for shape in shapes]
    greedy = [i % 3 == 0 for i in range(len(batch))]
    rows = [_target_rows(P, t).argmax(dim=-1) if gr else _target_rows(P, t) for t, gr in zip(batch, greedy)]
    gens = [make_generator(100 + i) for i in range(len(batch))]
    fast = accept_trees(rows, batch, greedy, gens)
    for i, (tree, gr) in enumerate(zip(batch, greedy)):
        ref_gen = make_generator(100 + i)
        slow = reference_accept_tree(_target_rows(P, tree), tree, gr, ref_gen)
        assert list(fast[i].tokens) == slow, i
        assert [tree.tokens[c] for c in fast[i].path] == slow[:-1]
        assert torch.equal(gens[i].get_state(), ref_gen.get_state()), i


def test_a_tree_that_is_not_a_tree_is_refused():
    with pytest.raises(ValueError, match="parent"):
        DraftTree((1, 2), (-1, 1))  # a node its own parent
    with pytest.raises(ValueError, match="one parent per token"):
        DraftTree((1, 2), (-1,))
