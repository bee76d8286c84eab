"""Batched modified rejection sampling (Chen et al. 2023, Algorithm 2), over a ragged batch.

Sequence i drafted K_i tokens x_1..x_K from q and the target scored them, giving K_i + 1 rows of p.
- accepted tokens: x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)), left to right,
  until the first rejection;
- recovered token: at the first rejection j, one token from norm(max(0, p_j - q_j));
- bonus token: when all K_i are accepted, one token from p_{K_i+1}.
Each sequence therefore emits num_accepted + 1 tokens. K_i = 0 is plain sampling from p_1.
Greedy sequences (temperature 0, p one-hot) accept exactly the drafts equal to the target's
argmax and consume no randomness. Each sequence draws from its own generator, K_i uniforms
first and then one token, so a sequence gets the same output alone or in any batch.
Drafters without a distribution (n-gram) pass draft_probs=None: q is one-hot on x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .sample import sample_token


@dataclass(frozen=True)
class RejectionOutput:
    token_ids: torch.Tensor  # [B, max_K + 1] int64, -1 after each sequence's emitted tokens
    num_accepted: torch.Tensor  # [B] accepted draft tokens; sequence i emits num_accepted[i] + 1

    def tokens(self, i: int) -> list[int]:
        return self.token_ids[i, : int(self.num_accepted[i]) + 1].tolist()


def acceptance_probs(p_x: torch.Tensor, q_x: torch.Tensor | None) -> torch.Tensor:
    """min(1, p(x) / q(x)) for each draft token; p_x, q_x [T]. q_x None means q(x) = 1."""
    if q_x is None:
        return p_x.clamp(max=1.0)
    assert bool((q_x > 0).all()), "a draft token had q(x) = 0: the drafter did not sample from q"
    return (p_x / q_x).clamp(max=1.0)


def recovered_probs(p: torch.Tensor, q: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) per row; p, q [R, V], x [R] the rejected draft tokens.

    q None is one-hot on x. Where the residual has no mass (p == q up to rounding, so a
    rejection had probability ~0), p itself is returned.
    """
    if q is None:
        residual = p.scatter(1, x.unsqueeze(1), 0.0)
    else:
        residual = (p - q).clamp(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)


def rejection_sample(
    target_probs: torch.Tensor,  # [T + B, V] p, K_i + 1 rows per sequence
    draft_token_ids: torch.Tensor,  # [T] int64, K_i per sequence
    draft_probs: torch.Tensor | None,  # [T, V] q, or None for one-hot drafts
    num_draft_tokens: Sequence[int],  # [B] K_i
    greedy: Sequence[bool],  # [B]
    generators: Sequence[torch.Generator | None],  # [B]
) -> RejectionOutput:
    batch = len(num_draft_tokens)
    k = torch.tensor(num_draft_tokens, dtype=torch.long)  # [B]
    total = int(k.sum())
    assert target_probs.shape[0] == total + batch and draft_token_ids.shape == (total,)
    assert draft_probs is None or draft_probs.shape == (total, target_probs.shape[1])
    draft_offset = torch.cumsum(k, 0) - k  # [B]
    seq_of_draft = torch.repeat_interleave(torch.arange(batch), k)  # [T]
    target_row_of_draft = torch.arange(total) + seq_of_draft  # [T]
    bonus_row = draft_offset + torch.arange(batch) + k  # [B]

    p_x = target_probs[target_row_of_draft, draft_token_ids]  # [T]
    q_x = None if draft_probs is None else draft_probs[torch.arange(total), draft_token_ids]
    accept_prob = acceptance_probs(p_x, q_x)  # [T]

    # Greedy: u = 0 accepts exactly the drafts with p(x) = 1, the target's argmax.
    uniforms = torch.zeros(total)
    for i in range(batch):
        if not greedy[i] and num_draft_tokens[i]:
            start = int(draft_offset[i])
            uniforms[start : start + num_draft_tokens[i]] = torch.rand(num_draft_tokens[i], generator=generators[i])
    accepted = uniforms < accept_prob  # [T]

    max_k = int(k.max()) if batch else 0
    pos_in_seq = torch.arange(total) - draft_offset[seq_of_draft]  # [T]
    accepted_pad = torch.zeros(batch, max_k, dtype=torch.long)
    accepted_pad[seq_of_draft, pos_in_seq] = accepted.long()
    num_accepted = accepted_pad.cumprod(dim=1).sum(dim=1)  # [B]

    # The final distribution: residual at the first rejection, else the bonus row.
    rejected = num_accepted < k  # [B]
    final_probs = target_probs[bonus_row]  # [B, V], a copy (advanced indexing)
    if rejected.any():
        seqs = rejected.nonzero().squeeze(1)
        rows = draft_offset[seqs] + num_accepted[seqs]
        q_rows = None if draft_probs is None else draft_probs[rows]
        final_probs[seqs] = recovered_probs(target_probs[target_row_of_draft[rows]], q_rows, draft_token_ids[rows])

    token_ids = torch.full((batch, max_k + 1), -1, dtype=torch.long)
    kept = accepted_pad.cumprod(dim=1).bool()[seq_of_draft, pos_in_seq]  # [T] before the first rejection
    token_ids[seq_of_draft[kept], pos_in_seq[kept]] = draft_token_ids[kept]
    for i in range(batch):
        n = int(num_accepted[i])
        if greedy[i]:
            token_ids[i, n] = int(final_probs[i].argmax())
        else:
            token_ids[i, n] = sample_token(final_probs[i], generators[i])
    return RejectionOutput(token_ids=token_ids, num_accepted=num_accepted)
