"""Drafter `pass` (PaSS): the target drafts for itself, in the round's one forward.

Each block it returns asks the verifier to append look-ahead tokens [LA]_1..[LA]_n (n = K + 1,
at most L; runtime/lookahead.py) after every point where acceptance may stop: after the uncached token and after each draft, each
look-ahead block seeing the committed prefix, the drafts up to its point and its own earlier
look-ahead tokens (the round's per-sequence tree mask). The round's acceptance stops at one point;
that block's rows are the next round's drafts (after_round): for greedy requests their argmax ids,
for sampled ones tokens drawn from the warped look-ahead distribution, which is the q sent to
rejection sampling. Look-ahead positions are dropped from the KV store with the rejected drafts.
The first round of a sequence has nothing to draft yet: it only appends a block.
"""

from __future__ import annotations

import torch

from ..speculation import make_generator, warp_probs
from ..speculation.sample import sample_rows, uniforms
from ..speculation.round import DraftBlock, DraftRequest, DrafterCapabilities, RoundResult, TargetOutput
from .drafters import Drafter


class PassDrafter(Drafter):
    name = "pass"

    def __init__(self, lookahead_ids: list[int], prior_alpha: float | None = None,
                 prior_by_depth: list[float] | None = None):
        if not lookahead_ids:
            raise ValueError("draft.pass.lookahead must be at least 1")
        self.lookahead_ids = list(lookahead_ids)  # the input ids of [LA]_1..[LA]_L
        self.capabilities = DrafterCapabilities(
            lookahead=len(self.lookahead_ids), lookahead_source="pass", prior_alpha=prior_alpha,
            prior_by_depth=None if prior_by_depth is None else tuple(prior_by_depth), observes_rounds=True)
        self._rows: dict[int, tuple[int, torch.Tensor]] = {}  # seq_id -> (context length, [L] ids or [L, V] logits)

    def source(self, seq_id: int, context: list[int]) -> str:
        return "pass"

    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        """The blocks from the rows kept at each sequence's accept point, decided where those rows
        are (the target's device): greedy rows are argmax ids, sampled ones are warped and drawn by
        inverse CDF from the request's seed; all token ids reach the host in one read."""
        kept = [self._rows_for(r) for r in requests]
        ids, probs = [], []
        for r, (_, rows) in zip(requests, kept):
            if rows is None:
                ids.append(None)
                probs.append(None)
            elif rows.dim() == 1:  # greedy: the look-ahead argmax ids
                ids.append(rows)
                probs.append(None)
            else:
                q = warp_probs(rows, [r.params] * len(rows))  # [k, V]
                ids.append(sample_rows(q, uniforms(len(q), make_generator(r.seed), q.device)))
                probs.append(q)
        drawn = [x for x in ids if x is not None]
        tokens = iter(torch.cat(drawn).tolist() if drawn else [])
        return [DraftBlock([next(tokens) for _ in range(len(x))] if x is not None else [], q, lookahead=count)
                for (count, _), x, q in zip(kept, ids, probs)]

    def _rows_for(self, r: DraftRequest) -> tuple[int, torch.Tensor | None]:
        """(the look-ahead count its block asks for, the kept rows that draft it: [k] ids or [k, V] logits)."""
        if r.k <= 0:
            return 0, None
        # blocks as long as the next round may draft: one more than this round's K (so K can grow),
        # at most L ([LA]_1..[LA]_n of a shorter block are exactly those of a longer one: causal)
        count = min(len(self.lookahead_ids), r.k + 1)
        at, rows = self._rows.pop(r.seq_id, (None, None))
        if at != len(r.context):  # none yet, or drafted for another point (another drafter drafted since)
            return count, None
        return count, rows[: r.k]

    def after_round(self, result: RoundResult) -> None:
        """Keeps the look-ahead rows at the point where this round's acceptance stopped ([L] argmax
        ids or [L, V] logits): they draft what follows the sequence's first context_length tokens."""
        if result.lookahead is not None:
            self._rows[result.seq_id] = (result.context_length, result.lookahead)

    def release(self, seq_id: int) -> None:
        self._rows.pop(seq_id, None)


# -- the round's layout and policy for PaSS blocks (the engine asks these) ------------------------
def lookahead_ids(block: DraftBlock, vocab_size: int) -> list[int]:
    """The look-ahead tokens a block asks for: [LA]_1..[LA]_n (ids V..V+n-1) after each of its
    K + 1 accept points."""
    if not block.lookahead:
        return []
    return list(range(vocab_size, vocab_size + block.lookahead)) * (len(block) + 1)


def lookahead_layout(head: int, k: int, count: int) -> list[int]:
    """The verify input's parents (kv.attention_mask): the `head` uncached tokens and k drafts as a
    chain, then `count` look-ahead tokens after each of the k + 1 accept points (the head's last
    token, each draft), each block a chain of its own."""
    out = list(range(-1, head + k - 1))
    for j in range(k + 1):
        start = len(out)
        out += [head - 1 + j] + list(range(start, start + count - 1))
    return out


def split_lookahead(out: TargetOutput, k: int, count: int) -> TargetOutput:
    """The verify rows [k + 1] and the look-ahead rows, [k + 1, count] per accept point."""
    rows = out.scores[k + 1 :]
    return TargetOutput(out.scores[: k + 1], out.hidden, rows.view(k + 1, count, *rows.shape[1:]))


def fused_pays(per_seq: tuple[float, ...], blocks: list[DraftBlock], alphas: list[float]) -> bool:
    """Fused or alternating: a round that verifies K drafts and appends a look-ahead block of n
    after each of its K + 1 accept points (one call yields 1 + E tokens, E the expected accepted
    drafts), or, as in the paper, calls that only draft ([last] + one block: one token) alternating
    with calls that only verify (1 + E tokens). per_seq: the verify cost at this batch size
    (CostModel.at_batch(B).verify_s); blocks, alphas: the PaSS blocks with drafts and their alpha."""
    from ..speculation.adaptive import verify_cost

    k = sum(len(b) for b in blocks) / len(blocks)
    n = sum(b.lookahead for b in blocks) / len(blocks)
    gained = sum(sum(a ** i for i in range(1, len(b) + 1)) for a, b in zip(alphas, blocks)) / len(alphas)
    fused = (1 + gained) / verify_cost(per_seq, 1, 1 + k + (k + 1) * n)
    alternating = (2 + gained) / (verify_cost(per_seq, 1, 1 + n) + verify_cost(per_seq, 1, 1 + k))
    return fused >= alternating
