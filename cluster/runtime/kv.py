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

    @torch.inference_mode()
    def forward_batch(self, caches: list, inputs: list[list[int]], raw: bool = False,
                      argmax_only: list[bool] | None = None) -> list[torch.Tensor]:
        """Appends inputs[i] to caches[i] for every sequence in one padded forward pass.

        Past keys/values are left-padded to the longest cache and new tokens right-padded; a
        padding mask hides both and position ids count real tokens only, so each row sees exactly
        what its own forward would. Returns logits [len(inputs[i]), V] per sequence (float32 on
        the CPU; raw=True keeps the model's dtype and device). argmax_only is a hint for remote
        targets (greedy rows need only their argmax); in process every row is returned whole."""
        if len(caches) == 1:
            ids = torch.tensor([inputs[0]], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids, past_key_values=caches[0], use_cache=True).logits[0]
            return [logits if raw else logits.float().cpu()]
        from transformers import DynamicCache

        lens = [self.cached_length(c) for c in caches]
        past, n, b = max(lens), max(len(x) for x in inputs), len(inputs)
        ids = torch.zeros(b, n, dtype=torch.long)
        mask = torch.zeros(b, past + n, dtype=torch.long)
        for i, (length, x) in enumerate(zip(lens, inputs)):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, past - length : past + len(x)] = 1
        positions = torch.tensor(lens).unsqueeze(1) + torch.arange(n)
        batch = DynamicCache()
        if past:
            ref = caches[lens.index(past)]
            for layer, like in enumerate(ref.layers):
                keys, values = [], []
                for c, length in zip(caches, lens):
                    keys.append(_left_pad(c.layers[layer].keys if length else None, like.keys, past))
                    values.append(_left_pad(c.layers[layer].values if length else None, like.values, past))
                batch.update(torch.cat(keys), torch.cat(values), layer)
        out = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device), past_key_values=batch, use_cache=True,
        )
        for i, (c, length, x) in enumerate(zip(caches, lens, inputs)):
            keep = slice(past - length, past + len(x))
            for layer, kv in enumerate(batch.layers):
                k, v = kv.keys[i : i + 1, :, keep], kv.values[i : i + 1, :, keep]
                if layer < len(c.layers) and c.layers[layer].is_initialized:
                    c.layers[layer].keys, c.layers[layer].values = k, v
                else:
                    c.update(k, v, layer)
        logits = out.logits if raw else out.logits.float().cpu()
        return [logits[i, : len(x)] for i, x in enumerate(inputs)]

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


def _left_pad(kv: torch.Tensor | None, like: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's [1, heads, t, dim] cache (None: empty) zero-padded on the left to length."""
    t = 0 if kv is None else kv.shape[2]
    pad = like.new_zeros(1, like.shape[1], length - t, like.shape[3])
    return pad if kv is None else torch.cat([pad, kv], dim=2)
