"""A Hugging Face causal LM with one KV cache per sequence, rolled back by cropping."""

from __future__ import annotations

import torch


class CausalLM:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters(), torch.empty(0)).device
        self.vocab_size = int(model.config.vocab_size)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    @torch.inference_mode()
    def forward(self, cache, input_ids: list[int], last_only: bool = False) -> torch.Tensor:
        """Appends input_ids to the cache; returns logits [n, V] (or [1, V]) float32 on the CPU."""
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1 if last_only else 0)
        return out.logits[0].float().cpu()

    @staticmethod
    def cached_length(cache) -> int:
        return cache.get_seq_length()

    @staticmethod
    def rollback(cache, n: int) -> None:
        """Drops the last n cached positions."""
        if n > 0:
            cache.crop(-n)

    @staticmethod
    def release(cache) -> None:
        """Frees a sequence's cache (here garbage collection does it)."""
