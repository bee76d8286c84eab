"""Greedy acceptance from the target's argmax alone: no vocabulary-sized row is needed.

At temperature 0, p is one-hot on the target's argmax, so modified rejection sampling accepts
exactly the drafts equal to the argmax, left to right; the token after them (recovered or
bonus) is the argmax at that position. rejection_sample with greedy rows gives the same result
from one-hot p (tests/test_core_exact.py checks they agree). On target_argmax's device with no
host reads: the output's to_host(host) reads the round in one transfer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .host import to_device
from .rejection import RejectionOutput


def greedy_accept(
    target_argmax: torch.Tensor,  # [T + B] int64, K_i + 1 rows per sequence
    draft_token_ids: torch.Tensor,  # [T] int64, K_i per sequence
    num_draft_tokens: Sequence[int],  # [B] K_i
) -> RejectionOutput:
    batch = len(num_draft_tokens)
    ks = [int(k) for k in num_draft_tokens]
    total = sum(ks)
    assert target_argmax.shape == (total + batch,) and draft_token_ids.shape == (total,)
    device = target_argmax.device
    max_k = max(ks, default=0)
    row_start, seq_of_draft, pos_in_seq, offset = [], [], [], 0  # host-side layout from K_i alone
    for i, ki in enumerate(ks):
        row_start.append(offset)
        seq_of_draft += [i] * ki
        pos_in_seq += range(ki)
        offset += ki + 1
    layout = to_device(torch.tensor(row_start + seq_of_draft + pos_in_seq, dtype=torch.long), device)
    row_start, seq_of_draft, pos_in_seq = layout.split([batch, total, total])
    draft_token_ids = to_device(draft_token_ids, device)
    matches = torch.zeros(batch, max_k, dtype=torch.long, device=device)
    matches[seq_of_draft, pos_in_seq] = (draft_token_ids == target_argmax[row_start[seq_of_draft] + pos_in_seq]).long()
    num_accepted = matches.cumprod(dim=1).sum(dim=1)  # [B]
    col = torch.arange(max_k + 1, device=device)
    rows = row_start.unsqueeze(1) + col  # [B, max_K + 1]
    valid = col.unsqueeze(0) <= num_accepted.unsqueeze(1)
    token_ids = torch.where(valid, target_argmax[rows.clamp(max=max(total + batch - 1, 0))], -1)
    return RejectionOutput(token_ids=token_ids, num_accepted=num_accepted)
