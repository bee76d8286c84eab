"""Choosing the draft length K from the acceptance rate alpha and measured step costs.

With per-token acceptance alpha, a round with K drafts yields in expectation
(1 - alpha^(K+1)) / (1 - alpha) tokens (Chen et al. 2023; Leviathan et al. 2023) and costs
K draft steps plus one target call over K + 1 tokens. K is the argmax of tokens per second;
K = 0 (plain decoding) wins whenever speculation would cost more than it saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .costs import CostModel, round_cost_s, verify_cost
from .shape import best_trees, tree_table

__all__ = ["AcceptanceTracker", "AdaptiveK", "CostModel", "ProbeSchedule", "best_k", "best_ks", "expected_tokens",
           "mean_expected_tokens", "round_cost_s", "verify_cost"]  # CostModel and its readers re-exported from costs


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens per target call with K drafts of acceptance alpha."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_k(alpha: float | Sequence[float], cost: CostModel, max_k: int | None = None, min_gain: float = 0.0) -> int:
    """The K in [0, max_k] with the most expected tokens per second (ties go to the smaller K);
    0 unless that beats plain decoding by min_gain (a fraction). Given several sequences'
    alphas, the one K for all of them: the most tokens per round."""
    alphas = [alpha] if isinstance(alpha, (int, float)) else list(alpha)
    top = cost.max_k if max_k is None else min(max_k, cost.max_k)
    rates = [sum(expected_tokens(a, k) for a in alphas) / len(alphas) / cost.round_s(k) for k in range(top + 1)]
    k = max(range(top + 1), key=lambda k: (rates[k], -k))
    return k if rates[k] > rates[0] * (1 + min_gain) else 0


def best_ks(alphas: Sequence[float], cost: CostModel, max_k: int | None = None, min_gain: float = 0.0,
            draft_s: Sequence[float] | None = None) -> list[int]:
    """One K per sequence for a flattened round, where nothing is padded: a round costs what its
    total token count costs at this batch size, plus the drafting. The chain case of
    shape.best_trees (one child a node, c(d, 0) = alpha_i, so the K_i-th draft's reach is
    alpha_i^K_i): draft tokens go one at a time to the sequence with the most expected tokens per
    unit of cost, for as long as the round's expected tokens per second rises; low-alpha sequences
    stay at K = 0. All stay at 0 unless the round beats plain decoding by min_gain (a fraction).
    draft_s: each sequence's cost of one draft token (a drafter with several sources, such as
    free lookup beside a model); default: cost.draft_token_s(b) for all."""
    top = max(0, cost.max_k if max_k is None else min(max_k, cost.max_k))
    chains = best_trees([[[a]] * top for a in alphas], cost, top, top, 1, min_gain, draft_s)
    return [len(chain) for chain in chains]


@dataclass
class AcceptanceTracker:
    """Running estimate of alpha for one sequence.

    Counts are the evaluated draft tokens: each round contributes its accepted tokens and, if it
    stopped early, one rejection (the maximum-likelihood estimate under the formula's i.i.d.
    model). Counts decay so that alpha follows the text; a prior keeps new sequences sane.
    """

    prior_alpha: float = 0.5
    prior_weight: float = 2.0
    decay: float = 0.9
    accepted: float = 0.0
    evaluated: float = 0.0

    @property
    def alpha(self) -> float:
        return (self.accepted + self.prior_alpha * self.prior_weight) / (self.evaluated + self.prior_weight)

    def update(self, num_drafted: int, num_accepted: int) -> None:
        if num_drafted == 0:
            return
        self.accepted = self.decay * self.accepted + num_accepted
        self.evaluated = self.decay * self.evaluated + num_accepted + (num_accepted < num_drafted)


@dataclass
class ProbeSchedule:
    """When a sequence that sits at K = 0 drafts once more (at K = 0 nothing new is learned about
    alpha): after `after` rounds at 0, then after twice as many each time; a round that chose
    K > 0 resets it. One per sequence, so what a sequence drafts never depends on what ran before."""

    after: int = 16
    _rounds_at_zero: int = 0
    _interval: int = 0

    def count(self, k: int) -> None:
        """A round whose chosen K was k."""
        if k > 0:
            self._rounds_at_zero, self._interval = 0, 0
        else:
            self._rounds_at_zero += 1

    @property
    def due(self) -> bool:
        return self._rounds_at_zero >= (self._interval or self.after)

    def probed(self) -> None:
        self._rounds_at_zero, self._interval = 0, (self._interval or self.after) * 2

    def due_after(self, k: int) -> bool:
        """count(k), then probed() and True if a probe is due."""
        self.count(k)
        if not self.due:
            return False
        self.probed()
        return True


@dataclass
class AdaptiveK:
    """Per-sequence K policy: best_k on the tracker's alpha, with probes when it sits at K = 0.

    At K = 0 nothing new is learned about alpha, so after `probe_after` rounds at 0 one round
    drafts best_k(alpha + optimism) tokens; the interval doubles after each probe. No probe is
    made when even the optimistic alpha would not pay for drafting (a draft as slow as the target).
    Drafting has to beat plain decoding by min_gain in the model's own prediction: the model errs
    by about that much (matmul costs step with the row count, blocks are ragged), and where the
    gain is smaller than the error, speculating risks running slower than the model it serves.
    """

    cost: CostModel
    max_k: int
    tracker: AcceptanceTracker = field(default_factory=AcceptanceTracker)
    probe_after: int = 16
    optimism: float = 0.25
    min_gain: float = 0.1  # speculate only where the model predicts 10% over plain: its own error is about that
    probes: ProbeSchedule | None = None  # next_k's, and next_ks's when given no schedules (probe_after)

    def __post_init__(self):
        if self.probes is None:
            self.probes = ProbeSchedule(self.probe_after)

    def new_schedule(self) -> ProbeSchedule:
        return ProbeSchedule(self.probe_after)

    def next_k(self, batch: int = 1, alphas: Sequence[float] | None = None) -> int:
        """K for the next round, when `batch` sequences share it (verification stops being free
        as the batch grows: the per-sequence cost of K drafts rises, and K falls, down to 0).
        `alphas`: the sequences that take this K (default: this policy's own tracker)."""
        alpha = [self.tracker.alpha] if alphas is None else list(alphas)
        cost = self.cost.at_batch(batch)
        k = best_k(alpha, cost, self.max_k, self.min_gain)
        if not self.probes.due_after(k):
            return k
        return best_k([min(0.99, a + self.optimism) for a in alpha], cost, self.max_k, self.min_gain)

    def next_ks(self, alphas: Sequence[float], schedules: Sequence[ProbeSchedule] | None = None,
                draft_s: Sequence[float] | None = None) -> list[int]:
        """One K per sequence of a flattened round (best_ks; draft_s as there). With a schedule per sequence, each
        sequence probes on its own (optimistic alpha for it alone), at most one a round (the first
        due; the others stay due), so probes cost one sequence's drafts however large the batch;
        without, the policy's one schedule probes for all when every K sits at 0."""
        ks = best_ks(alphas, self.cost, self.max_k, self.min_gain, draft_s)
        probing = self._probing(ks, schedules)
        if not probing:
            return ks
        probed = best_ks(self._optimistic(alphas, probing), self.cost, self.max_k, self.min_gain, draft_s)
        return [probed[i] if i in probing else k for i, k in enumerate(ks)]

    def next_trees(self, alphas: Sequence[float], stats: Sequence, schedules: Sequence[ProbeSchedule] | None = None,
                   draft_s: Sequence[float] | None = None, max_nodes: int = 8, max_branch: int = 2) -> list[tuple[int, ...]]:
        """next_ks for trees: one shape per sequence (shape.best_trees) from each sequence's alpha
        and its source's acceptance by depth and rank (stats[i], a shape.ShapeStats), probes as there."""

        def shapes(alphas_: Sequence[float]) -> list[tuple[int, ...]]:
            tables = [tree_table(st, a) for st, a in zip(stats, alphas_)]
            return best_trees(tables, self.cost, self.max_k, max_nodes, max_branch, self.min_gain, draft_s)

        chosen = shapes(alphas)
        probing = self._probing([len(s) for s in chosen], schedules)
        if not probing:
            return chosen
        probed = shapes(self._optimistic(alphas, probing))
        return [probed[i] if i in probing else s for i, s in enumerate(chosen)]

    def _probing(self, sizes: Sequence[int], schedules: Sequence[ProbeSchedule] | None) -> set[int]:
        """The sequences that probe this round, given each one's chosen draft size."""
        if not sizes:
            return set()
        if schedules is None:
            return set(range(len(sizes))) if self.probes.due_after(max(sizes)) else set()
        for n, schedule in zip(sizes, schedules):
            schedule.count(n)
        first = next((i for i, schedule in enumerate(schedules) if schedule.due), None)
        if first is None:
            return set()
        schedules[first].probed()
        return {first}

    def _optimistic(self, alphas: Sequence[float], probing: set[int]) -> list[float]:
        return [min(0.99, a + self.optimism) if i in probing else a for i, a in enumerate(alphas)]

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        self.tracker.update(num_drafted, num_accepted)


def mean_expected_tokens(alpha: float, ks: Sequence[int]) -> float:
    """The formula's expectation averaged over the K actually used in each round."""
    return sum(expected_tokens(alpha, k) for k in ks) / len(ks) if ks else 0.0
