"""Batched modified rejection sampling (Chen et al. 2023, Algorithm 2), over a ragged batch.

Sequence i drafted K_i tokens x_1..x_K from q and the target scored them, giving K_i + 1 rows of p.
- accepted tokens: x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)), left to right,
  until the first rejection;
- recovered token: at the first rejection j, one token from norm(max(0, p_j - q_j));
- bonus token: when all K_i are accepted, one token from p_{K_i+1}.
Each sequence therefore emits num_accepted + 1 tokens. K_i = 0 is plain sampling from p_1.
Greedy sequences (temperature 0, p one-hot) accept exactly the drafts equal to the target's
argmax and consume no randomness. Each sampled sequence draws K_i + 1 uniforms from its own
generator in one call (u_1..u_K for the tests, u_{K+1} for the final token by sample_rows), so a
sequence gets the same output alone or in any batch.
Drafters without a distribution (n-gram) pass draft_probs=None: q is one-hot on x.

Everything stays on the input device with no host reads; RejectionOutput.to_host reads the
round's result in one transfer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .host import HostTransfers, read, to_device
from .sample import draw_uniforms, sample_rows

Q_ZERO = "a draft token had q(x) = 0: the drafter did not sample from q"


@dataclass(frozen=True)
class RejectionOutput:
    token_ids: torch.Tensor  # [B, max_K + 1] int64, -1 after each sequence's emitted tokens
    num_accepted: torch.Tensor  # [B] accepted draft tokens; sequence i emits num_accepted[i] + 1
    invalid: torch.Tensor | None = None  # [] bool: some tested draft had q(x) = 0 (checked when read)

    def tokens(self, i: int) -> list[int]:
        """Sequence i's tokens (reads the device; to_host reads all sequences at once)."""
        if self.invalid is not None:
            assert not bool(self.invalid), Q_ZERO
        return self.token_ids[i, : int(self.num_accepted[i]) + 1].tolist()

    def to_host(self, host: HostTransfers | None = None) -> tuple[list[list[int]], list[int]]:
        """(each sequence's emitted tokens, each num_accepted), in one transfer."""
        batch, width = self.token_ids.shape
        parts = [self.token_ids.reshape(-1), self.num_accepted.to(self.token_ids.dtype)]
        if self.invalid is not None:
            parts.append(self.invalid.to(self.token_ids.dtype).reshape(1))
        flat = read(torch.cat(parts), host)
        assert self.invalid is None or not flat[-1], Q_ZERO
        counts = flat[batch * width : batch * width + batch]
        return [flat[i * width : i * width + n + 1] for i, n in enumerate(counts)], counts


def acceptance_probs(p_x: torch.Tensor, q_x: torch.Tensor | None) -> torch.Tensor:
    """min(1, p(x) / q(x)) for each draft token; p_x, q_x [T]. q_x None means q(x) = 1.

    q(x) = 0 (a draft not drawn from q) gives 1 here; rejection_sample reports it when read."""
    if q_x is None:
        return p_x.clamp(max=1.0)
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
    ks = [int(k) for k in num_draft_tokens]
    total = sum(ks)
    assert target_probs.shape[0] == total + batch and draft_token_ids.shape == (total,)
    assert draft_probs is None or draft_probs.shape == (total, target_probs.shape[1])
    device = target_probs.device
    max_k = max(ks, default=0)

    # The ragged layout, built on the host from K_i alone and sent in one copy.
    offset, draft_offset, seq_of_draft, pos_in_seq, sampled_rows = 0, [], [], [], []
    for i, (ki, g) in enumerate(zip(ks, greedy)):
        draft_offset.append(offset)
        seq_of_draft += [i] * ki
        pos_in_seq += range(ki)
        if not g:
            sampled_rows += range(offset + i, offset + i + ki + 1)
        offset += ki
    target_row_of_draft = [j + i for j, i in enumerate(seq_of_draft)]  # [T]
    bonus_row = [o + i + ki for i, (o, ki) in enumerate(zip(draft_offset, ks))]  # [B]
    layout = to_device(torch.tensor(ks + draft_offset + seq_of_draft + pos_in_seq + target_row_of_draft + bonus_row
                                    + [int(bool(g)) for g in greedy] + sampled_rows, dtype=torch.long), device)
    (k, draft_offset, seq_of_draft, pos_in_seq, target_row_of_draft, bonus_row, is_greedy,
     sampled_rows) = layout.split([batch] * 2 + [total] * 3 + [batch] * 2 + [len(sampled_rows)])

    # u [T + B] aligned with the target rows: K_i tests then the final token's. Greedy: u = 0
    # accepts exactly the drafts with p(x) = 1, the target's argmax.
    u = torch.zeros(total + batch, device=device)
    drawn = draw_uniforms([0 if g else ki + 1 for ki, g in zip(ks, greedy)], generators, device)
    u = u.index_put((sampled_rows,), drawn)

    draft_token_ids = to_device(draft_token_ids, device)
    draft_probs = None if draft_probs is None else to_device(draft_probs, device)
    p_x = target_probs[target_row_of_draft, draft_token_ids]  # [T]
    q_x = None if draft_probs is None else draft_probs[torch.arange(total, device=device), draft_token_ids]
    accept_prob = acceptance_probs(p_x, q_x)  # [T]
    accepted = u[target_row_of_draft] < accept_prob  # [T]
    invalid = None if q_x is None else (q_x <= 0).any()

    accepted_pad = torch.zeros(batch, max_k, dtype=torch.long, device=device)
    accepted_pad[seq_of_draft, pos_in_seq] = accepted.long()
    num_accepted = accepted_pad.cumprod(dim=1).sum(dim=1)  # [B]

    # The final distribution: residual at the first rejection, else the bonus row.
    final_probs = target_probs[bonus_row]  # [B, V]
    if total:
        rows = (draft_offset + num_accepted).clamp(max=total - 1)  # [B] the first rejected draft, where one was
        q_rows = None if draft_probs is None else draft_probs[rows]
        recovered = recovered_probs(target_probs[target_row_of_draft[rows]], q_rows, draft_token_ids[rows])
        final_probs = torch.where((num_accepted < k).unsqueeze(1), recovered, final_probs)
    final = torch.where(is_greedy.bool(), final_probs.argmax(dim=-1), sample_rows(final_probs, u[bonus_row]))  # [B]

    col = torch.arange(max_k + 1, device=device).unsqueeze(0)  # [1, max_K + 1]
    drafts = torch.full((batch, max_k + 1), -1, dtype=torch.long, device=device)
    drafts[seq_of_draft, pos_in_seq] = draft_token_ids
    n = num_accepted.unsqueeze(1)
    token_ids = torch.where(col < n, drafts, torch.where(col == n, final.unsqueeze(1), -1))
    return RejectionOutput(token_ids=token_ids, num_accepted=num_accepted, invalid=invalid)
