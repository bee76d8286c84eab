"""Drafter `ngram_pass`: prompt lookup where the context copies, PaSS elsewhere.

Where the context's last n >= draft.ngram_head.min_n tokens occurred before, lookup proposes what
followed (nearly free, no look-ahead block); every other sequence drafts from the target's
look-ahead rows (runtime/pass_drafter.py), whose blocks append look-ahead tokens. Look-ahead rows
are tied to the context length they draft for, so rows left from before a run of lookup rounds
are never used.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..speculation.round import DraftBlock, DraftRequest
from .drafters import Drafter, NgramDrafter
from .pass_drafter import PassDrafter


class LookupThenPass(Drafter):
    name = "ngram_pass"
    free_sources = frozenset({"lookup"})
    lookahead_source = "pass"

    def __init__(self, lookup: NgramDrafter, pas: PassDrafter):
        self.lookup, self.pas = lookup, pas
        self.prior_alpha, self.prior_by_depth = pas.prior_alpha, pas.prior_by_depth

    @property
    def lookahead(self) -> int:
        return self.pas.lookahead

    def source(self, seq_id: int, context: list[int]) -> str:
        return "lookup" if self.lookup.match(context) is not None else "pass"

    def propose(self, seq_id, context, k, params, seed) -> DraftBlock:
        return self.propose_many([DraftRequest(seq_id, context, k, params, seed)])[0]

    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        copied = [self.lookup.lookup(list(r.context), r.k) if r.k > 0 else [] for r in requests]
        drafted = self.pas.propose_many([replace(r, k=0) if c else r for r, c in zip(requests, copied)])
        return [DraftBlock(c, None) if c else block for c, block in zip(copied, drafted)]

    def look_ahead(self, seq_id: int, rows: torch.Tensor, context_length: int) -> None:
        self.pas.look_ahead(seq_id, rows, context_length)

    def release(self, seq_id: int) -> None:
        self.pas.release(seq_id)
