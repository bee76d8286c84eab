"""Teacher-forced target features over a corpus: windows of tokens and the target's last hidden
states at every position (what its output layer reads), extracted by batched prefill.

A features file holds tokens [N, L] (int32), features [N, L, d] (the target's dtype), which
windows are held out, and the target's signature; the target's distribution at any position is
its output layer applied to the feature there, so no probabilities are stored.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..runtime.head import target_signature

HELD_OUT_EVERY = 20  # every 20th corpus record is held out


@dataclass(frozen=True)
class Windows:
    tokens: torch.Tensor  # [N, L] int64
    held_out: torch.Tensor  # [N] bool


def cut_windows(records: list[dict], length: int, max_tokens: int | None = None) -> Windows:
    """Each side (training, held-out) is one stream of its records' ids cut into windows of
    `length`; held-out records are every HELD_OUT_EVERY-th. A remainder shorter than a window is dropped."""
    streams: dict[bool, list[int]] = {False: [], True: []}
    for i, record in enumerate(records):
        streams[i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1] += record["ids"]
    if max_tokens is not None:
        held = max(length, max_tokens // HELD_OUT_EVERY)
        streams = {False: streams[False][: max_tokens - held], True: streams[True][:held]}
    rows, held_out = [], []
    for side, ids in streams.items():
        n = len(ids) // length
        if n:
            rows.append(torch.tensor(ids[: n * length]).view(n, length))
            held_out += [side] * n
    if not rows:
        raise ValueError(f"the corpus holds fewer than {length} tokens: nothing to train on")
    held_out = torch.tensor(held_out)
    if not held_out.any() and len(held_out) > 1:  # too few records to hold one out: hold out the last windows
        held_out[-max(1, len(held_out) // HELD_OUT_EVERY) :] = True
    return Windows(torch.cat(rows), held_out)


@torch.inference_mode()
def extract_features(model: torch.nn.Module, windows: Windows, batch: int = 8, progress: bool = True) -> dict:
    """The target's last hidden states at every position of every window, batch windows a forward."""
    device = next(model.parameters()).device
    out = []
    bar = tqdm(total=windows.tokens.numel(), desc="target features", unit="tok", disable=not progress, file=sys.stderr)
    for lo in range(0, len(windows.tokens), batch):
        ids = windows.tokens[lo : lo + batch].to(device)
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1).hidden_states[-1]
        out.append(hidden.cpu())
        bar.update(ids.numel())
    bar.close()
    return {"tokens": windows.tokens.to(torch.int32), "features": torch.cat(out), "held_out": windows.held_out,
            "signature": target_signature(model)}
