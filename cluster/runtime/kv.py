"""A Hugging Face causal LM over a KV store that persists across rounds, batched without copies.

All sequences' keys and values live in one pool, [layers, 2, slots, kv_heads, capacity, head_dim]:
a sequence owns a slot, and its first `length` positions are valid. A rollback is a length change;
keeping a subset of positions (the accepted path of a tree) is an in-place gather within the slot.
Live slots are compacted to the front when sequences leave, so a round's sequences are one
contiguous view of the pool.

A round runs as one flattened forward: the new tokens of every sequence side by side ([1, T], no
padding), each with its own position id. An attention function registered with transformers
writes every new key and value into the pool in one indexed copy per layer, then attends: the
sequences with short blocks (decodes, verify blocks, trees) in one batched call over their slots,
padded to the longest block and masked per sequence; long blocks (prefill chunks) one by one. The
model keeps its own weights and layers, so DeepSpeed AutoTP still shards them: each rank stores
its own heads.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..speculation.round import TargetOutput, VerifyBatch

ATTENTION = "specserve_flat"
INVARIANT_SPAN = 512  # CPU sdpa reads keys in blocks of 512: whole blocks keep a row's sums in one order
BATCHED_BLOCK = 16  # blocks of at most this many tokens may attend in the batched call
_CALL_COST = 1200  # one attention call, in query-row x key units (measured: ~40 us against ~0.03 us)
_GROWTH_ALIGN = 64  # capacity is a multiple of this many positions
_SHRINK_SLOTS, _SHRINK_POSITIONS = 8, 1024  # a pool at most this large is never shrunk


class SequenceKV:
    """A sequence's slot in a KVPool; its first `length` positions are valid."""

    __slots__ = ("pool", "slot", "length", "__weakref__")

    def __init__(self, pool: KVPool | None, slot: int):
        self.pool, self.slot, self.length = pool, slot, 0

    @torch.inference_mode()
    def keep(self, positions: list[int]) -> None:
        """Keeps exactly these cached positions (increasing), moved to the front in order."""
        if any(b <= a for a, b in zip(positions, positions[1:])) or (positions and not 0 <= positions[0] <= positions[-1] < self.length):
            raise ValueError(f"positions must increase within [0, {self.length}), got {positions}")
        same = 0  # positions already in place need no move
        while same < len(positions) and positions[same] == same:
            same += 1
        if same < len(positions):
            slot = self.pool.tensor[:, :, self.slot]  # [layers, 2, kv_heads, capacity, D]
            index = torch.tensor(positions[same:], device=slot.device)
            slot[:, :, :, same : len(positions)] = slot.index_select(3, index)
        self.length = len(positions)


def fork(cache: SequenceKV) -> SequenceKV:
    """A new cache in the same pool holding a copy of this one's positions (a tree's branch)."""
    pool = cache.pool
    child = pool.new()
    if cache.length:
        with torch.inference_mode():
            pool.reserve(cache.length, pool.tensor[0, 0, :1])
            pool.tensor[:, :, child.slot, :, : cache.length] = pool.tensor[:, :, cache.slot, :, : cache.length]
    child.length = cache.length
    return child


class KVPool:
    """One tensor of keys and values for every sequence of a model, a slot each; slots grow by
    doubling, positions by half again (the pool holds slots x the longest sequence)."""

    def __init__(self, layers: int):
        self.layers = layers
        self.tensor: torch.Tensor | None = None  # [layers, 2, slots, kv_heads, capacity, D]
        self._owners: list[weakref.ref] = []  # _owners[i]() holds slot i (None: free)
        self.writes = 0  # forwards that stored their keys and values here

    @property
    def live(self) -> int:
        """Slots that hold a sequence."""
        return sum(r() is not None for r in self._owners)

    @property
    def nbytes(self) -> int:
        """Bytes the pool's tensor holds (0 once every sequence is gone and it compacted)."""
        return 0 if self.tensor is None else self.tensor.numel() * self.tensor.element_size()

    def new(self) -> SequenceKV:
        cache = SequenceKV(self, len(self._owners))
        self._owners.append(weakref.ref(cache))
        return cache

    def free(self, cache: SequenceKV) -> None:
        """Frees the cache's slot now: the last slot's sequence moves into it, and a pool much
        larger than what is left is reallocated smaller (a cache dropped without free is freed
        at the next forward's compaction)."""
        if cache.pool is self:
            self._owners[cache.slot] = lambda: None
            cache.pool, cache.length = None, 0
            self.compact()

    @torch.inference_mode()
    def compact(self) -> None:
        """Moves the last live slots into the holes, so live slots are 0..n-1; a pool that has
        become much larger than its live sequences need is reallocated smaller (an empty one freed)."""
        owners = [r() for r in self._owners]
        holes = [i for i, c in enumerate(owners) if c is None]
        for hole in holes:
            while owners and owners[-1] is None:
                owners.pop()
            if hole >= len(owners):
                break
            moved = owners.pop()
            if moved.length:
                self.tensor[:, :, hole, :, : moved.length] = self.tensor[:, :, moved.slot, :, : moved.length]
            moved.slot, owners[hole] = hole, moved
        while owners and owners[-1] is None:
            owners.pop()
        self._owners = [weakref.ref(c) for c in owners]
        if not owners:
            self.tensor = None
        elif self.tensor is not None:
            longest = max(c.length for c in owners)
            slots, capacity = self.tensor.shape[2], self.tensor.shape[4]
            if slots > max(_SHRINK_SLOTS, 4 * len(owners)) or capacity > max(_SHRINK_POSITIONS, 4 * longest):
                self._reallocate(2 * len(owners), 2 * longest, len(owners), longest)

    def reserve(self, capacity: int, like: torch.Tensor) -> None:
        """Room for every slot and `capacity` positions; `like` is a layer's new keys [1, kv_heads, T, D]."""
        slots, old = len(self._owners), self.tensor
        if old is None:
            self.tensor = like.new_zeros(self.layers, 2, slots, like.shape[1], _aligned(capacity), like.shape[3])
        elif slots > old.shape[2] or capacity > old.shape[4]:
            # grown by doubling; only the live part is copied
            longest = max((c.length for r in self._owners if (c := r()) is not None), default=0)
            self._reallocate(max(slots, 2 * old.shape[2]) if slots > old.shape[2] else old.shape[2],
                             max(capacity, old.shape[4] * 3 // 2) if capacity > old.shape[4] else old.shape[4],
                             min(slots, old.shape[2]), longest)

    def _reallocate(self, slots: int, capacity: int, live_slots: int, live_positions: int) -> None:
        old = self.tensor
        # zeros, not garbage: a batched call reads past each slot's length (masked, but 0 * NaN is NaN)
        new = old.new_zeros(self.layers, 2, slots, old.shape[3], _aligned(capacity), old.shape[5])
        n, m = min(live_slots, old.shape[2], slots), min(live_positions, old.shape[4])  # new caches hold nothing yet
        new[:, :, :n, :, :m] = old[:, :, :n, :, :m]
        self.tensor = new


def _aligned(capacity: int) -> int:
    return max(_GROWTH_ALIGN, -(-capacity // _GROWTH_ALIGN) * _GROWTH_ALIGN)


@dataclass(frozen=True)
class FlatBatch:
    """The layout of one flattened forward of T new tokens over a KVPool (index tensors on the model's device)."""

    pool: KVPool
    write_slot: torch.Tensor  # [T] the slot each new token's key and value go to
    write_pos: torch.Tensor  # [T] and the position within that slot
    capacity: int  # positions the pool must hold
    # batched part: slots lo .. lo + width - 1, each block padded to `block` queries over `extent` positions
    lo: int
    width: int
    block: int
    extent: int
    rows: torch.Tensor  # [Tb] rows of the flat batch that attend batched
    padded: torch.Tensor  # [Tb] their index among the width * block padded queries
    aligned: bool  # rows and padded are both 0 .. T - 1: queries and outputs reshape without a copy
    mask: torch.Tensor | None  # [width, 1, block, extent] bool (True: attend)
    # one by one: (slot, first row, end row, cached length + new tokens, mask [n, end] or None)
    singles: tuple[tuple[int, int, int, int, torch.Tensor | None], ...]
    invariant: bool = False  # every query row attends as its own head (batch_invariant_attention)


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


def batched_part(blocks: list[int], ends: list[int], slots: list[int]) -> list[int]:
    """Which sequences attend in the batched call: padding every block to the longest and every
    key range to the farthest costs width x extent x (1 + block) (key reads and products), each
    sequence left out one call of its own. Tries the distinct block sizes up to BATCHED_BLOCK and a
    few extents, keeps the cheapest (units: one query row over one key ~ 1; a call ~ _CALL_COST)."""
    candidates = [i for i, n in enumerate(blocks) if n <= BATCHED_BLOCK]
    if not candidates:
        return []
    alone = [_CALL_COST + e * (1 + n) for n, e in zip(blocks, ends)]
    sorted_ends = sorted(ends[i] for i in candidates)
    extents = {sorted_ends[min(len(sorted_ends) - 1, int(q * len(sorted_ends)))] for q in (0.5, 0.75, 0.9, 1.0)}
    best, best_cost = [], sum(alone)
    for block in sorted({blocks[i] for i in candidates}):
        for extent in extents:
            part = [i for i in candidates if blocks[i] <= block and ends[i] <= extent]
            if not part:
                continue
            width = max(slots[i] for i in part) - min(slots[i] for i in part) + 1
            inside = set(part)
            cost = _CALL_COST + width * extent * (1 + block) + sum(a for i, a in enumerate(alone) if i not in inside)
            if cost < best_cost:
                best, best_cost = part, cost
    return best


def batch_invariant_attention(q, k, v, mask=None, scale=None):
    """sdpa in which each query row is a head of its own (one query each), so a row's output is
    bitwise the same whatever other rows, blocks or sequences the call holds: CPU sdpa kernels
    choose their arithmetic by the number of queries (1-2 rows differ from 3 or more). The query
    heads are ordered so that grouped-query attention maps each to its own kv head, so the keys and
    values are read in place. q [w, H, b, D], k/v [w, H_kv, L, D], mask [w or 1, 1, b, L] or [b, L]
    bool (or None) -> [w, H, b, D]. Key ranges must be whole multiples of INVARIANT_SPAN: the
    kernel sums over keys in blocks of that many, and a fully masked block adds exact zeros."""
    w, heads, b, dim = q.shape
    rows = q.reshape(w, heads * b, 1, dim)  # head h, row j -> head h * b + j; its kv head is h // (H / H_kv)
    if mask is not None:
        mask = mask.reshape(-1, 1, b, mask.shape[-1]).expand(w, heads, b, mask.shape[-1]).reshape(w, heads * b, 1, -1)
    out = torch.nn.functional.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.view(w, heads, b, dim)


def _layout(pool: KVPool, caches, starts, trees, device, invariant: bool = False) -> FlatBatch:
    """Where each new token is stored and how each sequence attends (built once per forward).
    invariant: key ranges are whole multiples of INVARIANT_SPAN (see batch_invariant_attention)."""
    span = (lambda e: -(-e // INVARIANT_SPAN) * INVARIANT_SPAN) if invariant else (lambda e: e)
    offsets = [0]
    for tree in trees:
        offsets.append(offsets[-1] + len(tree))
    write_slot = [c.slot for c, tree in zip(caches, trees) for _ in tree]
    write_pos = [start + j for start, tree in zip(starts, trees) for j in range(len(tree))]
    batched = set(batched_part([len(t) for t in trees], [s + len(t) for s, t in zip(starts, trees)],
                               [c.slot for c in caches]))
    singles = tuple(
        (caches[i].slot, offsets[i], offsets[i + 1], span(starts[i] + len(trees[i])),
         _padded(attention_mask(starts[i], trees[i], "cpu"), starts[i] + len(trees[i]), span, device))
        for i in range(len(trees)) if i not in batched
    )
    batched = sorted(batched)
    lo = width = block = extent = 0
    rows, padded, mask = [], [], None
    if batched:
        slots = [caches[i].slot for i in batched]
        lo, width = min(slots), max(slots) - min(slots) + 1
        block = max(len(trees[i]) for i in batched)
        extent = span(max(starts[i] + len(trees[i]) for i in batched))
        mask = torch.zeros(width, 1, block, extent, dtype=torch.bool)
        mask[:, :, :, 0] = True  # padding queries see one position (their output is dropped)
        for i, slot in zip(batched, slots):
            n, end = len(trees[i]), starts[i] + len(trees[i])
            rows += range(offsets[i], offsets[i + 1])
            padded += range((slot - lo) * block, (slot - lo) * block + n)
            seen = attention_mask(starts[i], trees[i], "cpu")
            mask[slot - lo, 0, :n, :end] = True if seen is None else seen
        mask = mask.to(device)
    to = dict(dtype=torch.long, device=device)
    return FlatBatch(
        pool, torch.tensor(write_slot, **to), torch.tensor(write_pos, **to),
        span(max((s + len(t) for s, t in zip(starts, trees)), default=0)),
        lo, width, block, extent, torch.tensor(rows, **to), torch.tensor(padded, **to),
        0 < width * block == offsets[-1] and rows == padded == list(range(offsets[-1])), mask, singles, invariant,
    )


def _padded(mask: torch.Tensor | None, end: int, span, device) -> torch.Tensor | None:
    """A single sequence's mask [n, end] (None: one token that sees everything) over span(end) keys."""
    if span(end) == end:
        return None if mask is None else mask.to(device)
    out = torch.zeros(1 if mask is None else mask.shape[0], span(end), dtype=torch.bool)
    out[:, :end] = True if mask is None else mask
    return out.to(device)


def flat_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, flat_batch=None, **kwargs):
    """query [1, H, T, D], key/value [1, H_kv, T, D] of one layer for the whole flattened batch.
    Stores the new keys/values in the pool, then attends each sequence within its slot."""
    b = flat_batch
    sdpa = _invariant_sdpa if b.invariant else torch.nn.functional.scaled_dot_product_attention
    if module.layer_idx == 0:
        b.pool.reserve(b.capacity, key)
        b.pool.writes += 1
    kv = b.pool.tensor[module.layer_idx]  # [2, slots, H_kv, capacity, D]
    kv[:, b.write_slot, :, b.write_pos] = torch.stack((key[0], value[0])).permute(2, 0, 1, 3)  # [T, 2, H_kv, D]
    heads, dim = query.shape[1], query.shape[3]
    out = None if b.aligned else query.new_empty(query.shape[2], heads, dim)  # [T, H, D]
    if b.width:
        if b.aligned:  # every sequence batched, in slot order, blocks of one length
            q = query[0].view(heads, b.width, b.block, dim).transpose(0, 1)
        else:
            q = query.new_zeros(b.width * b.block, heads, dim)
            q[b.padded] = query[0, :, b.rows].transpose(0, 1)
            q = q.view(b.width, b.block, heads, dim).transpose(1, 2)  # [width, H, block, D]
        hi = b.lo + b.width
        att = sdpa(q, kv[0, b.lo : hi, :, : b.extent], kv[1, b.lo : hi, :, : b.extent],
                   attn_mask=b.mask, scale=scaling, enable_gqa=True)  # [width, H, block, D]
        if b.aligned:
            return att.transpose(1, 2).reshape(1, -1, heads, dim), None
        out[b.rows] = att.transpose(1, 2).reshape(-1, heads, dim)[b.padded]
    for slot, lo, hi, end, mask in b.singles:
        out[lo:hi] = sdpa(query[:, :, lo:hi], kv[0, slot, None, :, :end], kv[1, slot, None, :, :end],
                          attn_mask=mask, scale=scaling, enable_gqa=True)[0].transpose(0, 1)
    return out.unsqueeze(0), None  # [1, T, H, D]


def _invariant_sdpa(q, k, v, attn_mask=None, scale=None, enable_gqa=True):
    return batch_invariant_attention(q, k, v, attn_mask, scale)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, flat_attention)


class CausalLM:
    """A causal LM whose sequences each own a slot of its KVPool; every forward is one flattened batch."""

    def __init__(self, model: torch.nn.Module, batch_invariant: bool | None = None):
        """batch_invariant (default: whether the model's linears are int8, see int8.py): every
        query row attends alone (batch_invariant_attention), so a row's logits never depend on the
        rest of the forward."""
        from .int8 import is_int8

        _register()
        self.model = model
        self.batch_invariant = is_int8(model) if batch_invariant is None else batch_invariant
        self.device = next(model.parameters(), torch.empty(0)).device
        self.vocab_size = int(model.config.vocab_size)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.layers = int(model.config.num_hidden_layers)
        self.pool = KVPool(self.layers)
        # every config the modules read their attention implementation from (copies may not share one)
        self._configs = list({id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")}.values())

    def new_cache(self) -> SequenceKV:
        return self.pool.new()

    def forward(self, cache: SequenceKV, input_ids: list[int], last_only: bool = False) -> torch.Tensor:
        """Appends input_ids to the cache; returns logits [n, V] (or [1, V]) float32 on the CPU."""
        return self.forward_batch([cache], [input_ids], last=[1] if last_only else None)[0]

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
        return [o.scores for o in self.forward_outputs(caches, inputs, raw, argmax_only, last, parents)]

    def verify(self, batch: VerifyBatch) -> list[TargetOutput]:
        """A round's one forward (speculation.round.VerifyBatch): scores stay on the model's device
        (logits in its dtype, argmax ids), for acceptance there."""
        return self.forward_outputs(list(batch.caches), list(batch.inputs), raw=True, argmax_only=list(batch.argmax_only),
                                    last=list(batch.last), parents=None if batch.parents is None else list(batch.parents),
                                    hidden=None if batch.hidden is None else list(batch.hidden))

    @torch.inference_mode()
    def forward_outputs(self, caches: list[SequenceKV], inputs: list[list[int]], raw: bool = False,
                        argmax_only: list[bool] | None = None, last: list[int] | None = None,
                        parents: list[list[int] | None] | None = None, hidden: list[int] | None = None,
                        features: list[torch.Tensor] | None = None) -> list[TargetOutput]:
        """forward_batch, returning TargetOutputs: with `hidden`, each sequence's last hidden[i]
        rows of the last hidden states too ([h, d], the model's dtype, on its device). `features`
        ([n_i, d] per sequence) go to models that read them beside the tokens (a draft head)."""
        if any(c.pool is not self.pool for c in caches):
            raise ValueError("a cache was released or belongs to another model")
        if len({c.slot for c in caches}) != len(caches):
            raise ValueError("a cache appears twice in one forward")
        self.pool.compact()
        order = sorted(range(len(caches)), key=lambda i: caches[i].slot)  # slot order: batched views need no copy
        if order != list(range(len(caches))):
            pick = lambda xs: None if xs is None else [xs[i] for i in order]  # noqa: E731
            got = self.forward_outputs(pick(caches), pick(inputs), raw, pick(argmax_only), pick(last), pick(parents),
                                       pick(hidden), pick(features))
            back = [None] * len(order)
            for j, i in enumerate(order):
                back[i] = got[j]
            return back
        parents = parents or [None] * len(inputs)
        trees = [list(range(-1, len(x) - 1)) if t is None else t for x, t in zip(inputs, parents)]
        for x, tree in zip(inputs, trees):
            if len(tree) != len(x):
                raise ValueError(f"parents has {len(tree)} entries for {len(x)} tokens")
        starts = [c.length for c in caches]
        ids = [t for x in inputs for t in x]
        positions = [start + d for start, tree in zip(starts, trees) for d in depths(tree)]
        keep = [len(x) for x in inputs] if last is None else [min(k, len(x)) for k, x in zip(last, inputs)]
        rows, end = [], 0
        for x, k in zip(inputs, keep):
            end += len(x)
            rows += range(end - k, end)
        batch = _layout(self.pool, caches, starts, trees, self.device, self.batch_invariant)
        to = dict(dtype=torch.long, device=self.device)
        extra = {}
        if hidden is not None:
            extra["output_hidden_states"] = True
        if features is not None:
            extra["features"] = torch.cat(list(features)).to(self.device)[None]  # [1, T, d]
        writes = self.pool.writes
        with self._flat_attention():
            out = self.model(
                input_ids=torch.tensor([ids], **to), position_ids=torch.tensor([positions], **to),
                use_cache=False, logits_to_keep=torch.tensor(rows, **to), flat_batch=batch, **extra,
            )
        if self.pool.writes == writes:
            raise RuntimeError("the model did not attend through specserve's flat attention (transformers "
                               "attention interface); its keys and values were not stored")
        for c, x in zip(caches, inputs):
            c.length += len(x)
        logits = out.logits[0]  # [rows, V], the model's dtype and device
        argmax_only = argmax_only or [False] * len(inputs)
        ids = logits.argmax(dim=-1) if any(argmax_only) else None
        ids_of = (ids if raw else ids.cpu()).split(keep) if ids is not None else keep  # raw: none to the host
        scores = [i if a else x if raw else x.float().cpu() for x, i, a in zip(logits.split(keep), ids_of, argmax_only)]
        if hidden is None:
            return [TargetOutput(x) for x in scores]
        states, ends, end = out.hidden_states[-1][0], [], 0  # [T, d]
        for x in inputs:
            end += len(x)
            ends.append(end)
        return [TargetOutput(x, states[e - min(h, len(inp)) : e]) for x, e, h, inp in zip(scores, ends, hidden, inputs)]

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
    def fork(cache: SequenceKV) -> SequenceKV:
        """A copy of a cache (its own slot), for a branch that continues apart from it."""
        return fork(cache)

    @staticmethod
    def keep(cache: SequenceKV, positions: list[int]) -> None:
        """Commits a subset of the cached positions (in order): an in-place gather."""
        cache.keep(positions)

    def release(self, cache: SequenceKV) -> None:
        """Frees a sequence's slot (its memory is reused once the pool compacts)."""
        self.pool.free(cache)
