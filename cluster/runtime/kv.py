"""A Hugging Face causal LM over a KV store that persists across rounds, batched without copies.

Each sequence's keys and values live in one buffer of its own, [layers, 2, kv_heads, capacity,
head_dim], grown by doubling; its first `length` positions are valid. A rollback is a length
change, and keeping a subset of positions (the accepted path of a tree) is an in-place gather.

A round runs as one flattened forward: the new tokens of every sequence side by side ([1, T],
no padding), each with its own position id. An attention function registered with
transformers writes each sequence's new keys and values into its buffer and attends over that
buffer alone (its committed prefix, then its new tokens as a chain or a tree). The model keeps
its own weights and layers, so DeepSpeed AutoTP still shards them: each rank stores its heads.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

ATTENTION = "specserve_flat"
_GROWTH_ALIGN = 64  # capacity is a multiple of this many positions


class SequenceKV:
    """One sequence's keys and values for every layer; `length` positions are valid."""

    __slots__ = ("buffer", "length")

    def __init__(self):
        self.buffer: torch.Tensor | None = None  # [layers, 2, kv_heads, capacity, head_dim]
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.shape[3]

    def reserve(self, needed: int, layers: int, like: torch.Tensor) -> None:
        """Room for `needed` positions; `like` is a layer's new keys [1, kv_heads, n, head_dim]."""
        if needed <= self.capacity:
            return
        size = max(needed, 2 * self.capacity)
        size = -(-size // _GROWTH_ALIGN) * _GROWTH_ALIGN
        grown = like.new_empty(layers, 2, like.shape[1], size, like.shape[3])
        if self.length:
            grown[:, :, :, : self.length] = self.buffer[:, :, :, : self.length]
        self.buffer = grown

    @torch.inference_mode()
    def keep(self, positions: list[int]) -> None:
        """Keeps exactly these cached positions (increasing), moved to the front in order."""
        if any(b <= a for a, b in zip(positions, positions[1:])) or (positions and not 0 <= positions[0] <= positions[-1] < self.length):
            raise ValueError(f"positions must increase within [0, {self.length}), got {positions}")
        same = 0  # positions already in place need no move
        while same < len(positions) and positions[same] == same:
            same += 1
        if same < len(positions):
            index = torch.tensor(positions[same:], device=self.buffer.device)
            self.buffer[:, :, :, same : len(positions)] = self.buffer.index_select(3, index)
        self.length = len(positions)


@dataclass(frozen=True)
class FlatBatch:
    """The layout of one flattened forward: sequence i's new tokens are rows offsets[i]:offsets[i+1]."""

    caches: tuple[SequenceKV, ...]
    starts: tuple[int, ...]  # cached length of each sequence before this forward
    offsets: tuple[int, ...]  # [B + 1] row offsets into the flattened tokens
    masks: tuple[torch.Tensor | None, ...]  # [n_i, start_i + n_i] bool (True: attend); None: a chain of 1
    layers: int


def attention_mask(start: int, parents: list[int], device) -> torch.Tensor | None:
    """What each new token sees: the whole cached prefix, its ancestors and itself. parents[j] is
    the index of token j's parent among the new tokens (-1: the last cached token); a chain has
    parents j - 1. [n, start + n] bool, or None for a single token (it sees everything)."""
    n = len(parents)
    if n == 1:
        return None
    mask = torch.zeros(n, start + n, dtype=torch.bool)
    mask[:, :start] = True
    if parents == list(range(-1, n - 1)):  # a chain (verify blocks, prefill chunks): causal
        mask[:, start:] = torch.ones(n, n, dtype=torch.bool).tril()
        return mask.to(device)
    for j, parent in enumerate(parents):
        mask[j, start + j] = True
        if parent >= 0:
            mask[j, start : start + n] |= mask[parent, start : start + n]
    return mask.to(device)


def depths(parents: list[int]) -> list[int]:
    """Depth of each new token below the cached prefix (0 for a child of the last cached token)."""
    out = []
    for parent in parents:
        out.append(0 if parent < 0 else out[parent] + 1)
    return out


def flat_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, flat_batch=None, **kwargs):
    """query [1, H, T, D], key/value [1, H_kv, T, D] of one layer for the whole flattened batch.
    Writes each sequence's new keys/values at its positions, then attends within its buffer."""
    layer, b = module.layer_idx, flat_batch
    new_kv = torch.stack((key[0], value[0]))  # [2, H_kv, T, D]: one write per sequence below
    outs = []
    for cache, start, lo, hi, mask in zip(b.caches, b.starts, b.offsets, b.offsets[1:], b.masks):
        end = start + hi - lo
        if layer == 0:
            cache.reserve(end, b.layers, key)
        kv = cache.buffer[layer]  # [2, H_kv, capacity, D]
        kv[:, :, start:end] = new_kv[:, :, lo:hi]
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, lo:hi], kv[0, None, :, :end], kv[1, None, :, :end],
            attn_mask=mask, scale=scaling, enable_gqa=True,
        ))  # [1, H, n, D]
    return torch.cat(outs, dim=2).transpose(1, 2), None  # [1, T, H, D]


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, flat_attention)


class CausalLM:
    """A causal LM whose sequences each own a SequenceKV; every forward is one flattened batch."""

    def __init__(self, model: torch.nn.Module):
        _register()
        self.model = model
        self.device = next(model.parameters(), torch.empty(0)).device
        self.vocab_size = int(model.config.vocab_size)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.layers = int(model.config.num_hidden_layers)
        # every config the modules read their attention implementation from (copies may not share one)
        self._configs = list({id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")}.values())

    @staticmethod
    def new_cache() -> SequenceKV:
        return SequenceKV()

    def forward(self, cache: SequenceKV, input_ids: list[int], last_only: bool = False) -> torch.Tensor:
        """Appends input_ids to the cache; returns logits [n, V] (or [1, V]) float32 on the CPU."""
        return self.forward_batch([cache], [input_ids], last=[1] if last_only else None)[0]

    @torch.inference_mode()
    def forward_batch(self, caches: list[SequenceKV], inputs: list[list[int]], raw: bool = False,
                      argmax_only: list[bool] | None = None, last: list[int] | None = None,
                      parents: list[list[int] | None] | None = None) -> list[torch.Tensor]:
        """Appends inputs[i] to caches[i] for every sequence in one flattened forward.

        Returns logits per sequence: [len(inputs[i]), V], or its last last[i] rows when `last` is
        given (0: none, as for a prefill chunk). float32 on the CPU; raw=True keeps the model's
        dtype and device. A sequence marked argmax_only gets its rows' argmax ids instead ([n]
        int64 on the CPU, lowest index on ties): all that greedy acceptance reads. parents[i]
        (optional) lays sequence i's tokens out as a tree (see attention_mask); its positions
        are then the prefix length plus each token's depth."""
        parents = parents or [None] * len(inputs)
        starts = [c.length for c in caches]
        offsets, ids, positions, masks, rows = [0], [], [], [], []
        for start, x, tree in zip(starts, inputs, parents):
            tree = list(range(-1, len(x) - 1)) if tree is None else tree
            if len(tree) != len(x):
                raise ValueError(f"parents has {len(tree)} entries for {len(x)} tokens")
            ids += x
            positions += [start + d for d in depths(tree)]
            masks.append(attention_mask(start, tree, self.device))
            offsets.append(offsets[-1] + len(x))
        keep = [len(x) for x in inputs] if last is None else [min(k, len(x)) for k, x in zip(last, inputs)]
        for hi, k in zip(offsets[1:], keep):
            rows += range(hi - k, hi)
        batch = FlatBatch(tuple(caches), tuple(starts), tuple(offsets), tuple(masks), self.layers)
        to = dict(dtype=torch.long, device=self.device)
        with self._flat_attention():
            out = self.model(
                input_ids=torch.tensor([ids], **to), position_ids=torch.tensor([positions], **to),
                use_cache=False, logits_to_keep=torch.tensor(rows, **to), flat_batch=batch,
            )
        for c, x, start in zip(caches, inputs, starts):
            if c.capacity < start + len(x):  # flat_attention reserves room: it did not run
                raise RuntimeError("the model did not attend through specserve's flat attention (transformers "
                                   "attention interface); its keys and values were not stored")
            c.length += len(x)
        logits = out.logits[0]  # [rows, V], the model's dtype and device
        argmax_only = argmax_only or [False] * len(inputs)
        ids_of = logits.argmax(dim=-1).cpu().split(keep) if any(argmax_only) else keep  # one host copy
        return [i if a else x if raw else x.float().cpu() for x, i, a in zip(logits.split(keep), ids_of, argmax_only)]

    @contextmanager
    def _flat_attention(self):
        """The model attends through flat_attention for this call only (it stays as loaded for anyone else)."""
        saved = [c._attn_implementation for c in self._configs]
        for c in self._configs:
            c._attn_implementation = ATTENTION
        try:
            yield
        finally:
            for c, implementation in zip(self._configs, saved):
                c._attn_implementation = implementation

    @staticmethod
    def cached_length(cache: SequenceKV) -> int:
        return cache.length

    @staticmethod
    def rollback(cache: SequenceKV, n: int) -> None:
        """Drops the last n cached positions: a length change."""
        if n > 0:
            cache.length -= min(n, cache.length)

    @staticmethod
    def keep(cache: SequenceKV, positions: list[int]) -> None:
        """Commits a subset of the cached positions (in order): an in-place gather."""
        cache.keep(positions)

    @staticmethod
    def release(cache: SequenceKV) -> None:
        """Frees a sequence's buffer."""
        cache.buffer, cache.length = None, 0
