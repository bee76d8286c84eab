"""Measured step costs: what a draft token and a target call over a block cost, per batch size,
refined by the rounds themselves; what adaptive K (adaptive.py) and tree shapes (shape.py) price with."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class CostModel:
    """Measured step costs. verify_s[k]: one target call over k + 1 tokens for one sequence;
    batch_verify_s[b][k]: one call verifying b sequences' blocks of k + 1 tokens each."""

    draft_step_s: float  # one draft token for one sequence
    verify_s: tuple[float, ...]
    batch_verify_s: dict[int, tuple[float, ...]] = field(default_factory=dict)
    draft_parallelism: int = 1  # sequences drafted at once (draft replicas)
    draft_batch_s: dict[int, float] = field(default_factory=dict)  # one draft token for each of b sequences, drafted together

    def draft_token_s(self, n: int) -> float:
        """One draft token's cost when n sequences draft in a round: a batched drafter's measured
        cost at n (interpolated between measured sizes, extrapolated past the largest) over n;
        else one step spread over draft_parallelism drafters."""
        if not self.draft_batch_s or n <= 1:
            return self.draft_step_s / self.draft_parallelism
        table = {1: self.draft_step_s} | self.draft_batch_s
        sizes = sorted(table)
        lo = max(size for size in sizes if size <= n)
        hi = min([size for size in sizes if size > n], default=None)
        floor = table[lo]  # more sequences never cost less
        if hi is None:
            lo, hi = sizes[-2], sizes[-1]
        total = table[lo] + (n - lo) * (table[hi] - table[lo]) / (hi - lo)
        return max(total, floor) / n

    @property
    def max_k(self) -> int:
        return len(self.verify_s) - 1

    def token_s(self) -> float:
        """One more verified token's cost for one sequence: the verify table's mean slope."""
        return (self.verify_s[-1] - self.verify_s[0]) / self.max_k if self.max_k else self.verify_s[0]

    def round_s(self, k: int) -> float:
        return k * self.draft_step_s + self.verify_s[k]

    def observed(self, b: int, tokens: int, seconds: float, weight: float = 0.3, shape_weight: float = 0.05) -> CostModel:
        """The model after a real verify call over b sequences and `tokens` tokens in all took
        `seconds`. The row of the nearest measured batch size moves by the ratio of `seconds` to
        what the model predicted for this very round, clipped to [1/2, 2] and taken in log space:
        the whole row by ratio^(weight - shape_weight) (contention and longer contexts raise every
        entry alike) and the entries at the round's tokens per sequence by ratio^weight (an entry
        that calibration got wrong is set right where rounds use it); then the row is made
        nondecreasing by pooling adjacent entries that violate it. The clip, the log and the pooling
        keep one stall (a descheduled thread, a kernel built on first use) from moving a row more
        than 23%, and noise from drifting its shape: x2 and x1/2 cancel (docs/design.md, "Learning costs").
        Calibration uses one context length; real contexts are longer and ragged, and what they
        cost is learned from the rounds themselves."""
        n = tokens / b if b >= 1 else 0.0
        if not 1 <= n <= self.max_k + 1 or seconds <= 0:
            return self
        table = {1: self.verify_s} | self.batch_verify_s
        bucket = 2 ** round(math.log2(b))
        if bucket >= 2 * max(table):  # far past what calibration measured: learn that size's own row,
            extrapolated = tuple(t * bucket for t in self.at_batch(bucket).verify_s)  # the start
            return replace(self, batch_verify_s=self.batch_verify_s | {bucket: extrapolated}).observed(
                b, tokens, seconds, weight, shape_weight)
        predicted = round_cost_s(self, b, tokens)
        if predicted <= 0:
            return self
        ratio, at = _clipped(seconds / predicted), n - 1
        ref = min(table, key=lambda size: (abs(size - b), size))
        row = _nondecreasing([t * ratio ** (weight if abs(j - at) < 1 else weight - shape_weight)
                              for j, t in enumerate(table[ref])])  # more tokens never cost less
        if ref == 1:
            return replace(self, verify_s=tuple(row))
        return replace(self, batch_verify_s=self.batch_verify_s | {ref: tuple(row)})

    def observed_draft(self, predicted_s: float, seconds: float, weight: float = 0.3) -> CostModel:
        """The model after a round's drafts, priced at predicted_s by this model, took `seconds`:
        every draft cost moves by ratio^weight, the ratio clipped to [1/2, 2] (as `observed`), so
        that one stall moves it by 23% at most. Without it a draft cost calibrated too high would
        keep K at 0 for good, and nothing would ever correct it."""
        if predicted_s <= 0 or seconds <= 0:
            return self
        return self.scaled_draft(_clipped(seconds / predicted_s) ** weight)

    def scaled_draft(self, scale: float) -> CostModel:
        """Every draft cost times `scale`."""
        return replace(self, draft_step_s=self.draft_step_s * scale,
                       draft_batch_s={b: t * scale for b, t in self.draft_batch_s.items()})

    def at_batch(self, b: int) -> CostModel:
        """Per-sequence costs when b sequences share each round, all with the same K: a round's
        verify time divided by b (interpolated linearly in b between measured batch sizes,
        extrapolated past the largest), drafts spread over draft_parallelism drafters."""
        if b <= 1:
            return self
        table = {1: self.verify_s} | self.batch_verify_s
        sizes = sorted(table)
        lo = max([s for s in sizes if s <= b], default=sizes[0])
        hi = min([s for s in sizes if s > b], default=None)
        if hi is None:  # past the largest: continue the last segment's slope
            lo, hi = (sizes[-2], sizes[-1]) if len(sizes) > 1 else (lo, lo)
        w = (b - lo) / (hi - lo) if hi != lo else 0.0
        floor = table[sizes[-1]] if b > sizes[-1] else (0.0,) * len(self.verify_s)  # more load never costs less
        verify = tuple(max(a + w * (c - a), f) / b for a, c, f in zip(table[lo], table[hi], floor))
        draft = self.draft_step_s * math.ceil(b / self.draft_parallelism) / b
        return CostModel(draft, verify)


def _clipped(ratio: float) -> float:
    """An observed / predicted cost ratio as the models learn it: within [1/2, 2]."""
    return min(2.0, max(0.5, ratio))


def _nondecreasing(row: list[float]) -> list[float]:
    """The nearest nondecreasing row in log space (pool adjacent violators): an entry above the
    next is averaged with it, not copied onward, so noise in one entry cannot ratchet the rest up."""
    pools: list[list[float]] = []  # [sum of logs, count]
    for t in row:
        pools.append([math.log(max(t, 1e-12)), 1])
        while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
            total, count = pools.pop()
            pools[-1][0] += total
            pools[-1][1] += count
    return [math.exp(total / count) for total, count in pools for _ in range(count)]


def round_cost_s(cost: CostModel, batch: int, tokens: float) -> float:
    """One flattened round of `batch` sequences verifying `tokens` tokens in all (batch..batch*(max_k+1)):
    the batch's verify table read at tokens / batch per sequence, linear in between."""
    return verify_cost(cost.at_batch(batch).verify_s, batch, tokens)


def verify_cost(per_seq: tuple[float, ...], batch: int, tokens: float) -> float:
    """A round of `batch` sequences verifying `tokens` tokens in all, from a per-sequence table
    (per_seq[j]: j + 1 tokens each): linear in between, the last slope past the table's end."""
    n = max(tokens / batch, 1.0) - 1  # drafts per sequence, fractional
    if n > len(per_seq) - 1 and len(per_seq) > 1:  # wider than the table (a tree): its last slope on
        return batch * (per_seq[-1] + (n - len(per_seq) + 1) * (per_seq[-1] - per_seq[-2]))
    n = min(n, len(per_seq) - 1)
    lo = int(n)
    hi = min(lo + 1, len(per_seq) - 1)
    return batch * (per_seq[lo] + (n - lo) * (per_seq[hi] - per_seq[lo]))
