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

import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.nn import functional as F
from tqdm import tqdm

from ..runtime.head import DraftHead


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


@dataclass
class TrainingLog:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)  # greedy, depth 1
    expected_acceptance: list[float] = field(default_factory=list)  # sum min(p, q) at T = 1
    seconds: float = 0.0


def frequent_ids(tokens: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """The n most frequent ids of the training tokens (all ids when n >= vocab_size), sorted."""
    if n >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.bincount(tokens.reshape(-1).long(), minlength=vocab_size)
    return counts.topk(n).indices.sort().values


def _autocast(precision: str, device: torch.device):
    from contextlib import nullcontext

    from ..runtime.models import choose_dtype

    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    chosen = choose_dtype("auto", device) if precision == "auto" else precision
    return torch.autocast(device.type, dtype=torch.bfloat16) if chosen == "bfloat16" else nullcontext()


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
    tokens, features, held_out = data["tokens"], data["features"], data["held_out"]
    train_idx, eval_idx = (~held_out).nonzero()[:, 0], held_out.nonzero()[:, 0][: cfg.eval_windows]
    if not len(train_idx) or not len(eval_idx):
        raise ValueError("the features need training and held-out windows (a larger corpus)")
    vocab = frequent_ids(tokens[train_idx], cfg.vocab, int(target.config.vocab_size))
    head = DraftHead(target, vocab, intermediate_size).float().train()
    output_full = target.get_output_embeddings().weight.detach()
    scale = features[train_idx[:64]].float().pow(2).mean().sqrt().item()
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    log, start = TrainingLog(), time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)

    def record(step: int) -> dict:
        metrics = evaluate(head, tokens[eval_idx], features[eval_idx], cfg, output_full)
        log.eval_steps.append(step)
        log.eval_loss.append(metrics["loss"])
        log.agreement.append(metrics["agreement"])
        log.expected_acceptance.append(metrics["expected_acceptance"])
        return metrics

    record(0)  # the untrained head, for comparison
    bar = tqdm(range(cfg.steps), desc="train head", disable=not progress, file=sys.stderr)
    for step in bar:
        pick = train_idx[torch.randint(len(train_idx), (cfg.batch,), generator=gen)]
        with _autocast(cfg.precision, output_full.device):
            result = _objective(head, tokens[pick], features[pick].to(output_full.device), cfg, cfg.noise * scale)
        opt.zero_grad(set_to_none=True)
        result["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.steps.append(step)
        log.train_loss.append(result["loss"].item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            metrics = record(step + 1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", agree=f"{metrics['agreement']:.3f}")
            if out_path:
                head.save(out_path + ".ckpt", {"step": step + 1, "training": asdict(cfg)})
    log.seconds = time.perf_counter() - start
    head.eval()
    if out_path:
        head.save(out_path, {"training": asdict(cfg), "log": asdict(log)})
    return head, log


@torch.no_grad()
def evaluate(head: DraftHead, tokens: torch.Tensor, features: torch.Tensor, cfg: HeadTraining,
             output_full: torch.Tensor, batch: int = 2) -> dict[str, float]:
    was_training = head.training
    head.eval()
    totals = {"loss": 0.0, "agreement": 0.0, "expected_acceptance": 0.0}
    n = 0
    for lo in range(0, len(tokens), batch):
        r = _objective(head, tokens[lo : lo + batch], features[lo : lo + batch].to(output_full.device), cfg, 0.0,
                       output_full)
        w = len(tokens[lo : lo + batch])
        for k in totals:
            totals[k] += float(r[k]) * w
        n += w
    head.train(was_training)
    return {k: v / n for k, v in totals.items()}


def plot(log: TrainingLog, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(log.steps, log.train_loss, alpha=0.4, label="train")
    a.plot(log.eval_steps, log.eval_loss, marker="o", label="held out")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.legend()
    b.plot(log.eval_steps, log.agreement, marker="o", label="greedy agreement (depth 1)")
    b.plot(log.eval_steps, log.expected_acceptance, marker="o", label="sum min(p, q), T = 1")
    b.set_xlabel("step")
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
