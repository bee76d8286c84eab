"""Lossless acceptance of a draft tree (staged speculative decoding, Spector and Re 2023; the
multi-candidate rule of SpecInfer, Miao et al. 2023).

A tree holds n draft nodes; node j has a token and a parent (an earlier node, or -1: the root, the
last committed token). The target scores the root and every node in one pass: p has n + 1 rows,
row 0 for the root and row j + 1 for node j, each the distribution of the token after it. From
the root, each step either moves to a child (its token is emitted) or stops with one token drawn
from what is left of p there (the correction; at a leaf, the bonus token). Two rules, both lossless:

- children chosen deterministically (top-b of q, several lookup matches) or one-hot: draw y ~ p at
  the node; if a child has token y, move to the first such child, else y is the correction;
- children sampled independently from q (SpecInfer): test them in sampling order, accepting child
  x with probability min(1, r(x) / q(x)), r starting at p; after each rejection
  r <- norm(max(0, r - q)); when all are rejected, draw from r. Duplicate children are kept and
  tested (dropping them biases the result).

Greedy: the longest path whose tokens equal the target's argmax at every node, then the argmax.
Each sequence draws from its own generator; accept_trees (the batched path) and
reference_accept_tree (a slow oracle written from the definitions) draw in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from .sample import sample_token


@dataclass(frozen=True)
class DraftTree:
    tokens: tuple[int, ...]  # [n] node tokens
    parents: tuple[int, ...]  # [n] parent of each node (< its index; -1: the root)
    q: torch.Tensor | None = None  # [n, V] the distribution node j was sampled from (siblings share it); None: chosen

    def __post_init__(self):
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"a tree has one parent per token: {len(self.tokens)} tokens, {len(self.parents)} parents")
        for j, parent in enumerate(self.parents):
            if not -1 <= parent < j:
                raise ValueError(f"node {j}'s parent must be an earlier node or -1, got {parent}")
        if self.q is not None and self.q.shape[0] != len(self.tokens):
            raise ValueError(f"q needs one row per node: {self.q.shape[0]} rows for {len(self.tokens)} nodes")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: Sequence[int], q: torch.Tensor | None = None) -> "DraftTree":
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)), q)

    def children(self, node: int) -> list[int]:
        """The children of `node` (-1: the root) in index order, their sampling order."""
        return self._children.get(node, [])

    @cached_property
    def _children(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for j, parent in enumerate(self.parents):
            out.setdefault(parent, []).append(j)
        return out

    @property
    def sampled(self) -> bool:
        return self.q is not None


@dataclass(frozen=True)
class TreeAcceptance:
    path: tuple[int, ...]  # the accepted nodes, root to leaf
    tokens: tuple[int, ...]  # their tokens, then the correction or bonus token

    @property
    def num_accepted(self) -> int:
        return len(self.path)


def residual(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, r - q)); r itself where nothing is left (a rejection that had probability ~0)."""
    rest = (r - q).clamp(min=0.0)
    mass = rest.sum()
    return rest / mass if mass > 0 else r


def child_outcomes(p: torch.Tensor, child_tokens: Sequence[int], q: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact law of one step at a node: p [V] the target there, the children's tokens, and q [V]
    they were sampled from (None: chosen). Returns ([m] the probability of moving to each child,
    [V] the probability of stopping with each token); together they sum to 1."""
    m = len(child_tokens)
    move = torch.zeros(m, dtype=p.dtype)
    if q is None:
        stop = p.clone()
        for i, x in enumerate(child_tokens):
            if x not in child_tokens[:i]:
                move[i] = p[x]
                stop[x] = 0.0
        return move, stop
    r, reach = p, 1.0
    for i, x in enumerate(child_tokens):
        a = min(1.0, float(r[x]) / float(q[x]))
        move[i] = reach * a
        reach *= 1.0 - a
        r = residual(r, q)
    return move, reach * r


def accept_tree(p: torch.Tensor, tree: DraftTree, generator: torch.Generator | None) -> TreeAcceptance:
    """One sequence at T > 0: p [n + 1, V] warped target rows (row 0 the root, row j + 1 node j)."""
    path, tokens, node = [], [], -1
    while True:
        row = p[node + 1]
        children = tree.children(node)
        if not children:
            return TreeAcceptance(tuple(path), tuple(tokens) + (sample_token(row, generator),))
        if tree.q is None:
            y = sample_token(row, generator)
            taken = next((c for c in children if tree.tokens[c] == y), None)
            if taken is None:
                return TreeAcceptance(tuple(path), tuple(tokens) + (y,))
        else:
            q = tree.q[children[0]]
            r, taken = row, None
            for c in children:
                x = tree.tokens[c]
                u = float(torch.rand(1, generator=generator))
                assert float(q[x]) > 0, "a draft node had q(x) = 0: the drafter did not sample from q"
                if u < min(1.0, float(r[x]) / float(q[x])):
                    taken = c
                    break
                r = residual(r, q)
            if taken is None:
                return TreeAcceptance(tuple(path), tuple(tokens) + (sample_token(r, generator),))
        path.append(taken)
        tokens.append(tree.tokens[taken])
        node = taken


def accept_tree_greedy(argmax: torch.Tensor | list[int], tree: DraftTree) -> TreeAcceptance:
    """One sequence at T = 0: argmax [n + 1] the target's argmax ids (row 0 the root, row j + 1 node j)."""
    ids = argmax.tolist() if isinstance(argmax, torch.Tensor) else argmax
    path, node = [], -1
    while True:
        y = ids[node + 1]
        taken = next((c for c in tree.children(node) if tree.tokens[c] == y), None)
        if taken is None:
            return TreeAcceptance(tuple(path), tuple(tree.tokens[c] for c in path) + (y,))
        path.append(taken)
        node = taken


def accept_trees(rows: Sequence[torch.Tensor], trees: Sequence[DraftTree], greedy: Sequence[bool],
                 generators: Sequence[torch.Generator | None]) -> list[TreeAcceptance]:
    """The round's trees: rows[i] is sequence i's [n_i + 1] argmax ids when greedy[i], else its
    [n_i + 1, V] warped target probabilities."""
    greedy_ids = iter(torch.cat([r for r, g in zip(rows, greedy) if g]).tolist() if any(greedy) else [])
    out = []
    for r, t, g, gen in zip(rows, trees, greedy, generators):
        if g:  # the argmax rows of all greedy sequences leave the tensor in one call
            out.append(accept_tree_greedy([next(greedy_ids) for _ in range(len(t) + 1)], t))
        else:
            out.append(accept_tree(r, t, gen))
    return out


def reference_accept_tree(p: torch.Tensor, tree: DraftTree, greedy: bool,
                          generator: torch.Generator | None) -> list[int]:
    """The slow oracle: the same walk written out per node from the rule's definition, with the
    same draws in the same order (one token per deterministic node; a uniform per tested sampled
    child, then one token). p [n + 1, V]: for greedy, its argmax is the target's choice."""
    n = len(tree.tokens)
    kids = {node: [j for j in range(n) if tree.parents[j] == node] for node in range(-1, n)}
    out, node = [], -1
    while True:
        row = p[node + 1]
        if greedy:
            best = int(torch.argmax(row))
            nxt = [c for c in kids[node] if tree.tokens[c] == best]
            out.append(best)
            if not nxt:
                return out
            node = nxt[0]
            continue
        if not kids[node]:
            out.append(sample_token(row, generator))
            return out
        if tree.q is None:
            y = sample_token(row, generator)
            out.append(y)
            nxt = [c for c in kids[node] if tree.tokens[c] == y]
            if not nxt:
                return out
            node = nxt[0]
            continue
        q = tree.q[kids[node][0]]
        r = row
        for c in kids[node]:
            x = tree.tokens[c]
            if float(torch.rand(1, generator=generator)) < min(1.0, float(r[x]) / float(q[x])):
                out.append(x)
                node = c
                break
            left = torch.clamp(r - q, min=0.0)
            r = left / left.sum() if float(left.sum()) > 0 else r
        else:
            out.append(sample_token(r, generator))
            return out
