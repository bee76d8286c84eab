"""Training a standalone draft model (`specserve train-draft model`), the target frozen.

The draft is the target's own architecture cut to `layers` decoder layers, started from evenly
spaced layers of the target, with the target's embedding, final norm and output layer (embedding
and output layer frozen). It is distilled on the features file: at every position t of a window
KL(p || q) of its q from the target's p = softmax(W f_t) over the whole vocabulary.
Held-out windows report the loss, greedy agreement (argmax q = argmax p) and sum_x min(p, q) at
T = 1. Unlike a head it needs nothing of the target when it drafts, so it runs on draft replicas:
the output is a Hugging Face folder (drafter `trained`, draft.trained.path).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..runtime.head import target_signature
from ..runtime.models import DRAFT_META, layer_subset
from .loop import TrainingLog, autocast, fit, mean_over, split

@dataclass(frozen=True)
class ModelTraining:
    layers: int = 2  # decoder layers of the draft
    steps: int = 2000
    batch: int = 4  # windows a step
    lr: float = 5e-4
    warmup: int = 100
    eval_every: int = 250
    eval_windows: int = 32
    seed: int = 0
    precision: str = "auto"  # matmuls in bfloat16 (float32 weights and optimizer) where dtype auto picks it


def draft_from_target(target: torch.nn.Module, layers: int) -> torch.nn.Module:
    """A float32 copy of the target with `layers` of its decoder layers, evenly spaced (first and
    last kept); embedding and output layer frozen."""
    n = target.config.num_hidden_layers
    if not 1 <= layers <= n:
        raise ValueError(f"layers must be in [1, {n}] for this target, got {layers}")
    picks = sorted({round(i * (n - 1) / max(layers - 1, 1)) for i in range(layers)})
    draft = layer_subset(target, picks).float()
    for module in (draft.get_input_embeddings(), draft.get_output_embeddings()):
        module.weight.requires_grad_(False)
    return draft


def _objective(draft: torch.nn.Module, tokens: torch.Tensor, features: torch.Tensor, output: torch.Tensor,
               metrics: bool = False) -> dict:
    """tokens [B, L], features [B, L, d] (the target's f_t) -> KL(p || q) over all L positions."""
    log_q = torch.log_softmax(draft(input_ids=tokens.long()).logits.float(), dim=-1)  # [B, L, V]
    log_p = torch.log_softmax(features.float() @ output.T, dim=-1)
    p = log_p.exp()
    result = {"loss": (p * (log_p - log_q)).sum(-1).mean()}  # KL(p || q): the cross-entropy less p's entropy
    if metrics:
        result["agreement"] = (log_q.argmax(-1) == p.argmax(-1)).float().mean()
        result["expected_acceptance"] = torch.minimum(p, log_q.exp()).sum(-1).mean()
    return result


def save_draft(draft: torch.nn.Module, target: torch.nn.Module, tokenizer, path: str | Path, meta: dict) -> None:
    """A Hugging Face folder (weights in the target's dtype), the target's tokenizer when it has a
    Hugging Face one, and DRAFT_META naming the target it was trained for."""
    path = Path(path)
    dtype = target.get_output_embeddings().weight.dtype
    draft.to(dtype).save_pretrained(path)
    draft.float()
    if hasattr(tokenizer, "save"):  # a Hugging Face tokenizer (the tiny models' byte tokenizer has no files)
        tokenizer.save(path)
    (path / DRAFT_META).write_text(json.dumps({"signature": target_signature(target), **meta}, indent=1))


def train_model(target: torch.nn.Module, tokenizer, data: dict, cfg: ModelTraining, out_path: str | None = None,
                progress: bool = True) -> tuple[torch.nn.Module, TrainingLog]:
    """Distils a draft model from a features file's data (see training.features); checkpoints to out_path."""
    torch.manual_seed(cfg.seed)
    tokens, features = data["tokens"], data["features"]
    train_idx, eval_idx = split(data["held_out"], cfg.eval_windows)
    draft = draft_from_target(target, cfg.layers)
    output = target.get_output_embeddings().weight.detach().float()
    device = output.device

    def loss(pick: torch.Tensor) -> torch.Tensor:
        with autocast(cfg.precision, device):
            return _objective(draft, tokens[pick].to(device), features[pick].to(device), output)["loss"]

    def evaluate() -> dict:
        return mean_over(len(eval_idx), 2, lambda s: _objective(
            draft, tokens[eval_idx[s]].to(device), features[eval_idx[s]].to(device), output, metrics=True))

    def checkpoint(step: int) -> None:
        save_draft(draft, target, tokenizer, out_path + ".ckpt", {"step": step, "training": asdict(cfg)})

    log = fit(draft, loss, evaluate, train_idx, cfg, checkpoint if out_path else None, "train draft model", progress)
    if out_path:
        save_draft(draft, target, tokenizer, out_path, {"training": asdict(cfg), "log": asdict(log)})
    return draft, log
