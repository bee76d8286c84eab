"""Training a draft head on target features, the target frozen (EAGLE-1's objective).

At each position t of a window the head reads (x_{t+1}, f_t) and predicts f_{t+1}: the loss is a
smooth L1 regression onto the target's f_{t+1} plus `ce_weight` x the cross-entropy of the head's q
(over its vocabulary) against the target's p = softmax(W f_{t+1}) there. Input features get
uniform noise (relative to their scale) so the head tolerates its own predicted features when
drafting further. Held-out windows report the loss, greedy agreement at depth 1 (the head's
argmax equals the target's over the full vocabulary) and sum_x min(p, q) at T = 1 (the
expected acceptance of one sampled draft).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from ..runtime.head import DraftHead
from .loop import TrainingLog, autocast, fit, mean_over, split


@dataclass(frozen=True)
class HeadTraining:
    vocab: int = 8192  # output ids: the most frequent in the training windows
    steps: int = 2000
    batch: int = 8  # windows a step
    lr: float = 1e-3
    warmup: int = 100
    ce_weight: float = 0.1
    noise: float = 0.1  # uniform input noise, relative to the features' RMS
    eval_every: int = 250
    eval_windows: int = 64
    seed: int = 0
    precision: str = "auto"  # matmuls in bfloat16 (float32 weights and optimizer) where dtype auto picks it
    intermediate: int = 0  # the head's MLP width; 0: the target's (a narrower head for a large target)


def frequent_ids(tokens: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """The n most frequent ids of the training tokens (all ids when n >= vocab_size), sorted."""
    if n >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.bincount(tokens.reshape(-1).long(), minlength=vocab_size)
    return counts.topk(n).indices.sort().values


def _objective(head: DraftHead, tokens: torch.Tensor, features: torch.Tensor, cfg: HeadTraining,
               noise: float, output_full: torch.Tensor | None = None) -> dict:
    """tokens [B, L], features [B, L, d] -> losses over positions 0..L-2 (and metrics when output_full)."""
    f_in, f_next = features[:, :-1].float(), features[:, 1:].float()
    if noise:
        f_in = f_in + (torch.rand_like(f_in) * 2 - 1) * noise
    out = head(input_ids=tokens[:, 1:].long().to(f_in.device), features=f_in.to(head.fc.weight.dtype))
    predicted = out.hidden_states[-1].float()  # [B, L-1, d]
    regression = F.smooth_l1_loss(predicted, f_next)
    rows = head.output_rows.float()
    log_q = torch.log_softmax(predicted @ rows.T, dim=-1)
    p_vocab = torch.softmax(f_next @ rows.T, dim=-1)  # the target's p, within the head's vocabulary
    ce = -(p_vocab * log_q).sum(-1).mean()
    result = {"loss": regression + cfg.ce_weight * ce, "regression": regression, "ce": ce}
    if output_full is not None:  # metrics against the target's full distribution
        p = torch.softmax(f_next @ output_full.float().T, dim=-1)  # [B, L-1, V]
        q = torch.zeros_like(p).index_copy_(-1, head.vocab, log_q.exp())
        result["agreement"] = (head.vocab[log_q.argmax(-1)] == p.argmax(-1)).float().mean()
        result["expected_acceptance"] = torch.minimum(p, q).sum(-1).mean()
    return result


def train_head(target: torch.nn.Module, data: dict, cfg: HeadTraining, out_path: str | None = None,
               progress: bool = True, intermediate_size: int | None = None) -> tuple[DraftHead, TrainingLog]:
    """Trains a head on a features file's data (see training.features); checkpoints to out_path."""
    torch.manual_seed(cfg.seed)
    tokens, features = data["tokens"], data["features"]
    train_idx, eval_idx = split(data["held_out"], cfg.eval_windows)
    vocab = frequent_ids(tokens[train_idx], cfg.vocab, int(target.config.vocab_size))
    head = DraftHead(target, vocab, intermediate_size or cfg.intermediate or None).float()
    output_full = target.get_output_embeddings().weight.detach()
    device = output_full.device
    noise = cfg.noise * features[train_idx[:64]].float().pow(2).mean().sqrt().item()

    def loss(pick: torch.Tensor) -> torch.Tensor:
        with autocast(cfg.precision, device):
            return _objective(head, tokens[pick], features[pick].to(device), cfg, noise)["loss"]

    def evaluate() -> dict:
        return mean_over(len(eval_idx), 2, lambda s: _objective(
            head, tokens[eval_idx[s]], features[eval_idx[s]].to(device), cfg, 0.0, output_full))

    checkpoint = (lambda step: head.save(out_path + ".ckpt", {"step": step, "training": asdict(cfg)})) if out_path else None
    log = fit(head, loss, evaluate, train_idx, cfg, checkpoint, "train head", progress)
    if out_path:
        head.save(out_path, {"training": asdict(cfg), "log": asdict(log)})
    return head, log
