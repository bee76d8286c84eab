"""Drafter `head`: a trained draft head (runtime/head.py) beside the target, fed its features.

The engine hands each request the target's features of the positions committed since the last
one (DraftRequest.features); the head keeps them in its own KV store (teacher-forced), then
drafts by feeding back its predicted features. A round is one batched head forward per depth for
all sequences. It runs where the target's rank 0 runs (in process, or in the coordinator's
process in the distributed shape), so no feature crosses the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..speculation import make_generator, sample_token, warp_probs
from ..speculation.round import DraftBlock, DraftRequest, DrafterCapabilities
from ..speculation.shape import children_of, default_shape
from .drafters import Drafter, TreeBuilder
from .head import DraftHead
from .kv import CausalLM


@dataclass
class _HeadState:
    cache: object
    features: list[torch.Tensor] = field(default_factory=list)  # [n, d] blocks: f_fed .. f_{known-1}
    known: int = 0  # positions whose target feature the head has been sent
    fed: int = 0  # teacher-forced positions in the head's cache (drafted ones follow them)


@dataclass(frozen=True)
class _Branch:
    request: DraftRequest
    cache: object  # the head's cache it drafts in (the sequence's, or a fork of it)
    parent: int  # the tree node it continues from (-1: the root)
    at: int  # the template node it stands for (-1: the root)


class HeadDrafter(Drafter):
    name = "head"

    def __init__(self, head: DraftHead):
        self.head = head.eval()
        self.lm = CausalLM(head, batch_invariant=False)  # q need only be what it samples from (an int8 head too)
        self.vocab = head.vocab.cpu()  # [V'] the ids the head can propose
        self.vocab_size = int(head.signature["vocab_size"])
        self.feature_size = head.hidden_size  # d of the features it reads
        # the engine sends the target's last hidden states with each request; trees follow the
        # template node for node; one forward per depth for all sequences (calibration times a batch too)
        self.capabilities = DrafterCapabilities(feature_size=self.feature_size, drafts_trees=True, batches_drafts=True,
                                                q_vocab=self.vocab_size)
        self._states: dict[int, _HeadState] = {}

    @torch.inference_mode()
    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        live, inputs, features = [], [], []
        for r in requests:
            s = self._states.get(r.seq_id)
            if s is None:
                s = self._states[r.seq_id] = _HeadState(self.lm.new_cache())
            if r.features is not None:
                if r.features_start != s.known:
                    raise ValueError(f"sequence {r.seq_id}: features start at position {r.features_start}, "
                                     f"the head holds {s.known}")
                s.features.append(r.features.to(self.lm.device, self.head.output_rows.dtype))
                s.known += len(r.features)
            self.lm.rollback(s.cache, self.lm.cached_length(s.cache) - s.fed)  # drop last round's drafts
            m = len(r.context)
            if r.k <= 0 or s.known < m - 1 or m < 2 or s.fed >= m - 1:
                continue  # nothing to draft from (the features lag the context)
            # teacher-forced positions fed .. m-2: token x_{t+1} with feature f_t
            unfed = torch.cat(s.features)
            feats, rest = unfed[: m - 1 - s.fed], unfed[m - 1 - s.fed :]
            s.features = [rest] if len(rest) else []
            live.append((r, s))
            inputs.append(list(r.context[s.fed + 1 : m]))
            features.append(feats)
            s.fed = m - 1
        trees = {r.seq_id: TreeBuilder() for r, _ in live}
        templates = {r.seq_id: children_of(r.shape or default_shape(r.k, r.max_nodes, r.max_branch)) for r, _ in live}
        generators = {r.seq_id: None if r.params.greedy else make_generator(r.seed) for r, _ in live}
        branches = [_Branch(r, s.cache, -1, -1) for r, s in live]
        forks = []
        while branches:
            outs = self.lm.forward_outputs([b.cache for b in branches], inputs, features=features,
                                           last=[1] * len(branches), hidden=[1] * len(branches))
            next_branches, inputs, features = [], [], []
            for b, out in zip(branches, outs):
                r, tree, template = b.request, trees[b.request.seq_id], templates[b.request.seq_id]
                slots = template.get(b.at, [])  # the template's children here, in rank order
                logits = out.scores[0]  # [V'] over the head's vocabulary
                n = min(len(slots), len(logits))
                if r.params.greedy:  # chosen children: the head's top n
                    picks = [int(logits.argmax())] if n == 1 else logits.topk(n).indices.tolist()
                    q_full = None
                else:  # sampled children, drawn independently from q
                    q_vocab = warp_probs(logits[None], [r.params])[0]
                    picks = [sample_token(q_vocab, generators[r.seq_id]) for _ in range(n)]
                    q_full = torch.zeros(self.vocab_size).index_copy_(0, self.vocab, q_vocab)
                continuing = [i for i, slot in enumerate(slots[:n]) if template.get(slot)]
                for i, (pick, slot) in enumerate(zip(picks, slots)):
                    x = int(self.vocab[pick])
                    node = tree.add(x, b.parent, q_full)
                    if i in continuing:  # the template goes on below it: a branch (its own cache but the first)
                        cache = b.cache if i == continuing[0] else self.lm.fork(b.cache)
                        if i != continuing[0]:
                            forks.append(cache)
                        next_branches.append(_Branch(r, cache, node, slot))
                        inputs.append([x])
                        features.append(out.hidden.to(self.head.output_rows.dtype))  # [1, d] the predicted f
            branches = next_branches
        for cache in forks:
            self.lm.release(cache)
        return [trees[r.seq_id].block() if r.seq_id in trees else DraftBlock([], None) for r in requests]

    def release(self, seq_id: int) -> None:
        s = self._states.pop(seq_id, None)
        if s is not None:
            self.lm.release(s.cache)
