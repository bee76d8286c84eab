"""Model drafters (`model`, `int8`, `trained`): a causal LM sharing the target's vocabulary.

A round is one batched forward per draft step for every sequence (and tree branch) it drafts
for. A tree branches at the root only: the draft's top-b tokens (greedy) or b independent samples
from q, each continued as a chain in a fork of the sequence's cache.

The second stage (staged speculative decoding): a cheaper proposer (prompt lookup) guesses how a
chain continues, the draft scores the guesses in the same forward and keeps them by the exact
rule the target uses on the draft (argmax equality, or modified rejection sampling with the
guesses one-hot), so every draft token is still drawn from exactly the q sent to the verifier,
and one draft forward yields several tokens where the guesses hold.

Each sequence's cache is rolled back lazily: at each proposal it is cropped to the longest prefix
it shares with the committed context, so rejected drafts never need an explicit call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..speculation import make_generator, rejection_sample, sample_token, warp_probs
from ..speculation.round import DraftBlock, DraftRequest, DrafterCapabilities
from .drafters import Drafter, NgramDrafter, TreeBuilder
from .kv import CausalLM


@dataclass
class _SeqCache:
    cache: object
    tokens: list[int] = field(default_factory=list)  # the ids its cache holds
    committed: int = 0  # context length at the last proposal (that prefix still matches)
    guessed: int = 0  # second-stage guesses scored for it
    kept: int = 0  # and kept

    def guess_limit(self) -> int:
        """Guess as far as a guess is likely to be reached and kept (beta^n >= 1/4, beta the
        sequence's kept rate with a prior of 1/2): long guesses where lookup holds, one where not."""
        beta = (self.kept + 1) / (self.guessed + 2)
        return 1 if beta <= 0.25 else max(1, int(math.log(0.25) / math.log(beta))) if beta < 1 else 32


@dataclass(frozen=True)
class _Branch:
    request: DraftRequest
    cache: object  # the sequence's cache, or a fork of it
    seq: _SeqCache
    held: list[int] | None  # the ids the sequence's cache holds (None: a fork, dropped after the round)
    parent: int  # the tree node it continues from (-1: the root)
    depth: int  # drafted tokens above it
    feed: list[int]  # ids to append before scoring
    guess: list[int]  # the second stage's guesses, appended after feed


class ModelDrafter(Drafter):
    # top-b (greedy) or b samples at the root, a chain below each; one forward per draft step for all
    # sequences (calibration times a batch too); a model of its own (vocabulary checked, agreement measured)

    def __init__(self, model: torch.nn.Module, name: str = "model", second_stage: NgramDrafter | None = None):
        # never batch invariant: exactness needs the q a draft was sampled from, not q's independence
        # of the batch (that is the target's), and per-row attention costs an int8 draft 10-30%
        self.lm = CausalLM(model, batch_invariant=False)
        self.name = name
        self.second_stage = second_stage
        self.vocab_size = self.lm.vocab_size
        self.capabilities = DrafterCapabilities(drafts_trees=True, batches_drafts=True, own_model=True,
                                                q_vocab=self.vocab_size)
        self._seqs: dict[int, _SeqCache] = {}
        self.forwards = 0  # draft forwards run (the second stage saves them)
        self.guessed = 0  # draft tokens that were the second stage's guesses, kept

    @torch.inference_mode()
    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        trees = {r.seq_id: TreeBuilder() for r in requests if r.k > 0}
        generators = {r.seq_id: None if r.params.greedy else make_generator(r.seed) for r in requests if r.k > 0}
        branches = []
        for r in requests:
            if r.k > 0:
                s, feed = self._resume(r.seq_id, r.context)
                budget = r.max_nodes if r.max_nodes > 0 else r.k
                guess = [] if _branches_at_root(r) else self._guess(s, r.context, [], min(r.k, budget) - 1)
                branches.append(_Branch(r, s.cache, s, s.tokens, -1, 0, feed, guess))
        forks = []
        while branches:
            scores = self.lm.forward_batch(
                [b.cache for b in branches], [b.feed + b.guess for b in branches], last=[len(b.guess) + 1 for b in branches],
                argmax_only=[b.request.params.greedy and not (b.depth == 0 and _branches_at_root(b.request)) for b in branches])
            self.forwards += 1
            for b in branches:
                if b.held is not None:
                    b.held.extend(b.feed + b.guess)
            picks = self._pick(branches, scores, generators)
            next_branches = []
            for b, chosen in zip(branches, picks):
                r, tree = b.request, trees[b.request.seq_id]
                budget = r.max_nodes if r.max_nodes > 0 else r.k
                root = b.depth == 0 and _branches_at_root(r)
                if not root:  # a chain step: within what the other branches left of the node budget
                    chosen = chosen[: budget - len(tree)]
                # the cache holds feed + guess: keep the guesses taken (all but a chain's last token)
                dropped = len(b.guess) - min(len(b.guess), max(0, len(chosen) - 1))
                self.lm.rollback(b.cache, dropped)
                if b.held is not None and dropped:
                    del b.held[-dropped:]
                if root:  # siblings: the root's children
                    for i, (x, q) in enumerate(chosen):
                        if len(tree) >= budget:
                            break
                        node = tree.add(x, -1, q)
                        if 1 < r.k and len(tree) < budget:
                            cache = b.cache if i == 0 else self.lm.fork(b.cache)
                            if i:
                                forks.append(cache)
                            next_branches.append(_Branch(r, cache, b.seq, b.held if i == 0 else None, node, 1, [x],
                                                         self._guess(b.seq, r.context, [x], min(r.k - 1, budget - len(tree)) - 1)))
                    continue
                node, depth = b.parent, b.depth
                kept = max(0, len(chosen) - 1)
                self.guessed += kept
                b.seq.guessed += len(b.guess)
                b.seq.kept += kept
                for x, q in chosen:  # a chain: guesses taken, then the draft's own token
                    node = tree.add(x, node, q)
                    depth += 1
                if chosen and depth < r.k and len(tree) < budget:
                    next_branches.append(_Branch(r, b.cache, b.seq, b.held, node, depth, [chosen[-1][0]],
                                                 self._guess(b.seq, r.context, tree.path(node), min(r.k - depth, budget - len(tree)) - 1)))
            branches = next_branches
        for cache in forks:
            self.lm.release(cache)
        return [trees[r.seq_id].block() if r.k > 0 else DraftBlock([], None) for r in requests]

    def _resume(self, seq_id: int, context: Sequence[int]) -> tuple[_SeqCache, list[int]]:
        """The sequence's cache cropped to what it shares with the context, and the ids to feed."""
        s = self._seqs.get(seq_id)
        if s is None:
            s = self._seqs[seq_id] = _SeqCache(self.lm.new_cache())
        keep = s.committed  # the context only grows, so this prefix still matches
        limit = min(len(s.tokens), len(context) - 1)
        while keep < limit and s.tokens[keep] == context[keep]:
            keep += 1
        keep = min(keep, limit)
        self.lm.rollback(s.cache, len(s.tokens) - keep)
        del s.tokens[keep:]
        s.committed = len(context)
        return s, list(context[keep:])

    def _guess(self, s: _SeqCache, context: Sequence[int], path: list[int], n: int) -> list[int]:
        """The second stage's guess of what follows context + path (the branch's drafted tokens):
        at most n tokens, and at most the sequence's guess_limit (none without a second stage)."""
        n = min(n, s.guess_limit())
        if self.second_stage is None or n <= 0:
            return []
        return self.second_stage.lookup([*context, *path], n)

    def _pick(self, branches: list[_Branch], scores: list[torch.Tensor], generators) -> list[list[tuple[int, torch.Tensor | None]]]:
        """Each branch's tokens this step, with the q each was drawn from (None: greedy): the root's
        children where a tree branches, else the guesses kept and one token of the draft's own."""
        out: list[list] = [[] for _ in branches]
        sampled = []
        for i, (b, rows) in enumerate(zip(branches, scores)):
            r = b.request
            if b.depth == 0 and _branches_at_root(r):
                n = min(r.max_branch, r.max_nodes)
                if r.params.greedy:  # chosen children: the draft's top n
                    out[i] = [(int(x), None) for x in rows[-1].topk(n).indices]
                else:  # sampled children, drawn independently from q
                    q = warp_probs(rows[-1:], [r.params])[0]
                    out[i] = [(sample_token(q, generators[r.seq_id]), q) for _ in range(n)]
            elif r.params.greedy:  # rows are argmax ids: guesses kept while they equal them
                ids = rows.tolist()
                taken = 0
                while taken < len(b.guess) and b.guess[taken] == ids[taken]:
                    taken += 1
                out[i] = [(x, None) for x in ids[: taken + 1]]
            else:
                sampled.append(i)
        if sampled:  # the draft's q is the target here and the guesses a one-hot draft: the result is exact q
            qs = [warp_probs(scores[i], [branches[i].request.params] * len(scores[i])) for i in sampled]
            guesses = [branches[i].guess for i in sampled]
            result = rejection_sample(torch.cat(qs), torch.tensor([x for g in guesses for x in g], dtype=torch.long), None,
                                      [len(g) for g in guesses], [False] * len(sampled),
                                      [generators[branches[i].request.seq_id] for i in sampled])
            for j, i in enumerate(sampled):
                tokens = result.tokens(j)
                out[i] = [(x, qs[j][t]) for t, x in enumerate(tokens)]
        return out

    def release(self, seq_id: int) -> None:
        s = self._seqs.pop(seq_id, None)
        if s is not None:
            self.lm.release(s.cache)


def _branches_at_root(r: DraftRequest) -> bool:
    return r.max_nodes > 1 and r.max_branch > 1
