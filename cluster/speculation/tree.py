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

Randomness: each sampled sequence draws one table of uniforms u [n + 1, w] from its own generator
in one call (tree_uniforms; w = max children + 1 for sampled children, 1 for chosen ones). At the
node whose p row is a, child c (in sampling order) is tested with u[a, c] and the stopping token
(correction, bonus, or the draw y chosen children are matched with) is drawn by sample_rows with
u[a, -1]. accept_trees (batched over the round, depth by depth, no host reads until its one
transfer) and reference_accept_tree (a slow oracle written from the definitions) read the same
table in the same places, so they agree draw for draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from .host import HostTransfers, read, to_device
from .sample import draw_uniforms, sample_rows, uniforms

Q_ZERO = "a draft node had q(x) = 0: the drafter did not sample from q"


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


def table_width(tree: DraftTree) -> int:
    """w, the columns of a tree's uniform table: one per child of its widest node, and the stop."""
    return (max((len(v) for v in tree._children.values()), default=0) if tree.sampled else 0) + 1


def tree_uniforms(tree: DraftTree, generator: torch.Generator | None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """[n + 1, w] the sequence's uniforms for one tree walk, in one call from its generator."""
    w = table_width(tree)
    return uniforms((len(tree) + 1) * w, generator, device).view(len(tree) + 1, w)


def depth(tree: DraftTree) -> int:
    """The longest root-to-leaf path, in nodes (0: no nodes)."""
    d: list[int] = []
    for parent in tree.parents:
        d.append(1 if parent < 0 else d[parent] + 1)
    return max(d, default=0)


def _residual_rows(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """residual per row: r, q [S, V]."""
    rest = (r - q).clamp(min=0.0)
    mass = rest.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, rest / mass, r)


def _walk(trees: Sequence[DraftTree], device: torch.device, ids: torch.Tensor | None = None,
          p: torch.Tensor | None = None, generators: Sequence[torch.Generator | None] = ()) -> torch.Tensor:
    """The trees' walks at once, depth by depth: ids [R] the argmax ids (greedy) or p [R, V] the
    target rows (sampled), R = sum(n_i + 1) over the trees. Returns [S, 2 + D] int64 on device:
    per tree the stopping token, a q(x) = 0 flag, and the path's nodes (-1 after it)."""
    width = max([len(v) for t in trees for v in t._children.values()] + [1])  # M, children per node
    max_depth = max(depth(t) for t in trees)  # D
    sampled = p is not None
    w = [table_width(t) if sampled else 1 for t in trees]
    cols = max(w)  # W: the children tested at most (W - 1), then the stop
    root, kid_row, kid_node, kid_tok, q_row, has_q, u_index = [], [], [], [], [], [], []
    offset = q_offset = drawn = 0
    counts = [(len(t) + 1) * wi for t, wi in zip(trees, w)]
    pad_u = sum(counts)  # the index of a zero appended to the draws: unused table cells
    for t, wi in zip(trees, w):
        root.append(offset)
        for a, node in enumerate(range(-1, len(t))):  # a: the node's p row in the tree
            kids = t.children(node)
            pad = width - len(kids)
            kid_row += [offset + c + 1 for c in kids] + [offset + a] * pad
            kid_node += kids + [-1] * pad
            kid_tok += [t.tokens[c] for c in kids] + [-1] * pad
            q_row.append(q_offset + kids[0] if t.sampled and kids else 0)
            has_q.append(int(t.sampled and bool(kids)))
            base = drawn + a * wi
            u_index += [base + c if c < wi - 1 else pad_u for c in range(cols - 1)] + [base + wi - 1]
        offset += len(t) + 1
        drawn += (len(t) + 1) * wi
        q_offset += len(t) if t.sampled else 0
    rows, s = offset, len(trees)
    layout = to_device(torch.tensor(root + kid_row + kid_node + kid_tok + q_row + has_q + u_index, dtype=torch.long),
                       device)
    root_t, kid_row_t, kid_node_t, kid_tok_t, q_row_t, has_q_t, u_index_t = layout.split(
        [s] + [rows * width] * 3 + [rows] * 2 + [rows * cols])
    kid_row_t, kid_node_t, kid_tok_t = (x.view(rows, width) for x in (kid_row_t, kid_node_t, kid_tok_t))  # [R, M]
    tested = cols - 1 if any(has_q) else 0  # children tested by rank, at most
    if sampled:
        flat = draw_uniforms(counts, generators, device)
        u = torch.cat([flat, flat.new_zeros(1)])[u_index_t].view(rows, cols)  # [R, W]
    if tested:
        q = torch.cat([to_device(t.q, device) for t in trees if t.sampled])  # [sum n_i, V] the sampled trees' q

    rank_weight = torch.arange(width, 0, -1, device=device)  # [M] a unique maximum at the first match
    # per p row: its children's tokens, rows and nodes, whether they were sampled, their q's row
    table = torch.cat([kid_tok_t, kid_row_t, kid_node_t, has_q_t.unsqueeze(1), q_row_t.unsqueeze(1)], dim=1)
    cur = root_t  # [S] each walk's current p row
    done = torch.zeros(s, dtype=torch.bool, device=device)
    final = torch.zeros(s, dtype=torch.long, device=device)
    bad = torch.zeros(s, dtype=torch.bool, device=device)
    path = []
    for d in range(max_depth + 1):
        at = table[cur]  # [S, 3M + 2]
        toks, kid_rows, kid_nodes = at[:, :width], at[:, width : 2 * width], at[:, 2 * width : 3 * width]  # [S, M]
        moved = torch.zeros(s, dtype=torch.bool, device=device)
        taken = torch.zeros(s, dtype=torch.long, device=device)  # the rank of the child moved to
        if sampled:
            r, u_cur = p[cur], u[cur]  # [S, V] r starts at p; [S, W]
            has_q_cur = at[:, 3 * width].bool()
            if tested:  # sampled children: rank by rank, min(1, r(x) / q(x)), r <- norm(max(0, r - q))
                live = has_q_cur & ~done
                q_cur = q[at[:, 3 * width + 1]]  # [S, V]
                for c in range(tested):
                    x = toks[:, c]
                    test = live & ~moved & (x >= 0)
                    xi = x.clamp(min=0).unsqueeze(1)
                    r_x, q_x = r.gather(1, xi).squeeze(1), q_cur.gather(1, xi).squeeze(1)  # [S]
                    bad = bad | (test & (q_x <= 0))
                    hit = test & (u_cur[:, c] < torch.where(q_x > 0, r_x / q_x, 1.0).clamp(max=1.0))
                    taken = torch.where(hit, c, taken)
                    moved = moved | hit
                    r = torch.where((test & ~hit).unsqueeze(1), _residual_rows(r, q_cur), r)
            y = sample_rows(r, u_cur[:, -1])  # [S] the stop: from r, or the draw chosen children are matched with
            chosen = ~has_q_cur & ~done
        else:
            y = ids[cur]  # [S] the target's argmax
            chosen = ~done
        match = (toks == y.unsqueeze(1)) & chosen.unsqueeze(1)  # [S, M]
        found = match.any(dim=1)
        taken = torch.where(found, (match * rank_weight).argmax(dim=1), taken)  # the first child with token y
        moved = moved | found
        stop = ~done & ~moved
        final = torch.where(stop, y, final)
        done = done | stop
        if d < max_depth:
            pick = taken.unsqueeze(1)
            path.append(torch.where(moved, kid_nodes.gather(1, pick).squeeze(1), -1))
            cur = torch.where(moved, kid_rows.gather(1, pick).squeeze(1), cur)
    return torch.stack([final, bad.long()] + path, dim=1)


def _decode(values: list[list[int]], trees: Sequence[DraftTree]) -> list[TreeAcceptance]:
    out = []
    for v, t in zip(values, trees):
        assert not v[1], Q_ZERO
        path = []
        for node in v[2:]:
            if node < 0:
                break
            path.append(node)
        out.append(TreeAcceptance(tuple(path), tuple(t.tokens[c] for c in path) + (v[0],)))
    return out


def accept_tree(p: torch.Tensor, tree: DraftTree, generator: torch.Generator | None) -> TreeAcceptance:
    """One sequence at T > 0: p [n + 1, V] warped target rows (row 0 the root, row j + 1 node j)."""
    return _decode(_walk([tree], p.device, p=p, generators=[generator]).tolist(), [tree])[0]


_ACCEPT_TREE = accept_tree


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
                 generators: Sequence[torch.Generator | None],
                 host: HostTransfers | None = None) -> list[TreeAcceptance]:
    """The round's trees: rows[i] is sequence i's [n_i + 1] argmax ids when greedy[i], else its
    [n_i + 1, V] warped target probabilities. All walks run batched on the rows' device; the
    result leaves it in one transfer (counted by `host` when given).

    A replaced accept_tree (the negative controls patch tree.accept_tree) decides each sampled
    tree itself, one at a time."""
    if not trees:
        return []
    single = accept_tree if accept_tree is not _ACCEPT_TREE else None
    greedy_idx = [i for i, g in enumerate(greedy) if g]
    sampled_idx = [i for i, g in enumerate(greedy) if not g]
    out: list[TreeAcceptance | None] = [None] * len(trees)
    parts = []  # (sequences, [S, 2 + D] walks)
    if greedy_idx:
        ids = torch.cat([rows[i].reshape(-1) for i in greedy_idx])  # [R]
        parts.append((greedy_idx, _walk([trees[i] for i in greedy_idx], ids.device, ids=ids)))
    if sampled_idx and single is None:
        p = torch.cat([rows[i] for i in sampled_idx])  # [R, V]
        parts.append((sampled_idx, _walk([trees[i] for i in sampled_idx], p.device, p=p,
                                         generators=[generators[i] for i in sampled_idx])))
    elif sampled_idx:
        for i in sampled_idx:
            out[i] = single(rows[i], trees[i], generators[i])
    if parts:
        cols = max(walks.shape[1] for _, walks in parts)
        device = parts[0][1].device
        flat = torch.cat([to_device(torch.nn.functional.pad(walks, (0, cols - walks.shape[1]), value=-1), device)
                          for _, walks in parts])
        values = read(flat, host)
        at = 0
        for idx, walks in parts:
            for i, result in zip(idx, _decode(values[at : at + len(idx)], [trees[i] for i in idx])):
                out[i] = result
            at += len(idx)
    return out  # type: ignore[return-value]


def reference_accept_tree(p: torch.Tensor, tree: DraftTree, greedy: bool,
                          generator: torch.Generator | None) -> list[int]:
    """The slow oracle: the walk written out per node from the rule's definition, reading the same
    uniform table in the same places (tree_uniforms: child c of the node on p row a tested with
    u[a, c], the stop drawn with u[a, -1]). p [n + 1, V]: for greedy, its argmax is the target's
    choice, and nothing is drawn."""
    n = len(tree.tokens)
    kids = {node: [j for j in range(n) if tree.parents[j] == node] for node in range(-1, n)}
    u = None if greedy else tree_uniforms(tree, generator, p.device)  # [n + 1, w]
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
        stop_u = u[node + 1, -1:]  # [1]
        if not kids[node]:
            out.append(int(sample_rows(row[None], stop_u)[0]))
            return out
        if tree.q is None:
            y = int(sample_rows(row[None], stop_u)[0])
            out.append(y)
            nxt = [c for c in kids[node] if tree.tokens[c] == y]
            if not nxt:
                return out
            node = nxt[0]
            continue
        q = tree.q[kids[node][0]]
        r = row
        for rank, c in enumerate(kids[node]):
            x = tree.tokens[c]
            assert float(q[x]) > 0, Q_ZERO
            if float(u[node + 1, rank]) < float((r[x] / q[x]).clamp(max=1.0)):
                out.append(x)
                node = c
                break
            left = torch.clamp(r - q, min=0.0)
            r = left / left.sum() if float(left.sum()) > 0 else r
        else:
            out.append(int(sample_rows(r[None], stop_u)[0]))
            return out
