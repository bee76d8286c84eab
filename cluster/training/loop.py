"""The training loop that every draft trainer shares: AdamW over the trainable parameters, linear
warm-up then cosine decay, gradient clipping, random training windows a step, held-out metrics
every `eval_every` steps (and before the first), a checkpoint at each evaluation, a progress bar,
and a plot of the log."""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm


@dataclass
class TrainingLog:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)  # greedy, depth 1
    expected_acceptance: list[float] = field(default_factory=list)  # sum min(p, q) at T = 1
    seconds: float = 0.0


def autocast(precision: str, device: torch.device):
    """Matmuls in bfloat16 (weights and optimizer stay float32) where dtype auto would pick it."""
    from ..runtime.models import choose_dtype

    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    chosen = choose_dtype("auto", device) if precision == "auto" else precision
    return torch.autocast(device.type, dtype=torch.bfloat16) if chosen == "bfloat16" else nullcontext()


def split(held_out: torch.Tensor, eval_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training windows and of (at most eval_windows) held-out ones."""
    train_idx, eval_idx = (~held_out).nonzero()[:, 0], held_out.nonzero()[:, 0][:eval_windows]
    if not len(train_idx) or not len(eval_idx):
        raise ValueError("the features need training and held-out windows (a larger corpus)")
    return train_idx, eval_idx


def fit(module: torch.nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], evaluate: Callable[[], dict],
        train_idx: torch.Tensor, cfg, checkpoint: Callable[[int], None] | None, desc: str,
        progress: bool = True) -> TrainingLog:
    """Trains module's parameters that require grad. loss(window indices) -> scalar; evaluate() ->
    {loss, agreement, expected_acceptance} on the held-out windows. cfg has steps, batch, lr,
    warmup, eval_every and seed."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    log, start = TrainingLog(), time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)

    def record(step: int) -> dict:
        was_training = module.training
        module.eval()
        with torch.no_grad():
            metrics = evaluate()
        module.train(was_training)
        log.eval_steps.append(step)
        log.eval_loss.append(metrics["loss"])
        log.agreement.append(metrics["agreement"])
        log.expected_acceptance.append(metrics["expected_acceptance"])
        return metrics

    module.train()
    record(0)  # untrained, for comparison
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, file=sys.stderr)
    for step in bar:
        value = loss(train_idx[torch.randint(len(train_idx), (cfg.batch,), generator=gen)])
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.steps.append(step)
        log.train_loss.append(value.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            metrics = record(step + 1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", agree=f"{metrics['agreement']:.3f}")
            if checkpoint is not None:
                checkpoint(step + 1)
    log.seconds = time.perf_counter() - start
    module.eval()
    return log


def mean_over(batches: int, batch: int, metrics: Callable[[slice], dict]) -> dict[str, float]:
    """Window-weighted means of metrics(slice of windows) over `batches` windows, `batch` at a time."""
    totals: dict[str, float] = {}
    for lo in range(0, batches, batch):
        part = slice(lo, min(lo + batch, batches))
        for k, v in metrics(part).items():
            totals[k] = totals.get(k, 0.0) + float(v) * (part.stop - part.start)
    return {k: v / batches for k, v in totals.items()}


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
