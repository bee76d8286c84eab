"""Training PaSS look-ahead embeddings with the target frozen.

One forward trains many positions at once: a window x_0..x_{n-1} is followed by one block of L
look-ahead tokens per anchor a (anchors spread over the window), block a's [LA]_i (i = 1..L) at
position a + i, seeing x_0..x_a and its own block's [LA]_1..[LA]_{i-1} only. [LA]_i after x_a
drafts x_{a+1+i}; its loss is the cross-entropy against the target's own distribution for that
token (the real row at x_{a+i}, from the same forward: distillation, so q learns p, which is what
acceptance rewards), or against the token itself (`objective: "tokens"`). Only the L vectors get
gradients. Held-out windows report, per look-ahead position, greedy agreement (argmax q equals
argmax p) and sum_x min(p, q) (the expected acceptance of one sampled draft at T = 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from ..runtime.lookahead import LookaheadEmbeddings, training_attention_on
from .loop import TrainingLog, autocast, fit, mean_over, split


@dataclass(frozen=True)
class LookaheadTraining:
    lookahead: int = 4  # L
    steps: int = 400
    batch: int = 4  # windows a step
    anchors: int = 32  # look-ahead blocks a window
    lr: float = 1e-2
    warmup: int = 20
    objective: str = "distill"  # distill: against the target's p; tokens: against the corpus token
    eval_every: int = 100
    eval_windows: int = 16
    seed: int = 0
    precision: str = "auto"


def layout(n: int, anchors: list[int], count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [n + A*L] and the attention mask [n + A*L, n + A*L] (bool) of a window of n
    tokens followed by one block of `count` look-ahead tokens per anchor."""
    total = n + len(anchors) * count
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    positions = list(range(n))
    for b, a in enumerate(anchors):
        lo = n + b * count
        for i in range(count):
            mask[lo + i, : a + 1] = True
            mask[lo + i, lo : lo + i + 1] = True
            positions.append(a + 1 + i)
    return torch.tensor(positions, device=device), mask.to(device)


def _anchors(n: int, count: int, anchors: int, gen: torch.Generator | None) -> list[int]:
    """Anchor positions whose first look-ahead target lies in the window (a + 2 < n)."""
    last = n - 3
    if last < 0:
        raise ValueError(f"a window of {n} tokens is too short to train look-ahead tokens")
    if gen is None:  # evaluation: evenly spread
        return sorted({round(j * last / max(1, anchors - 1)) for j in range(anchors)})
    picks = torch.randperm(last + 1, generator=gen)[: anchors]
    return sorted(picks.tolist())


def lookahead_forward(target: torch.nn.Module, la: LookaheadEmbeddings, tokens: torch.Tensor,
                      anchors: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """One training forward over windows tokens [B, n] with a look-ahead block after each anchor:
    the look-ahead rows' logits [B, R, V], the target's rows for the same tokens [B, R, V]
    (detached), and per row the label's index in the window and the look-ahead position (0-based).
    Rows go anchor by anchor, position by position, where the label lies in the window."""
    b, n = tokens.shape
    count = len(la)
    device = la.vectors.device
    x = target.get_input_embeddings()(tokens.to(device))  # [B, n, d]
    blocks = la.vectors.to(x.dtype)[None, None].expand(b, len(anchors), count, -1).reshape(b, -1, x.shape[-1])
    positions, mask = layout(n, anchors, count, device)
    la_rows, real_rows, labels, slot = [], [], [], []
    for j, a in enumerate(anchors):  # [LA]_i (i = 1..L) after x_a drafts x_{a+1+i}; p for it: the real row at x_{a+i}
        for i in range(1, count + 1):
            if a + 1 + i < n:
                la_rows.append(n + j * count + i - 1)
                real_rows.append(a + i)
                labels.append(a + 1 + i)
                slot.append(i - 1)
    rows = torch.tensor(la_rows + real_rows, dtype=torch.long, device=device)
    with training_attention_on(target):
        out = target(inputs_embeds=torch.cat((x, blocks), dim=1), position_ids=positions[None].expand(b, -1),
                     lookahead_mask=mask[None, None].expand(b, 1, -1, -1), use_cache=False, logits_to_keep=rows)
    logits = out.logits.float()  # [B, 2R, V]
    r = len(la_rows)
    return logits[:, :r], logits[:, r:].detach(), labels, slot


def _objective(target: torch.nn.Module, la: LookaheadEmbeddings, tokens: torch.Tensor, anchors: list[int],
               objective: str, metrics: bool = False) -> dict:
    """tokens [B, n] -> the loss over every look-ahead row whose label lies in the window (and
    per-position metrics)."""
    device = la.vectors.device
    q_logits, p_logits, labels, slot = lookahead_forward(target, la, tokens, anchors)
    count = len(la)
    log_q = torch.log_softmax(q_logits, dim=-1)
    if objective == "distill":
        loss = -(torch.softmax(p_logits, dim=-1) * log_q).sum(-1).mean()
    else:
        loss = F.nll_loss(log_q.reshape(-1, log_q.shape[-1]), tokens[:, labels].reshape(-1).to(device))
    result = {"loss": loss}
    if metrics:
        p = torch.softmax(p_logits, dim=-1)
        agree = (q_logits.argmax(-1) == p_logits.argmax(-1)).float()  # [B, R]
        overlap = torch.minimum(p, log_q.exp()).sum(-1)  # [B, R]
        which = torch.tensor(slot, device=device)
        result["agreement"] = agree.mean()
        result["expected_acceptance"] = overlap.mean()
        for i in range(count):
            at = which == i
            result[f"agreement_{i + 1}"] = agree[:, at].mean()
            result[f"expected_acceptance_{i + 1}"] = overlap[:, at].mean()
    return result


def train_lookahead(target: torch.nn.Module, tokens: torch.Tensor, held_out: torch.Tensor, cfg: LookaheadTraining,
                    out_path: str | None = None, progress: bool = True) -> tuple[LookaheadEmbeddings, TrainingLog, dict]:
    """Trains L look-ahead vectors on windows tokens [N, n] (held_out [N] bool marks the held-out
    ones); the target is frozen. Returns them, the log and the last held-out metrics per position."""
    if cfg.objective not in ("distill", "tokens"):
        raise ValueError(f"objective must be distill or tokens, got {cfg.objective!r}")
    torch.manual_seed(cfg.seed)
    for p in target.parameters():
        p.requires_grad_(False)
    device = target.get_output_embeddings().weight.device
    la = LookaheadEmbeddings.initial(target, cfg.lookahead, cfg.seed).to(device)
    train_idx, eval_idx = split(held_out, cfg.eval_windows)
    n = tokens.shape[1]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    fixed = _anchors(n, cfg.lookahead, cfg.anchors, None)
    last: dict = {}

    def loss(pick: torch.Tensor) -> torch.Tensor:
        with autocast(cfg.precision, device):
            return _objective(target, la, tokens[pick], _anchors(n, cfg.lookahead, cfg.anchors, gen), cfg.objective)["loss"]

    def evaluate() -> dict:
        with autocast(cfg.precision, device):
            metrics = mean_over(len(eval_idx), 2, lambda s: _objective(target, la, tokens[eval_idx[s]], fixed,
                                                                        cfg.objective, metrics=True))
        last.clear()
        last.update(metrics)
        return metrics

    checkpoint = (lambda step: la.save(out_path + ".ckpt", {"step": step, "training": asdict(cfg)})) if out_path else None
    log = fit(la, loss, evaluate, train_idx, cfg, checkpoint, "train look-ahead", progress)
    per_position = {
        "agreement": [round(last[f"agreement_{i + 1}"], 4) for i in range(cfg.lookahead)],
        "expected_acceptance": [round(last[f"expected_acceptance_{i + 1}"], 4) for i in range(cfg.lookahead)],
    }
    if out_path:
        la.save(out_path, {"training": asdict(cfg), "log": asdict(log), "per_position": per_position})
    return la, log, per_position
