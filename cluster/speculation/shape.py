"""Draft tree shapes from measured acceptance per depth and per rank of a child.

A shape is a template of parents (node j's parent: an earlier node, or -1 the root); a node's
children in index order are its ranks 0, 1, ... (the draft's top-1, top-2, ... by q, or its first,
second, ... sample). c(d, r) is the measured chance that the rank-r child at depth d is accepted
once its parent was reached and its ranks < r were not. A node's reach, the chance that the
accepted path passes through it, is its parent's reach times prod_{r' < r} (1 - c(d, r')) times
c(d, r); a round yields 1 + the sum of its nodes' reaches in expectation (a chain with a flat c =
alpha gives the familiar (1 - alpha^(K+1)) / (1 - alpha)). The best tree of n nodes under that
model takes the n largest reaches, which best_trees grows one node at a time (Sequoia, Chen et
al. 2024, and the staged paper's trees, built from measurement instead of a fixed fan-out).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Sequence

from .costs import CostModel, verify_cost

Shape = tuple[int, ...]  # [n] node j's parent (< j, or -1: the root); siblings in rank order


def depths_and_ranks(parents: Sequence[int]) -> tuple[list[int], list[int]]:
    """Each node's depth (1: a child of the root) and rank among its siblings (0: first)."""
    depth, rank, fanout = [], [], {}
    for parent in parents:
        depth.append(1 if parent < 0 else depth[parent] + 1)
        rank.append(fanout.get(parent, 0))
        fanout[parent] = rank[-1] + 1
    return depth, rank


def children_of(parents: Sequence[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for j, parent in enumerate(parents):
        out.setdefault(parent, []).append(j)
    return out


def default_shape(k: int, max_nodes: int = 0, max_branch: int = 1) -> Shape:
    """The fixed shape of a request that names no template: a chain of k (max_nodes 0), else
    min(max_branch, max_nodes) children of the root, each continued as a chain, grown depth by depth
    (all branches one deeper before any two deeper) up to depth k and max_nodes nodes."""
    if k <= 0:
        return ()
    if max_nodes <= 0 or max_branch <= 1:
        return tuple(range(-1, k - 1))
    parents = [-1] * min(max_branch, max_nodes)
    tips = list(range(len(parents)))
    for _ in range(1, k):
        nxt = []
        for tip in tips:
            if len(parents) >= max_nodes:
                break
            parents.append(tip)
            nxt.append(len(parents) - 1)
        tips = nxt
    return tuple(parents)


@dataclass
class ShapeStats:
    """c(d, r) for one drafter source, learned from every round's outcome with decaying counts,
    and a prior (prior_alpha at rank 0, or prior_depth[d], halved for each later rank) for what
    was never tested."""

    max_depth: int
    max_rank: int
    prior_alpha: float = 0.5
    prior_weight: float = 4.0
    decay: float = 0.995
    prior_depth: Sequence[float] | None = None  # rank 0's prior per depth where known (PaSS: per look-ahead position)
    accepted: list[list[float]] = field(default_factory=list)  # [depth][rank]
    tested: list[list[float]] = field(default_factory=list)

    def __post_init__(self):
        if not self.accepted:
            self.accepted = [[0.0] * self.max_rank for _ in range(self.max_depth)]
            self.tested = [[0.0] * self.max_rank for _ in range(self.max_depth)]

    def c(self, depth: int, rank: int) -> float:
        """The conditional acceptance of the rank-`rank` child at `depth` (1-based depth)."""
        if not 1 <= depth <= self.max_depth or not 0 <= rank < self.max_rank:
            return 0.0
        first = self.prior_alpha
        if self.prior_depth:
            first = self.prior_depth[min(depth, len(self.prior_depth)) - 1]
        prior = first * 0.5 ** rank
        a, t = self.accepted[depth - 1][rank], self.tested[depth - 1][rank]
        return (a + prior * self.prior_weight) / (t + self.prior_weight)

    @property
    def alpha(self) -> float:
        """Rank 0's acceptance pooled over depths (what a sequence's own alpha is compared to)."""
        a = sum(row[0] for row in self.accepted)
        t = sum(row[0] for row in self.tested)
        return (a + self.prior_alpha * self.prior_weight) / (t + self.prior_weight)

    def observe(self, parents: Sequence[int] | None, num_drafted: int, path: Sequence[int]) -> None:
        """One round's outcome: a tree (parents) and its accepted path of nodes, or a chain
        (parents None) of num_drafted tokens whose first len(path) were accepted. At each reached
        node its children were tested in rank order up to the accepted one (or all, and none was)."""
        if num_drafted == 0:
            return
        parents = tuple(range(-1, num_drafted - 1)) if parents is None else tuple(parents)
        depth, rank = depths_and_ranks(parents)
        for row_a, row_t in zip(self.accepted, self.tested):
            for r in range(self.max_rank):
                row_a[r] *= self.decay
                row_t[r] *= self.decay
        children = children_of(parents)
        for at, node in enumerate([-1, *path]):
            taken = path[at] if at < len(path) else None
            for child in children.get(node, []):
                d, r = depth[child], rank[child]
                if d <= self.max_depth and r < self.max_rank:
                    self.tested[d - 1][r] += 1.0
                    self.accepted[d - 1][r] += child == taken
                if child == taken:
                    break


def tree_table(stats: ShapeStats, alpha: float) -> list[list[float]]:
    """One sequence's c(d, r): rank 0 scaled by how its own alpha compares with the source's
    (sequences differ mostly in how often the draft's first choice holds), later ranks as measured."""
    scale = alpha / stats.alpha if stats.alpha > 0 else 1.0
    return [[min(0.99, stats.c(d, r) * (scale if r == 0 else 1.0)) for r in range(stats.max_rank)]
            for d in range(1, stats.max_depth + 1)]


@dataclass(order=True)
class _Candidate:
    neg_reach: float
    parent: int = field(compare=False)  # index in the sequence's shape, -1: the root
    depth: int = field(compare=False)
    rank: int = field(compare=False)
    missed: float = field(compare=False)  # prod over earlier siblings of (1 - c)


def best_trees(tables: Sequence[Sequence[Sequence[float]]], cost: CostModel, max_k: int | None = None,
               max_nodes: int = 8, max_branch: int = 2, min_gain: float = 0.0,
               draft_s: Sequence[float] | None = None) -> list[Shape]:
    """One shape per sequence of a flattened round: draft nodes go one at a time to the sequence
    whose next-best node has the most reach per unit of cost (that node's verify and draft cost),
    until none is left; the shapes at the best round rate seen win (ties: the first sequence), so a
    verify cost whose first extra token costs most (a concave table, as int8 on CPUs) still drafts. Each
    sequence's tree is depth <= max_k, <= max_nodes nodes, <= max_branch children a node; tables[i]
    is its c(d, r). All stay empty unless the round beats plain decoding by min_gain. A chain where
    side branches do not pay; adaptive.best_ks is the chain case (max_branch 1, c flat at alpha)."""
    b = len(tables)
    if b == 0:
        return []
    top = cost.max_k if max_k is None else min(max_k, cost.max_k)
    draft_s = [cost.draft_token_s(b)] * b if draft_s is None else list(draft_s)
    per_seq = cost.at_batch(b).verify_s
    width = max(1, max_branch)

    def c(i: int, d: int, r: int) -> float:
        return tables[i][d - 1][r] if d <= len(tables[i]) and r < min(width, len(tables[i][d - 1])) else 0.0

    shapes: list[list[int]] = [[] for _ in range(b)]
    reach: list[list[float]] = [[] for _ in range(b)]
    heaps = [[_Candidate(-c(i, 1, 0), -1, 1, 0, 1.0)] if top >= 1 and max_nodes >= 1 else [] for i in range(b)]
    expected, tokens, drafting_s = float(b), b, 0.0
    plain = rate = best = expected / verify_cost(per_seq, b, b)
    best_shapes = [() for _ in range(b)]
    while True:
        verify = verify_cost(per_seq, b, tokens + 1)
        rates = [((expected - heaps[i][0].neg_reach) / (verify + drafting_s + draft_s[i]), -i)
                 for i in range(b) if heaps[i] and len(shapes[i]) < max_nodes]
        if not rates:
            break
        new_rate, neg_i = max(rates)
        i = -neg_i
        node = heapq.heappop(heaps[i])
        shapes[i].append(node.parent)
        reach[i].append(-node.neg_reach)
        j = len(shapes[i]) - 1
        if node.depth < top:  # its first child
            heapq.heappush(heaps[i], _Candidate(-reach[i][j] * c(i, node.depth + 1, 0), j, node.depth + 1, 0, 1.0))
        if node.rank + 1 < width:  # its next sibling
            missed = node.missed * (1 - c(i, node.depth, node.rank))
            above = 1.0 if node.parent < 0 else reach[i][node.parent]
            heapq.heappush(heaps[i], _Candidate(-above * missed * c(i, node.depth, node.rank + 1), node.parent,
                                                node.depth, node.rank + 1, missed))
        expected, tokens, drafting_s, rate = expected - node.neg_reach, tokens + 1, drafting_s + draft_s[i], new_rate
        if rate > best:
            best, best_shapes = rate, [tuple(s) for s in shapes]
    return best_shapes if best > plain * (1 + min_gain) else [()] * b


def shape_depth(shape: Sequence[int]) -> int:
    return max(depths_and_ranks(shape)[0], default=0)


def is_chain(shape: Sequence[int]) -> bool:
    return tuple(shape) == tuple(range(-1, len(shape) - 1))


def max_fanout(shape: Sequence[int]) -> int:
    return max((len(c) for c in children_of(shape).values()), default=0)


def cut_shape(shape: Sequence[int], max_depth: int, max_nodes: int) -> Shape:
    """The shape's nodes of depth <= max_depth, the first max_nodes of them (parents come before
    their children, so what is kept is a tree), renumbered."""
    depth, _ = depths_and_ranks(shape)
    index: dict[int, int] = {-1: -1}
    out: list[int] = []
    for j, parent in enumerate(shape):
        if depth[j] <= max_depth and len(out) < max_nodes and parent in index:
            index[j] = len(out)
            out.append(index[parent])
    return tuple(out)
