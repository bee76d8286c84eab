"""Drafter `ngram_pass`: prompt lookup where the context copies, PaSS elsewhere.

Where the context's last n >= draft.ngram_head.min_n tokens occurred before, lookup proposes what
followed (nearly free, no look-ahead block); every other sequence drafts from the target's
look-ahead rows (runtime/pass_drafter.py), whose blocks append look-ahead tokens. Look-ahead rows
are tied to the context length they draft for, so rows left from before a run of lookup rounds
are never used.
"""

from __future__ import annotations

from dataclasses import replace

from ..speculation.round import DraftBlock, DraftRequest, RoundResult
from .drafters import Drafter, NgramDrafter
from .pass_drafter import PassDrafter


class LookupThenPass(Drafter):
    name = "ngram_pass"

    def __init__(self, lookup: NgramDrafter, pas: PassDrafter):
        self.lookup, self.pas = lookup, pas
        self.capabilities = replace(pas.capabilities, free_sources=frozenset({"lookup"}))  # PaSS's, lookup free

    def source(self, seq_id: int, context: list[int]) -> str:
        return "lookup" if self.lookup.match(context) is not None else "pass"

    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        copied = [self.lookup.lookup(list(r.context), r.k) if r.k > 0 else [] for r in requests]
        drafted = self.pas.propose_many([replace(r, k=0) if c else r for r, c in zip(requests, copied)])
        return [DraftBlock(c, None) if c else block for c, block in zip(copied, drafted)]

    def after_round(self, result: RoundResult) -> None:
        self.pas.after_round(result)

    def release(self, seq_id: int) -> None:
        self.pas.release(seq_id)
