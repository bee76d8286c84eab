"""What one round passes along, and the two roles it passes it between.

A round: every active sequence asks the drafter for a block (DraftRequest -> DraftBlock); the
target verifies every block in one forward (Target.verify, a VerifyBatch); acceptance turns each
sequence's scores into the tokens it emits (Acceptance); the target's cache keeps the accepted
positions, and a drafter that asks for it sees the result (Drafter.after_round, a RoundResult).
What a drafter is able to do is declared once, in its DrafterCapabilities.
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
    # for drafters that read the target (capabilities.feature_size > 0): the target's last hidden states of the
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
class VerifyBatch:
    """A round's one target forward: per sequence its uncached tokens and drafts (and PaSS look-ahead
    tokens) appended to its cache, then the prompt chunks, which return nothing."""

    caches: tuple  # [B + C] the target's caches
    inputs: tuple[list[int], ...]  # [B + C] the ids each one appends
    argmax_only: tuple[bool, ...]  # [B + C] greedy: the argmax ids come back, not logits
    last: tuple[int, ...]  # [B + C] rows scored at the end of each input (0: a chunk)
    parents: tuple[list[int] | None, ...] | None = None  # [B + C] tree / PaSS layouts (kv.attention_mask); None: chains
    hidden: tuple[int, ...] | None = None  # [B + C] last hidden states of each one's last n tokens (a reading drafter)


@dataclass(frozen=True)
class Acceptance:
    """One sequence's outcome of a round: accepted drafts, then one recovered or bonus token."""

    tokens: list[int]  # [num_accepted + 1]
    num_accepted: int
    path: tuple[int, ...] | None = None  # a tree's accepted nodes, root to leaf (None: a chain's first num_accepted)
    at_leaf: bool = False  # a tree's path ended at a leaf: nothing drafted was rejected


@runtime_checkable
class Target(Protocol):
    """The verifier: in process (runtime.kv.CausalLM) or a tensor-parallel group (specserve.actors.target)."""

    vocab_size: int
    max_context: int
    device: torch.device  # where its outputs are: acceptance runs there

    def new_cache(self): ...

    def verify(self, batch: VerifyBatch) -> list[TargetOutput]:
        """The round's forward: per sequence its scores (on `device`) and hidden states where asked."""

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


@dataclass(frozen=True)
class RoundResult:
    """One sequence's round as its drafter sees it (Drafter.after_round), after the target's cache
    kept the accepted positions and before the tokens are emitted."""

    seq_id: int
    block: DraftBlock  # what it proposed this round (empty: nothing)
    acceptance: Acceptance
    context_length: int  # the sequence's tokens once this round's acceptance.tokens are added
    output: TargetOutput  # the target's output for the sequence this round
    # PaSS: the look-ahead rows at the point where acceptance stopped ([L] argmax ids, or [L, V]
    # logits): they draft what follows the first context_length tokens; None: no look-ahead block
    lookahead: torch.Tensor | None = None


@dataclass(frozen=True)
class DrafterCapabilities:
    """What a drafter reads and does, declared once (Drafter.capabilities); the engine, adaptive K
    and calibration read this record and nothing else."""

    feature_size: int = 0  # d of the target's last hidden states it reads (DraftRequest.features); 0: none
    drafts_trees: bool = False  # may answer a tree request (max_nodes > 0) with a tree; else it is asked for chains
    batches_drafts: bool = False  # drafts a round's sequences together: calibration times each batch size
    parallelism: int = 1  # sequences it drafts at once (one per live draft replica)
    lookahead: int = 0  # PaSS: L, the look-ahead tokens its blocks may ask the verifier to append per accept point
    lookahead_source: str | None = None  # the source (Drafter.source) whose blocks carry them
    free_sources: frozenset[str] = frozenset()  # sources whose drafts cost nothing next to a target step (lookup)
    prior_alpha: float | None = None  # the acceptance new sequences start from, where known (PaSS: training's); None: measured
    prior_by_depth: tuple[float, ...] | None = None  # rank 0's acceptance per depth, where known (PaSS: per look-ahead position)
    # drafts from a causal LM of its own (drafter.lm, a runtime.kv.CausalLM): the engine checks its
    # vocabulary against the target's, calibration measures its greedy agreement as the prior alpha
    own_model: bool = False
    observes_rounds: bool = False  # after_round is called for each of its sequences every round (else never)
    q_vocab: int = 0  # ids in the q rows it samples from (a model or head); 0: one-hot q, sent as ids (lookup)

    @property
    def reads_features(self) -> bool:
        return self.feature_size > 0


@runtime_checkable
class Drafter(Protocol):
    """The one drafter contract (runtime.drafters and the model drafters, specserve.actors.draft_pool,
    specserve.actors.remote_drafter). A drafter may subclass it for the defaults below."""

    name: str
    capabilities: DrafterCapabilities = DrafterCapabilities()

    def source(self, seq_id: int, context: list[int]) -> str:
        """Which of its parts would draft for this context: adaptive K keeps alpha and cost per part."""
        return self.name

    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        """One block per request, in order; remote drafters run them in parallel. The engine's one
        call a round."""

    def after_round(self, result: RoundResult) -> None:
        """The round's result and the target's output for a sequence (capabilities.observes_rounds)."""

    def release(self, seq_id: int) -> None:
        """Forgets a finished sequence."""

    def propose(self, seq_id: int, context: list[int], k: int, params: SamplingParams, seed: int) -> DraftBlock:
        """One chain request through propose_many (a convenience for tools and tests)."""
        return self.propose_many([DraftRequest(seq_id, context, k, params, seed)])[0]

    # read-only views of the record under their old names, for readers outside the engine (bench rows)
    @property
    def drafts_trees(self) -> bool:
        return self.capabilities.drafts_trees

    @property
    def needs_features(self) -> bool:
        return self.capabilities.reads_features

    @property
    def free_sources(self) -> frozenset[str]:
        return self.capabilities.free_sources


def capabilities_of(drafter) -> DrafterCapabilities:
    """The drafter's capabilities record (Drafter.capabilities); None: no drafter, nothing."""
    return DrafterCapabilities() if drafter is None else drafter.capabilities
