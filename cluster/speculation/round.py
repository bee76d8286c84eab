"""What one round passes along, and the two roles it passes it between.

A round: every active sequence asks the drafter for a block (DraftRequest -> DraftBlock); the
target verifies every block in one forward (Target.forward_batch); acceptance turns each
sequence's scores into the tokens it emits (Acceptance); the target's cache keeps the accepted
positions, and the drafter sees the result (Drafter.observe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

from .params import SamplingParams


@dataclass(frozen=True)
class DraftRequest:
    seq_id: int
    context: Sequence[int]  # [n] the sequence's committed tokens
    k: int  # draft at most this many tokens
    params: SamplingParams
    seed: int  # seeds the block's sampling, so a block is the same wherever it is drafted
    # for drafters that read the target (needs_features): the target's last hidden states of the
    # committed positions features_start .. features_start + n - 1 not sent before; [n, d]
    features: torch.Tensor | None = None
    features_start: int = 0
    max_nodes: int = 0  # > 0: a tree of at most this many nodes, depth at most k, may come back
    max_branch: int = 1  # its children per node at most
    # the tree's template (speculation.shape): node j's parent, siblings in rank order; drafters that
    # rank their candidates follow it, the others draft within max_nodes / max_branch; None: theirs
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class DraftBlock:
    token_ids: list[int]  # [k]
    probs: torch.Tensor | None  # [k, V] the q each token was drawn from; None: one-hot (deterministic)
    parents: tuple[int, ...] | None = None  # [k] each token's parent (-1: the last committed token); None: a chain
    lookahead: int = 0  # PaSS: the verifier appends this many look-ahead tokens after each accept point

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class TargetOutput:
    """What one forward gives back for one sequence."""

    scores: torch.Tensor  # [n, V] float32 logits, or [n] int64 argmax ids (greedy sequences)
    hidden: torch.Tensor | None = None  # [h, d] last hidden states (what the output layer reads) of its last h tokens
    lookahead: torch.Tensor | None = None  # PaSS: [k + 1, L, V] logits or [k + 1, L] argmax ids, a block per accept point


@dataclass(frozen=True)
class Acceptance:
    """One sequence's outcome of a round: accepted drafts, then one recovered or bonus token."""

    tokens: list[int]  # [num_accepted + 1]
    num_accepted: int
    path: tuple[int, ...] | None = None  # a tree's accepted nodes, root to leaf (None: a chain's first num_accepted)
    at_leaf: bool = False  # a tree's path ended at a leaf: nothing drafted was rejected


@runtime_checkable
class Target(Protocol):
    """The verifier: in process (runtime.kv.CausalLM) or a tensor-parallel group (actors.target)."""

    vocab_size: int
    max_context: int

    def new_cache(self): ...

    def forward_batch(self, caches: list, inputs: list[list[int]], raw: bool = False,
                      argmax_only: list[bool] | None = None, last: list[int] | None = None,
                      parents: list | None = None) -> list[torch.Tensor]:
        """Appends inputs[i] to caches[i] in one forward; per sequence its last last[i] rows:
        logits [n, V], or argmax ids [n] where argmax_only[i]."""

    def forward_outputs(self, caches: list, inputs: list[list[int]], raw: bool = False,
                        argmax_only: list[bool] | None = None, last: list[int] | None = None,
                        parents: list | None = None, hidden: list[int] | None = None) -> list[TargetOutput]:
        """forward_batch, and the last hidden states of each sequence's last hidden[i] tokens."""

    def rollback(self, cache, n: int) -> None: ...

    def keep(self, cache, positions: list[int]) -> None: ...

    def release(self, cache) -> None: ...


@runtime_checkable
class Drafter(Protocol):
    """A proposer of draft blocks (runtime.drafters, actors.draft_pool, actors.remote_drafter)."""

    name: str
    free_sources: frozenset[str]  # sources whose drafts cost nothing next to a target step (lookup)

    def source(self, seq_id: int, context: list[int]) -> str:
        """Which of its parts would draft for this context: adaptive K keeps alpha and cost per part."""

    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        """One block per request, in order; remote drafters run them in parallel."""

    def observe(self, seq_id: int, block: DraftBlock, result: Acceptance) -> None:
        """The round's outcome for a sequence this drafter proposed for."""

    def release(self, seq_id: int) -> None:
        """Forgets a finished sequence."""
