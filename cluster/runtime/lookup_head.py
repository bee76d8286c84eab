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
    needs_features = True

    def __init__(self, lookup: NgramDrafter, head: HeadDrafter):
        self.lookup, self.head = lookup, head
        self.feature_size = head.feature_size
        self.vocab_size = head.vocab_size

    def propose(self, seq_id, context, k, params, seed) -> DraftBlock:
        return self.propose_many([DraftRequest(seq_id, context, k, params, seed)])[0]

    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        copied = [self.lookup.lookup(r.context, r.k) for r in requests]
        drafted = self.head.propose_many([replace(r, k=0) if c else r for r, c in zip(requests, copied)])
        return [DraftBlock(c, None) if c else block for c, block in zip(copied, drafted)]

    def release(self, seq_id: int) -> None:
        self.head.release(seq_id)
