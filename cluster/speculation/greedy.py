"""Greedy acceptance from the target's argmax alone: no vocabulary-sized row is needed.

At temperature 0, p is one-hot on the target's argmax, so modified rejection sampling accepts
exactly the drafts equal to the argmax, left to right; the token after them (recovered or
bonus) is the argmax at that position. rejection_sample with greedy rows gives the same result
from one-hot p (tests/test_core_exact.py checks they agree).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .rejection import RejectionOutput


def greedy_accept(
    target_argmax: torch.Tensor,  # [T + B] int64, K_i + 1 rows per sequence
    draft_token_ids: torch.Tensor,  # [T] int64, K_i per sequence
    num_draft_tokens: Sequence[int],  # [B] K_i
) -> RejectionOutput:
    batch = len(num_draft_tokens)
    k = torch.tensor(num_draft_tokens, dtype=torch.long)  # [B]
    total = int(k.sum())
    assert target_argmax.shape == (total + batch,) and draft_token_ids.shape == (total,)
    max_k = int(k.max()) if batch else 0
    row_start = torch.cumsum(k + 1, 0) - (k + 1)  # [B] each sequence's first target row
    seq_of_draft = torch.repeat_interleave(torch.arange(batch), k)  # [T]
    pos_in_seq = torch.arange(total) - (torch.cumsum(k, 0) - k)[seq_of_draft]  # [T]
    matches = torch.zeros(batch, max_k, dtype=torch.long)
    matches[seq_of_draft, pos_in_seq] = (draft_token_ids == target_argmax[row_start[seq_of_draft] + pos_in_seq]).long()
    num_accepted = matches.cumprod(dim=1).sum(dim=1)  # [B]
    rows = row_start.unsqueeze(1) + torch.arange(max_k + 1)  # [B, max_K + 1]
    valid = torch.arange(max_k + 1).unsqueeze(0) <= num_accepted.unsqueeze(1)
    token_ids = torch.where(valid, target_argmax[rows.clamp(max=total + batch - 1)], -1)
    return RejectionOutput(token_ids=token_ids, num_accepted=num_accepted)
