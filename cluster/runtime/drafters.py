"""Prompt lookup (`ngram`), and what drafters build blocks with. A drafter (the contract:
speculation.round.Drafter, with its DrafterCapabilities) proposes up to k tokens (a chain, or a
tree) and the q they were sampled from. Model drafters: runtime/model_drafter.py."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..speculation.round import DraftBlock, DraftRequest, Drafter, DrafterCapabilities

__all__ = ["Drafter", "DrafterCapabilities", "NgramDrafter", "NgramIndex", "TreeBuilder"]


class NgramIndex:
    """Where each n-gram (min_n <= n <= max_n) of a token list ends, kept up to date token by token
    as the list grows or is cut back, so a round's work is the tokens it adds or removes.

    `marks` (shared by a drafter's indexes) maps (length, last token) to the indexes whose list had
    that length, for the last `window` lengths: how a drafter finds the index of a context."""

    def __init__(self, min_n: int, max_n: int, marks: dict[tuple[int, int], list[NgramIndex]], window: int):
        self.min_n, self.max_n, self.marks, self.window = min_n, max_n, marks, window
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> where its occurrences end, ascending
        self.ops = 0  # n-grams added or removed, in all (the work the tests count)

    def push(self, token: int) -> None:
        self.tokens.append(token)
        end = len(self.tokens)
        for n in range(self.min_n, min(self.max_n, end) + 1):
            self.ends.setdefault(tuple(self.tokens[end - n :]), []).append(end)
            self.ops += 1
        self._mark(end)
        if end > self.window:
            self._unmark(end - self.window)

    def pop(self) -> None:
        end = len(self.tokens)
        for n in range(self.min_n, min(self.max_n, end) + 1):
            key = tuple(self.tokens[end - n :])
            ends = self.ends[key]
            ends.pop()
            if not ends:
                del self.ends[key]
            self.ops += 1
        self._unmark(end)
        if end > self.window:
            self._mark(end - self.window)
        self.tokens.pop()

    def sync(self, context: list[int], keep: int, length: int) -> None:
        """Indexes context[:length], given that its first `keep` tokens are those indexed."""
        while len(self.tokens) > keep:
            self.pop()
        for t in context[keep:length]:
            self.push(t)

    def drop(self) -> None:
        """Removes its marks (the drafter forgets it)."""
        for j in range(max(1, len(self.tokens) - self.window + 1), len(self.tokens) + 1):
            self._unmark(j)

    def occurrences(self, pattern: list[int]) -> list[int]:
        """Where the earlier occurrences of `pattern` end, earliest first."""
        return self.ends.get(tuple(pattern), [])

    def _mark(self, length: int) -> None:
        self.marks.setdefault((length, self.tokens[length - 1]), []).append(self)

    def _unmark(self, length: int) -> None:
        key = (length, self.tokens[length - 1])
        found = self.marks[key]
        found.remove(self)
        if not found:
            del self.marks[key]


class NgramDrafter(Drafter):
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens
    (n from max_n down to min_n) and propose what followed it. No model, q is one-hot.

    The n-grams of each context are kept in an NgramIndex updated with the tokens added since the
    context was last seen (found by its length and last token at most `window` tokens back, its
    prefix checked by one list comparison), so a round's Python work does not grow with the
    context; a context that shares no indexed prefix is indexed afresh. The `max_contexts` indexes
    used last are kept. `scan_match` and `scan_tree` are the slow references."""

    name = "ngram"
    capabilities = DrafterCapabilities(drafts_trees=True)  # several earlier matches that continue differently make a tree

    def __init__(self, max_n: int = 3, min_n: int = 1, window: int = 64, max_contexts: int = 64):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.window, self.max_contexts = window, max_contexts
        self._marks: dict[tuple[int, int], list[NgramIndex]] = {}
        self._used: OrderedDict[int, NgramIndex] = OrderedDict()  # id -> index, least recently used first

    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        return [self.tree(r.context, r.k, r.max_nodes, r.max_branch) if r.max_nodes > 0
                else DraftBlock(self.lookup(r.context, r.k), None) for r in requests]

    def lookup(self, context: list[int], k: int) -> list[int]:
        start = self.match(context) if k > 0 else None
        return [] if start is None else context[start : start + k]

    def match(self, context: list[int]) -> int | None:
        """Where what followed the latest earlier occurrence of the longest matching suffix starts
        (None: no suffix of min_n or more tokens occurred before)."""
        end = len(context)
        if end - 1 < self.min_n:
            return None
        index = self.index(context)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            ends = index.occurrences(context[end - n :])
            if ends:
                return ends[-1]
        return None

    def tree(self, context: list[int], depth: int, max_nodes: int, max_branch: int) -> DraftBlock:
        """What followed earlier occurrences of the context's suffix, merged into a trie: longer
        suffixes first, latest match first; at most max_nodes nodes, max_branch children a node,
        depth tokens deep. Children are chosen, not sampled (q None). A trie that is one path
        comes back as a chain."""
        end, trie = len(context), _Trie(max_nodes, max_branch)
        if end - 1 < self.min_n or depth <= 0 or max_nodes <= 0:
            return trie.block()
        index = self.index(context)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            for stop in reversed(index.occurrences(context[end - n :])):  # latest match first
                if len(trie.tokens) >= max_nodes or depth <= 0:
                    break
                trie.add(context[stop : stop + depth])
        return trie.block()

    def index(self, context: list[int]) -> NgramIndex:
        """The index of the n-grams ending before the context's last token (the suffix itself never
        matches): the one kept for the longest prefix of it within `window` tokens of that, brought
        up to date, else a new one."""
        context = context if isinstance(context, list) else list(context)
        need = len(context) - 1
        for j in range(need, max(0, need - self.window), -1):
            for index in self._marks.get((j, context[j - 1]), ()):
                if _same_prefix(index.tokens, context, j):
                    index.sync(context, j, need)
                    self._used.move_to_end(id(index))
                    return index
        index = NgramIndex(self.min_n, self.max_n, self._marks, self.window)
        index.sync(context, 0, need)
        self._used[id(index)] = index
        while len(self._used) > self.max_contexts:
            self._used.popitem(last=False)[1].drop()
        return index

    def scan_match(self, context: list[int]) -> int | None:
        """The slow reference for match: a scan of the whole context."""
        end = len(context)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            pattern = context[end - n :]
            first = pattern[0]
            for start in range(end - n - 1, -1, -1):  # latest match first, never the suffix itself
                if context[start] == first and context[start : start + n] == pattern:
                    return start + n
        return None

    def scan_tree(self, context: list[int], depth: int, max_nodes: int, max_branch: int) -> DraftBlock:
        """The slow reference for tree: a scan of the whole context."""
        trie, end = _Trie(max_nodes, max_branch), len(context)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            pattern = context[end - n :]
            for start in range(end - n - 1, -1, -1):
                if len(trie.tokens) >= max_nodes or depth <= 0:
                    break
                if context[start] == pattern[0] and context[start : start + n] == pattern:
                    trie.add(context[start + n : start + n + depth])
        return trie.block()


def _same_prefix(a: list[int], b: list[int], j: int) -> bool:
    """a[:j] == b[:j], in C (about a nanosecond a token: no Python work a token)."""
    return (a if len(a) == j else a[:j]) == (b if len(b) == j else b[:j])


class _Trie:
    """Continuations merged into a trie of at most max_nodes nodes, max_branch children a node."""

    def __init__(self, max_nodes: int, max_branch: int):
        self.max_nodes, self.max_branch = max_nodes, max_branch
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.children: dict[int, dict[int, int]] = {-1: {}}  # node -> {token: child}

    def add(self, continuation: list[int]) -> None:
        node = -1
        for t in continuation:
            child = self.children[node].get(t)
            if child is None:
                if len(self.children[node]) >= self.max_branch or len(self.tokens) >= self.max_nodes:
                    break
                child = self.children[node][t] = len(self.tokens)
                self.tokens.append(t)
                self.parents.append(node)
                self.children[child] = {}
            node = child

    def block(self) -> DraftBlock:
        chain = self.parents == list(range(-1, len(self.tokens) - 1))
        return DraftBlock(self.tokens, None, None if chain else tuple(self.parents))


@dataclass
class TreeBuilder:
    """A sequence's draft as it grows: nodes in the order drafted (parents before children)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)  # [V] q each node was drawn from (sampled drafts)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, q: torch.Tensor | None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        if q is not None:
            self.rows.append(q)
        return len(self.tokens) - 1

    def path(self, node: int) -> list[int]:
        """The tokens from the root's child down to `node` (-1: none)."""
        out = []
        while node >= 0:
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]

    def block(self) -> DraftBlock:
        chain = self.parents == list(range(-1, len(self.tokens) - 1))
        return DraftBlock(self.tokens, torch.stack(self.rows) if self.rows else None, None if chain else tuple(self.parents))
