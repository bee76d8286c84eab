"""The drafter interface, and prompt lookup (`ngram`). A drafter proposes up to k tokens (a chain,
or a tree) and the q they were sampled from. Model drafters: runtime/model_drafter.py."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..speculation import SamplingParams
from ..speculation.round import Acceptance, DraftBlock, DraftRequest


class Drafter(ABC):
    name: str
    free_sources: frozenset[str] = frozenset()  # sources whose drafts cost nothing next to a target step

    def source(self, seq_id: int, context: list[int]) -> str:
        """Which of its parts would draft for this context (adaptive K tracks alpha and cost per part)."""
        return self.name

    @abstractmethod
    def propose(self, seq_id: int, context: list[int], k: int, params: SamplingParams, seed: int) -> DraftBlock:
        """Up to k tokens continuing `context` (the sequence's committed tokens); `seed` seeds the
        block's sampling, so a block is reproducible wherever it is drafted."""

    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        """One block per request, in order; remote drafters run them in parallel."""
        return [self.propose(r.seq_id, r.context, r.k, r.params, r.seed) for r in requests]

    def observe(self, seq_id: int, block: DraftBlock, result: Acceptance) -> None:
        """Sees the round's outcome for a sequence it drafted for (the lazy-rollback drafters here
        learn it from the next context instead)."""

    def release(self, seq_id: int) -> None:
        """Forgets a finished sequence."""

    def look_ahead(self, seq_id: int, rows: torch.Tensor, context_length: int) -> None:
        """PaSS drafters (blocks with lookahead > 0): the look-ahead rows at the point where the
        round's acceptance stopped ([L] argmax ids, or [L, V] logits), which draft the tokens after
        the first context_length of the sequence."""


class NgramDrafter(Drafter):
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens
    (n from max_n down to min_n) and propose what followed it. No model, q is one-hot."""

    name = "ngram"
    free_sources = frozenset({"ngram"})  # microseconds a block

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, seq_id, context, k, params, seed) -> DraftBlock:
        return DraftBlock(self.lookup(context, k), None)

    drafts_trees = True  # several earlier matches that continue differently make a tree

    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        return [self.tree(r.context, r.k, r.max_nodes, r.max_branch) if r.max_nodes > 0
                else DraftBlock(self.lookup(r.context, r.k), None) for r in requests]

    def lookup(self, context: list[int], k: int) -> list[int]:
        start = self.match(context) if k > 0 else None
        return [] if start is None else context[start : start + k]

    def tree(self, context: list[int], depth: int, max_nodes: int, max_branch: int) -> DraftBlock:
        """What followed earlier occurrences of the context's suffix, merged into a trie: longer
        suffixes first, latest match first; at most max_nodes nodes, max_branch children a node,
        depth tokens deep. Children are chosen, not sampled (q None). A trie that is one path
        comes back as a chain."""
        tokens: list[int] = []
        parents: list[int] = []
        children: dict[int, dict[int, int]] = {-1: {}}  # node -> {token: child}
        end = len(context)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            pattern = context[end - n :]
            for start in range(end - n - 1, -1, -1):
                if len(tokens) >= max_nodes or depth <= 0:
                    break
                if context[start] != pattern[0] or context[start : start + n] != pattern:
                    continue
                node = -1
                for t in context[start + n : start + n + depth]:
                    child = children[node].get(t)
                    if child is None:
                        if len(children[node]) >= max_branch or len(tokens) >= max_nodes:
                            break
                        child = children[node][t] = len(tokens)
                        tokens.append(t)
                        parents.append(node)
                        children[child] = {}
                    node = child
        chain = parents == list(range(-1, len(tokens) - 1))
        return DraftBlock(tokens, None, None if chain else tuple(parents))

    def match(self, context: list[int]) -> int | None:
        """Where what followed the latest earlier occurrence of the longest matching suffix starts
        (None: no suffix of min_n or more tokens occurred before)."""
        end = len(context)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            pattern = context[end - n :]
            first = pattern[0]
            for start in range(end - n - 1, -1, -1):  # latest match first, never the suffix itself
                if context[start] == first and context[start : start + n] == pattern:
                    return start + n
        return None


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
