"""PaSS look-ahead embeddings (Monea, Joulin and Grave 2023): L learned input vectors [LA]_1..[LA]_L.

Appended after a prefix x_1..x_t, the target's output at [LA]_i predicts x_{t+1+i}: one forward
both scores the next token (at x_t) and drafts L more. They enter through the input embedding:
ids V .. V + L - 1 (V the target's vocabulary size) stand for [LA]_1..[LA]_L, so every model,
cache and tensor-parallel shard works unchanged (DeepSpeed AutoTP shards the layers, not the
embedding lookup). A file holds the vectors and a description of the target they were trained for.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .head import load_trained_file, target_signature

LOOKAHEAD_FORMAT = 1
TRAINING_ATTENTION = "specserve_lookahead"


class LookaheadEmbeddings(nn.Module):
    """[L, d] vectors; the only parameters PaSS trains."""

    def __init__(self, count: int, hidden_size: int, signature: dict, meta: dict | None = None):
        super().__init__()
        if count < 1:
            raise ValueError(f"draft.pass.lookahead must be at least 1, got {count}")
        self.vectors = nn.Parameter(torch.zeros(count, hidden_size))
        self.signature = signature
        self.meta = meta or {}  # what training reported (per_position: held-out agreement per look-ahead position)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def agreement(self) -> list[float] | None:
        """Training's held-out greedy agreement per look-ahead position, where it reported it."""
        return self.meta.get("per_position", {}).get("agreement")

    @property
    def prior_alpha(self) -> float | None:
        return float(self.agreement[0]) if self.agreement else None

    def first(self, count: int) -> "LookaheadEmbeddings":
        """The first `count` vectors ([LA]_i drafts i + 1 tokens ahead whatever L is)."""
        meta = dict(self.meta)
        if "per_position" in meta:
            meta["per_position"] = {k: v[:count] for k, v in meta["per_position"].items()}
        la = LookaheadEmbeddings(count, self.vectors.shape[1], self.signature, meta)
        with torch.no_grad():
            la.vectors.copy_(self.vectors[:count])
        return la

    @classmethod
    def initial(cls, target: nn.Module, count: int, seed: int = 0) -> "LookaheadEmbeddings":
        """Distinct starting vectors: the mean token embedding plus a little noise each."""
        embed = target.get_input_embeddings().weight.detach().float()
        la = cls(count, embed.shape[1], target_signature(target))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            la.vectors.copy_(embed.mean(0) + 0.5 * embed.std() * torch.randn(count, embed.shape[1], generator=gen))
        return la

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": LOOKAHEAD_FORMAT, "signature": self.signature,
                    "vectors": self.vectors.detach().float().cpu(), "meta": meta or {}}, path)

    @classmethod
    def load(cls, path: str | Path, signature: dict) -> "LookaheadEmbeddings":
        """Saved vectors for the target described by `signature` (head.target_signature; without
        output_checksum, as for a sharded target, sizes only); a clear error names what does not match."""
        data = load_trained_file(path, "draft.pass.embeddings", "look-ahead file", LOOKAHEAD_FORMAT, signature)
        got = data["signature"]
        vectors = data["vectors"]
        la = cls(vectors.shape[0], vectors.shape[1], got, data.get("meta", {}))
        with torch.no_grad():
            la.vectors.copy_(vectors)
        return la


class LookaheadInput(nn.Module):
    """The target's input embedding, with ids vocab_size + i mapped to [LA]_{i+1}."""

    def __init__(self, base: nn.Module, vectors: torch.Tensor, vocab_size: int):
        super().__init__()
        self.base = base
        self.vocab_size = vocab_size
        self.register_buffer("vectors", vectors.detach().clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # what tied output layers and callers of get_input_embeddings read
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.vocab_size - 1))
        extra = ids >= self.vocab_size  # no host sync: a select, not a branch
        picked = self.vectors[(ids - self.vocab_size).clamp(0, len(self.vectors) - 1)].to(out.dtype)
        return torch.where(extra.unsqueeze(-1), picked, out)


def install(model: nn.Module, la: LookaheadEmbeddings | torch.Tensor) -> list[int]:
    """Lets `model` read look-ahead ids (vectors [L, d] on its device and dtype); returns them.
    Installing again replaces the vectors."""
    vectors = la.vectors if isinstance(la, LookaheadEmbeddings) else la
    embed = model.get_input_embeddings()
    base = embed.base if isinstance(embed, LookaheadInput) else embed
    vocab = int(model.config.vocab_size)
    weight = base.weight
    model.set_input_embeddings(LookaheadInput(base, vectors.to(weight.device, weight.dtype), vocab))
    return lookahead_ids(vocab, len(vectors))


def lookahead_ids(vocab_size: int, count: int) -> list[int]:
    return list(range(vocab_size, vocab_size + count))


def training_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, lookahead_mask=None, **kwargs):
    """Attention for training: every query sees what lookahead_mask ([B, 1, T, T] bool) allows."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=lookahead_mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2), None  # [B, T, H, D]


@contextmanager
def training_attention_on(model: nn.Module):
    """The model attends through training_attention for the duration."""
    from transformers import AttentionInterface

    AttentionInterface.register(TRAINING_ATTENTION, training_attention)
    configs = list({id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")}.values())
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = TRAINING_ATTENTION
    try:
        yield
    finally:
        for c, implementation in zip(configs, saved):
            c._attn_implementation = implementation


def uninstall(model: nn.Module) -> None:
    """Gives `model` back its own input embedding."""
    embed = model.get_input_embeddings()
    if isinstance(embed, LookaheadInput):
        model.set_input_embeddings(embed.base)
