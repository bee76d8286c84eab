"""Drafter `ngram_head`: prompt lookup where the context copies, the draft head elsewhere.

Where the context's last n >= draft.ngram_head.min_n tokens occurred before, the answer is likely
copying its input: lookup proposes what followed (a long block, nearly free, q one-hot). Every
other sequence of the round drafts from the head (runtime/head_drafter.py). The head is sent each
sequence's new features every round (at K = 0 where lookup drafts), so its KV store never lags.
"""

from __future__ import annotations

from dataclasses import replace

from ..speculation.round import DraftBlock, DraftRequest
from .drafters import Drafter, NgramDrafter
from .head_drafter import HeadDrafter


class LookupThenHead(Drafter):
    name = "ngram_head"

    def __init__(self, lookup: NgramDrafter, head: HeadDrafter):
        self.lookup, self.head = lookup, head
        self._matches: dict[int, tuple[int, int | None]] = {}  # seq_id -> (context length, lookup.match)
        self.feature_size = head.feature_size
        self.vocab_size = head.vocab_size
        # the head's (it reads the features, drafts all its sequences a depth at a time, trees too);
        # lookup drafts cost nothing and may be trees (several earlier matches)
        self.capabilities = replace(head.capabilities, free_sources=frozenset({"lookup"}))

    def source(self, seq_id: int, context: list[int]) -> str:
        return "lookup" if self._match(seq_id, context) is not None else "head"

    def _match(self, seq_id: int, context: list[int]) -> int | None:
        """lookup.match(context), found once per sequence and context length (source, then propose)."""
        known = self._matches.get(seq_id)
        if known is None or known[0] != len(context):
            known = self._matches[seq_id] = (len(context), self.lookup.match(context))
        return known[1]

    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        starts = [self._match(r.seq_id, r.context) for r in requests]
        copied = [None if i is None or r.k <= 0
                  else self.lookup.tree(r.context, r.k, r.max_nodes, r.max_branch) if r.max_nodes > 0
                  else DraftBlock(r.context[i : i + r.k], None) for r, i in zip(requests, starts)]
        drafted = self.head.propose_many([replace(r, k=0) if c else r for r, c in zip(requests, copied)])
        return [c if c else block for c, block in zip(copied, drafted)]

    def release(self, seq_id: int) -> None:
        self._matches.pop(seq_id, None)
        self.head.release(seq_id)
