"""The round planned as data: before anything is proposed, each sequence's draft shape, the part
of the drafter that drafts for it and that draft's price. Planning calls no model and no drafter:
it reads a snapshot of each sequence, the engine's settings and the adaptive policy."""

from __future__ import annotations

from copy import copy
from dataclasses import dataclass
from typing import Callable, Sequence

from ..speculation import AdaptiveK, ProbeSchedule
from ..speculation.shape import Shape, ShapeStats, cut_shape, default_shape


@dataclass(frozen=True)
class PlanSettings:
    """The engine's speculation settings and what its drafter declares (DrafterCapabilities)."""

    num_draft_tokens: int | str  # a fixed K, or "adaptive"
    max_draft_tokens: int
    tree_nodes: int = 0  # > 0: tree shapes up to this many nodes
    tree_branch: int = 2
    lookahead: int = 0  # PaSS: L look-ahead tokens per accept point
    lookahead_source: str | None = None  # the drafter's part that drafts by PaSS
    free_sources: frozenset[str] = frozenset()  # sources whose drafts cost no draft step
    has_drafter: bool = True


@dataclass(frozen=True)
class SequenceState:
    """What planning reads of one sequence this round."""

    seq_id: int
    requested_k: int | None  # the request's K; None: the engine's policy
    adaptive: bool  # K from its measured alpha (else fixed)
    source: str | None  # adaptive: the drafter's part that drafts for it now; None: fixed K
    alpha: float  # adaptive: its acceptance rate for drafts from `source`
    probes: ProbeSchedule | None  # adaptive: when it drafts again after rounds at K = 0
    remaining: int  # tokens it may still emit
    room: int  # context positions left for [last] + drafts (+ look-ahead blocks)


@dataclass(frozen=True)
class SequencePlan:
    seq_id: int
    shape: Shape  # the draft's parents (a chain: 0..K-1 in order); (): no draft this round
    source: str | None  # adaptive: the part that drafts; None: fixed K
    draft_s: float  # seconds one draft token costs it this round (0: free)
    probes: ProbeSchedule | None = None  # adaptive: its probe schedule after this round (the engine keeps it)

    @property
    def drafts(self) -> bool:
        return bool(self.shape)


@dataclass(frozen=True)
class RoundPlan:
    sequences: tuple[SequencePlan, ...]  # in the round's order
    draft_token_s: float  # seconds of one paying draft token this round (adaptive K's price)

    @property
    def all_priced(self) -> bool:
        """Every drafting sequence was priced by adaptive K (so the round's draft time teaches the cost)."""
        return all(p.source is not None for p in self.sequences if p.drafts)


def plan_round(states: Sequence[SequenceState], settings: PlanSettings, policy: AdaptiveK | None,
               shape_stats: Callable[[str], ShapeStats], batch: int) -> RoundPlan:
    """Each sequence's shape: adaptive (the allocation with the most expected tokens per second of
    the whole round at this batch size: chains of K, trees grown from each source's acceptance by
    depth and rank, PaSS chains as long as the measured acceptance per look-ahead position pays),
    the request's K, or the configured K; then cut to the tokens it may still emit and its room."""
    adaptive = [s for s in states if s.adaptive and s.requested_k is None]
    shapes: dict[int, Shape] = {}
    prices: dict[int, float] = {}
    after: dict[int, ProbeSchedule | None] = {}
    per_token = 0.0
    if adaptive and settings.has_drafter:
        assert policy is not None, "adaptive sequences need the policy"
        free = settings.free_sources
        per_token = policy.cost.draft_token_s(sum(s.source not in free for s in adaptive))
        # PaSS: a draft costs no draft step but its accept point's look-ahead block, L verified tokens
        lookahead_s = settings.lookahead * policy.cost.at_batch(batch).token_s()
        prices = {s.seq_id: 0.0 if s.source in free else lookahead_s if s.source == settings.lookahead_source
                  else per_token for s in adaptive}
        alphas = [s.alpha for s in adaptive]
        # the policy counts rounds on copies: the snapshot stays as it was, the plan carries the new ones
        probes = [copy(s.probes) for s in adaptive] if all(s.probes is not None for s in adaptive) else None
        after = dict(zip((s.seq_id for s in adaptive), probes or [None] * len(adaptive)))
        draft_s = [prices[s.seq_id] for s in adaptive]
        if settings.tree_nodes or settings.lookahead:
            nodes, branch = (settings.tree_nodes, settings.tree_branch) if settings.tree_nodes else (
                settings.max_draft_tokens, 1)
            grown = policy.next_trees(alphas, [shape_stats(s.source) for s in adaptive], probes, draft_s, nodes, branch)
        else:
            grown = [default_shape(k) for k in policy.next_ks(alphas, probes, draft_s)]
        shapes = dict(zip((s.seq_id for s in adaptive), grown))
    out = tuple(SequencePlan(s.seq_id, _shape(s, settings, shapes.get(s.seq_id, ())),
                             s.source if s.seq_id in shapes else None, prices.get(s.seq_id, 0.0),
                             after.get(s.seq_id)) for s in states)
    return RoundPlan(out, per_token)


def _shape(s: SequenceState, settings: PlanSettings, adaptive: Shape) -> Shape:
    """The sequence's shape before the cut (adaptive, the request's K or the configured K), cut to
    what it may still emit and the context's room."""
    if not settings.has_drafter:
        return ()
    if s.requested_k is not None:
        shape = default_shape(s.requested_k, settings.tree_nodes, settings.tree_branch)
    elif s.adaptive:
        shape = adaptive
    else:
        shape = default_shape(int(settings.num_draft_tokens), settings.tree_nodes, settings.tree_branch)
    depth, room = s.remaining - 1, s.room
    # PaSS drafts at most L, each accept point with a block (fixed-K sequences too: their source is None)
    if settings.lookahead and s.source in (None, settings.lookahead_source):
        depth = min(depth, settings.lookahead)
        room = (room - settings.lookahead) // (1 + settings.lookahead)
    return cut_shape(shape, max(0, depth), max(0, room - 1))
