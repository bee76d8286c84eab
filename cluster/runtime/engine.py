"""The local speculative engine. A round: plan (runtime/plan.py), propose (one drafter call),
verify (one target forward for the whole ragged batch), accept (batched, on the target's device),
commit (both caches keep the accepted positions) and emit. New sequences join between rounds.
Request types and their checks: runtime/requests.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch

from ..speculation import (
    AcceptanceTracker,
    AdaptiveK,
    CostModel,
    DraftTree,
    ProbeSchedule,
    accept_trees,
    draw_seed,
    greedy_accept,
    make_generator,
    rejection_sample,
    warp_probs,
)
from ..speculation.host import HostTransfers, to_device
from ..speculation.round import (Acceptance, DraftBlock, Drafter, DraftRequest, RoundResult, TargetOutput, VerifyBatch,
                                 capabilities_of)
from ..speculation.shape import Shape, ShapeStats, is_chain, max_fanout, shape_depth
from .calibration import Calibration, load_or_measure, measure_agreement, measure_costs, recheck_draft_cost
from .detokenizer import Detokenizer, stop_at
from .kv import CausalLM
from .pass_drafter import fused_pays, lookahead_ids, lookahead_layout, split_lookahead
from .plan import PlanSettings, RoundPlan, SequencePlan, SequenceState, plan_round
from .requests import (CHAT_ROLES, ChatMessage, GenerationRequest, GenerationResult, PromptLimits, SpeculationStats,
                       StepOutput, check_messages, check_request_fields, encode_prompt)
from .tokenizer import Tokenizer

__all__ = ["CHAT_ROLES", "ChatMessage", "GenerationRequest", "GenerationResult", "RoundTiming", "SpeculationStats",
           "SpeculativeEngine", "StepOutput", "check_messages", "check_request_fields"]

_NO_DRAFT = DraftBlock([], None)


def _layout(head: int, parents: tuple[int, ...] | None) -> list[int] | None:
    """The verify input's parents (kv.attention_mask) for `head` uncached tokens, then a tree's
    nodes: the head is a chain, its last token is the tree's root. None: all a chain."""
    if parents is None:
        return None
    return list(range(-1, head - 1)) + [head - 1 if p < 0 else head + p for p in parents]


@dataclass
class RoundTiming:
    """One round of the whole batch: wall times of its phases."""

    batch: int = 0  # sequences verified
    draft_tokens: int = 0
    accepted_tokens: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    sample_s: float = 0.0
    host_syncs: int = 0  # device -> host reads in acceptance (a constant a round, whatever the batch)
    host_bytes: int = 0


@dataclass
class _Sequence:
    seq_id: int
    request: GenerationRequest
    prompt_ids: list[int]
    generator: torch.Generator  # acceptance's draws, on the target's device
    draft_generator: torch.Generator  # the draft blocks' seeds, on the host
    cache: object
    trackers: dict[str, AcceptanceTracker] | None  # adaptive K: alpha per draft source (None: K fixed)
    probes: ProbeSchedule | None = None  # when it drafts again after rounds at K = 0 (adaptive K)
    output: list[int] = field(default_factory=list)
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    cached: int = 0  # tokens in the target's cache: all but the last one while decoding
    result: GenerationResult | None = None
    # for a drafter that reads the target: hidden states of committed positions not yet sent to it
    features: list[torch.Tensor] = field(default_factory=list)
    features_sent: int = 0  # positions whose features the drafter has
    text: Detokenizer | None = None  # the output's text, for stop strings

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output

    @property
    def uncached(self) -> list[int]:
        """What the next verify block starts with: the rest of the prompt, or the last token."""
        return self.tokens[self.cached :]


class SpeculativeEngine:
    def __init__(
        self,
        target,  # an nn.Module (in process) or an object with CausalLM's interface
        tokenizer: Tokenizer,
        drafter: Drafter | None,
        num_draft_tokens: int | str = "adaptive",
        max_draft_tokens: int = 8,
        chat_template: bool = False,
        prefill_chunk: int = 256,
        cost_model: CostModel | None = None,
        prior_alpha: float | None = None,
        calibration_key: dict | None = None,  # where measured costs are cached (calibration.py); None: not cached
        clock: Callable[[], float] = time.perf_counter,
        tree_nodes: int = 0,  # > 0: drafters that draft trees propose up to this many nodes (depth <= K)
        tree_branch: int = 2,  # children per tree node at most
        max_prompt_tokens: int | None = None,  # a cap below the model's context (serve.limits.max_prompt_tokens)
    ):
        # an nn.Module runs in process; anything with CausalLM's interface (a TargetGroup) as is
        self.target = CausalLM(target) if isinstance(target, torch.nn.Module) else target
        self.tokenizer = tokenizer
        self.drafter = drafter
        caps = self.capabilities = capabilities_of(drafter)  # what the drafter declares it reads and does
        self.reads_features = caps.reads_features  # the target's hidden states go to it
        self.num_draft_tokens = num_draft_tokens
        self.max_draft_tokens = max_draft_tokens
        self.chat_template = chat_template and getattr(tokenizer, "has_chat_template", False)
        self.prefill_chunk = prefill_chunk
        self.clock = clock
        self.tree_nodes = tree_nodes if caps.drafts_trees else 0
        self.tree_branch = tree_branch
        self.max_prompt_tokens = max_prompt_tokens
        self._shape_stats: dict[str, ShapeStats] = {}  # acceptance by depth and rank, per drafter source
        self.lookahead = caps.lookahead  # PaSS: L look-ahead tokens per accept point
        self._lookahead_source = caps.lookahead_source  # the drafter's part that drafts by PaSS
        self.settings = PlanSettings(num_draft_tokens, max_draft_tokens, self.tree_nodes, tree_branch, self.lookahead,
                                     caps.lookahead_source, caps.free_sources, drafter is not None)
        self.device = self.target.device  # where its outputs are: acceptance runs there
        self._cost_model = cost_model
        self._learn_costs = cost_model is None  # a given cost model stays as given (deterministic K)
        self._prior_alpha = prior_alpha
        self.calibration_key = calibration_key
        self._calibration: Calibration | None = None
        self._seqs: dict[int, _Sequence] = {}
        self.last_round = RoundTiming()
        self._policy: AdaptiveK | None = None  # the round's K for adaptive sequences
        self._next_id = 0
        if caps.own_model and drafter.lm.vocab_size != self.target.vocab_size:
            raise ValueError(
                f"draft vocabulary ({drafter.lm.vocab_size} ids) does not match the target's "
                f"({self.target.vocab_size} ids): a drafter must share the target's tokenizer"
            )

    # -- requests -------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> list[int]:
        """Checks every field (requests.encode_prompt); returns the prompt's token ids."""
        return encode_prompt(request, self.tokenizer, PromptLimits(
            self.target.vocab_size, self.target.max_context, self.max_draft_tokens, self.max_prompt_tokens,
            self.chat_template))

    def add_request(self, request: GenerationRequest, prompt_ids: list[int] | None = None) -> int:
        ids = self.validate(request) if prompt_ids is None else prompt_ids
        seq_id, self._next_id = self._next_id, self._next_id + 1
        adaptive = request.num_draft_tokens is None and self.num_draft_tokens == "adaptive" and self.drafter
        if adaptive and self._policy is None:  # measured now, not inside a round
            self._policy = AdaptiveK(self.cost_model, self.max_draft_tokens)
            _ = self.prior_alpha
        host = make_generator(request.sampling.seed)  # the drafts' seeds; acceptance draws on the device
        acceptance = torch.Generator(device=self.device).manual_seed(draw_seed(host))
        self._seqs[seq_id] = _Sequence(seq_id, request, ids, acceptance, host, self.target.new_cache(),
                                       {} if adaptive else None, self._policy.new_schedule() if adaptive else None)
        return seq_id

    def abort(self, seq_id: int) -> None:
        """Drops a sequence and frees its caches on both sides."""
        s = self._seqs.pop(seq_id, None)
        if s is not None:
            self.target.release(s.cache)
        if self.drafter:
            self.drafter.release(seq_id)

    def reset_target(self, target) -> None:
        """After the target failed (its caches are lost): drops every sequence, frees their drafts,
        and runs the next rounds on `target` (the same model, rebuilt)."""
        for seq_id in list(self._seqs):
            del self._seqs[seq_id]
            if self.drafter:
                self.drafter.release(seq_id)
        self.target = target

    @property
    def sequences(self) -> int:
        """Sequences the engine holds (running or finished and not yet collected)."""
        return len(self._seqs)

    def has_unfinished(self) -> bool:
        return any(s.result is None for s in self._seqs.values())

    def generate(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        requests = list(requests)
        prompts = [self.validate(r) for r in requests]  # all or nothing: no half-added batch
        ids = [self.add_request(r, p) for r, p in zip(requests, prompts)]
        results: dict[int, GenerationResult] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.result is not None:
                    results[out.seq_id] = out.result
        return [results[i] for i in ids]

    # -- one round ------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One round: admit, plan, propose, verify (prompt chunks ride in the same forward),
        accept, then commit and emit per sequence."""
        active = [s for s in self._seqs.values() if s.result is None]
        if not active:
            return []
        chunks, joining = self._admit([s for s in active if len(s.uncached) > 1])
        seqs = [s for s in active if len(s.uncached) == 1] + joining
        timing = RoundTiming(batch=len(seqs))
        plan = self._plan(seqs)
        blocks = self._propose(seqs, plan, timing)
        verified, prefilling = self._verify(seqs, blocks, chunks, timing)
        if not seqs:
            self.last_round = timing
            return []
        results = self._accept(seqs, blocks, verified, timing)
        if not prefilling:
            self._learn_round_cost(seqs, blocks, timing)
        for s, p, b, r, o in zip(seqs, plan.sequences, blocks, results, verified):
            self._commit(s, b, r, o)
            self._learn(s, p, b, r, o, timing)
        outputs = [self._emit(s, r.tokens) for s, r in zip(seqs, results)]
        self.last_round = timing
        return outputs

    def _plan(self, seqs: list[_Sequence]) -> RoundPlan:
        """The round as data (runtime/plan.py): a snapshot of each sequence, planned by plan_round
        (which changes nothing: the probe schedules it advanced come back in the plan)."""
        states = []
        for s in seqs:
            source, alpha = None, 0.0
            if s.trackers is not None and s.request.num_draft_tokens is None:
                source = self.drafter.source(s.seq_id, s.tokens)
                alpha = self._tracker(s, source).alpha
            states.append(SequenceState(
                s.seq_id, s.request.num_draft_tokens, source is not None, source, alpha, s.probes,
                remaining=s.request.max_new_tokens - len(s.output), room=self.target.max_context - len(s.tokens)))
        return plan_round(states, self.settings, self._policy, self._shapes_of, len(seqs))

    def _propose(self, seqs: list[_Sequence], plan: RoundPlan, timing: RoundTiming) -> list[DraftBlock]:
        """Each sequence's draft block (empty where the plan drafts nothing), from one propose_many call."""
        requests = [self._draft_request(s, p.shape) for s, p in zip(seqs, plan.sequences) if p.drafts]
        t = self.clock()
        proposed = iter(self.drafter.propose_many(requests) if requests else [])
        timing.draft_s = self.clock() - t
        blocks = [next(proposed) if p.drafts else _NO_DRAFT for p in plan.sequences]
        if self.lookahead and not self._fused_pays(seqs, plan, blocks):  # PaSS as the paper's alternating calls
            blocks = [replace(b, lookahead=0) if b.lookahead and len(b) else b for b in blocks]
        # real chain rounds refine the draft cost (when adaptive K priced every drafting sequence)
        if (requests and self._learn_costs and not self.lookahead and all(not r.max_nodes for r in requests)
                and plan.all_priced):
            free = self.capabilities.free_sources
            priced = sum(len(p.shape) for p in plan.sequences if p.drafts and p.source not in free) * plan.draft_token_s
            self._policy.cost = self._policy.cost.observed_draft(priced, timing.draft_s)
        for s, p in zip(seqs, plan.sequences):
            s.stats.draft_s += timing.draft_s / len(requests) if p.drafts else 0.0
        return blocks

    def _draft_request(self, s: _Sequence, shape: Shape) -> DraftRequest:
        """A chain of K (max_nodes 0), or a tree: its template, depth and budget."""
        seed = 0 if s.request.sampling.greedy else draw_seed(s.draft_generator)
        tree = not is_chain(shape)
        return DraftRequest(s.seq_id, s.tokens, shape_depth(shape), s.request.sampling, seed, *self._unsent_features(s),
                            max_nodes=len(shape) if tree else 0, max_branch=max_fanout(shape) if tree else 1,
                            shape=shape if tree else None)

    def _fused_pays(self, seqs: list[_Sequence], plan: RoundPlan, blocks: list[DraftBlock]) -> bool:
        """PaSS, fused or alternating (pass_drafter.fused_pays), from the measured costs at this batch size."""
        drafted = [(s, p, b) for s, p, b in zip(seqs, plan.sequences, blocks) if b.lookahead and len(b)]
        cost = self._policy.cost if self._policy is not None else self._cost_model or (
            self._calibration.cost if self._calibration is not None else None)
        if not drafted or cost is None:  # nothing measured yet (never inside a round): fused
            return True
        alphas = [self._tracker(s, p.source).alpha if p.source is not None else self.prior_alpha for s, p, _ in drafted]
        return fused_pays(cost.at_batch(len(seqs)).verify_s, [b for _, _, b in drafted], alphas)

    def _unsent_features(self, s: _Sequence) -> tuple[torch.Tensor | None, int]:
        """The features a reading drafter has not seen yet, and the position of the first."""
        if not s.features:
            return None, s.features_sent
        block, start = torch.cat(s.features), s.features_sent
        s.features, s.features_sent = [], start + len(block)
        return block, start

    def _verify(self, seqs: list[_Sequence], blocks: list[DraftBlock], chunks: list[tuple[_Sequence, list[int]]],
                timing: RoundTiming) -> tuple[list[TargetOutput], bool]:
        """One target call (a VerifyBatch): each sequence's uncached tokens and drafts, scored at its
        last K_i + 1 positions (logits [K_i + 1, V], or argmax ids [K_i + 1] for greedy sequences,
        left on the target's device), and the prompt chunks, which return nothing. With a drafter
        that reads the target, the hidden states of every new position come too (a chunk's are
        committed at once). Returns each sequence's output and whether the round prefilled."""
        t = self.clock()
        heads = [s.uncached for s in seqs]
        ahead = [lookahead_ids(b, self.target.vocab_size) for b in blocks]  # PaSS: after each accept point
        inputs = [h + b.token_ids + a for h, b, a in zip(heads, blocks, ahead)] + [ids for _, ids in chunks]
        trees = [_layout(len(h), b.parents) if not a else lookahead_layout(len(h), len(b), b.lookahead)
                 for h, b, a in zip(heads, blocks, ahead)]
        batch = VerifyBatch(
            caches=tuple(s.cache for s in seqs) + tuple(s.cache for s, _ in chunks), inputs=tuple(inputs),
            argmax_only=tuple(s.request.sampling.greedy for s in seqs) + (True,) * len(chunks),
            last=tuple(len(b) + 1 + len(a) for b, a in zip(blocks, ahead)) + (0,) * len(chunks),
            parents=tuple(trees) + (None,) * len(chunks) if any(t is not None for t in trees) else None,
            hidden=tuple(len(x) for x in inputs) if self.reads_features else None,
        )
        outputs = self.target.verify(batch)
        outputs = [split_lookahead(o, len(b), b.lookahead) if a else o
                   for o, b, a in zip(outputs, blocks, ahead)] + outputs[len(seqs):]
        for (s, _), o in zip(chunks, outputs[len(seqs) :]):
            if o.hidden is not None:
                s.features.append(o.hidden)
        forward_s = self.clock() - t
        prompt_tokens = [len(ids) for _, ids in chunks] + [len(h) - 1 for h in heads]  # prefilled, not verified
        share = sum(prompt_tokens) / (sum(prompt_tokens) + len(seqs) + sum(map(len, blocks)))
        timing.prefill_s, timing.verify_s = forward_s * share, forward_s * (1 - share)
        per_token = timing.prefill_s / sum(prompt_tokens) if any(prompt_tokens) else 0.0
        for s, n in zip([s for s, _ in chunks] + seqs, prompt_tokens):
            s.stats.prefill_s += per_token * n
        for s, ids in chunks:
            s.cached += len(ids)
        for s, h in zip(seqs, heads):
            s.cached += len(h)  # the drafts are counted as they are accepted (_commit)
            s.stats.verify_s += timing.verify_s / len(seqs)
        return outputs[: len(seqs)], any(prompt_tokens)

    def _learn_round_cost(self, seqs: list[_Sequence], blocks: list[DraftBlock], timing: RoundTiming) -> None:
        """Real rounds refine the verify cost: nothing is padded, so the round cost what its tokens
        in all cost (as round_cost_s reads it)."""
        if self._policy is not None and self._learn_costs:
            tokens = len(seqs) + sum(len(b) + (len(b) + 1) * b.lookahead for b in blocks)
            self._policy.cost = self._policy.cost.observed(len(seqs), tokens, timing.verify_s + timing.sample_s)

    def _commit(self, s: _Sequence, block: DraftBlock, result: Acceptance, out: TargetOutput) -> None:
        """The target's cache keeps the accepted drafts (look-ahead tokens go with the rejected
        ones), and a reading drafter's features the committed positions."""
        k, n, hidden = len(block), result.num_accepted, out.hidden
        if result.path is None:
            self.target.rollback(s.cache, k - n + (k + 1) * block.lookahead)
            if hidden is not None:  # [len(uncached) + k, d]: the committed positions' rows
                s.features.append(hidden[: len(hidden) - (k - n)])
        else:  # a tree: keep the accepted path's positions, gathered behind the committed ones
            self.target.keep(s.cache, list(range(s.cached)) + [s.cached + j for j in result.path])
            if hidden is not None:
                head = len(hidden) - k
                s.features.append(hidden[list(range(head)) + [head + j for j in result.path]])
        s.cached += n

    def _learn(self, s: _Sequence, plan: SequencePlan, block: DraftBlock, result: Acceptance, out: TargetOutput,
               timing: RoundTiming) -> None:
        """Stats, the source's alpha, its acceptance by depth and rank, the probe schedule the plan
        advanced, and the drafter (after_round, where it asks) learn the round's outcome."""
        k, n = len(block), result.num_accepted
        st = s.stats
        st.target_calls += 1
        st.rounds_k.append(k)
        st.tree_rounds += result.path is not None
        st.draft_tokens += k
        st.accepted_tokens += n
        rejected = not result.at_leaf if result.path is not None else n < k  # a draft was judged and refused
        st.evaluated_tokens += n + rejected
        if plan.probes is not None:
            s.probes = plan.probes
        if plan.source is not None:  # adaptive: alpha (and acceptance by depth and rank) of its source
            self._tracker(s, plan.source).update(n + rejected, n)
            if self.tree_nodes or self.lookahead:
                self._shapes_of(plan.source).observe(block.parents, k, result.path or range(n))
        if self.capabilities.observes_rounds:
            # PaSS: the block after the last accepted token holds the drafts after this round's tokens
            rows = out.lookahead[n] if out.lookahead is not None and result.path is None else None
            self.drafter.after_round(RoundResult(s.seq_id, block, result, len(s.tokens) + len(result.tokens), out, rows))
        timing.draft_tokens += k
        timing.accepted_tokens += n

    def _admit(self, waiting: list[_Sequence]) -> tuple[list[tuple[_Sequence, list[int]]], list[_Sequence]]:
        """This round's prompt tokens, prefill_chunk in all, oldest sequences first. A sequence whose
        whole uncached prompt fits joins the round's verification (its block starts with it and it
        drafts at once); the first that does not fit prefills a chunk of what is left."""
        budget, chunks, joining = self.prefill_chunk, [], []
        for s in waiting:
            rest = s.uncached
            if len(rest) <= budget:
                joining.append(s)
                budget -= len(rest)
            else:
                if budget:
                    chunks.append((s, rest[:budget]))
                break
        return chunks, joining

    def _shapes_of(self, source: str) -> ShapeStats:
        if source not in self._shape_stats:
            prior = self.capabilities.prior_by_depth if source == self._lookahead_source else None
            self._shape_stats[source] = ShapeStats(self.max_draft_tokens, max(1, self.tree_branch), self.prior_alpha,
                                                   prior_depth=prior)
        return self._shape_stats[source]

    def _tracker(self, s: _Sequence, source: str) -> AcceptanceTracker:
        """The sequence's alpha for drafts from `source` (lookup and a model accept differently)."""
        if source not in s.trackers:
            s.trackers[source] = AcceptanceTracker(prior_alpha=self.prior_alpha)
        return s.trackers[source]

    def _accept(self, seqs: list[_Sequence], blocks: list[DraftBlock], verified: list[TargetOutput],
                timing: RoundTiming) -> list[Acceptance]:
        """Per sequence the tokens it emits, decided where the scores are (the target's device):
        greedy chains from their argmax ids, sampled chains by modified rejection sampling on their
        logits, trees by the core's batched tree acceptance. Each kind reaches the host in one read
        of its token ids and counts: a constant number a round, whatever the batch."""
        t = self.clock()
        host = HostTransfers()
        scores = [o.scores for o in verified]
        out: list[Acceptance | None] = [None] * len(seqs)
        trees = [i for i, b in enumerate(blocks) if b.parents is not None]
        if trees:
            for i, result in zip(trees, self._accept_trees([seqs[i] for i in trees], [blocks[i] for i in trees],
                                                           [scores[i] for i in trees], host)):
                out[i] = result
        chains = [i for i, b in enumerate(blocks) if b.parents is None]
        for picked, decide in (([i for i in chains if seqs[i].request.sampling.greedy], self._greedy_accept),
                               ([i for i in chains if not seqs[i].request.sampling.greedy], self._rejection_sample)):
            if picked:
                tokens, counts = decide([seqs[i] for i in picked], [blocks[i] for i in picked],
                                        [scores[i] for i in picked]).to_host(host)
                for i, ids, n in zip(picked, tokens, counts):
                    out[i] = Acceptance(ids, n)
        timing.sample_s = self.clock() - t
        timing.host_syncs, timing.host_bytes = host.syncs, host.bytes
        for s in seqs:
            s.stats.sample_s += timing.sample_s / len(seqs)
            s.stats.host_syncs += host.syncs
            s.stats.host_bytes += host.bytes
        return out

    def _draft_ids(self, blocks: list[DraftBlock]) -> torch.Tensor:
        return to_device(torch.tensor([t for b in blocks for t in b.token_ids], dtype=torch.long), self.device)  # [T]

    def _greedy_accept(self, seqs: list[_Sequence], blocks: list[DraftBlock], argmax: list[torch.Tensor]):
        return greedy_accept(torch.cat(argmax), self._draft_ids(blocks), [len(b) for b in blocks])

    def _accept_trees(self, seqs: list[_Sequence], blocks: list[DraftBlock], scores: list[torch.Tensor],
                      host: HostTransfers) -> list[Acceptance]:
        """Tree blocks: the core's batched tree acceptance on argmax ids (greedy) or warped logits."""
        trees = [DraftTree(tuple(b.token_ids), b.parents, None if b.probs is None else to_device(b.probs, self.device))
                 for b in blocks]
        greedy = [s.request.sampling.greedy for s in seqs]
        rows = [x if g else warp_probs(x, [s.request.sampling] * len(x)) for x, g, s in zip(scores, greedy, seqs)]
        results = accept_trees(rows, trees, greedy, [s.generator for s in seqs], host=host)
        return [Acceptance(list(r.tokens), r.num_accepted, r.path, not t.children(r.path[-1] if r.path else -1))
                for r, t in zip(results, trees)]

    def _rejection_sample(self, seqs: list[_Sequence], blocks: list[DraftBlock], logits: list[torch.Tensor]):
        row_params = [s.request.sampling for s, b in zip(seqs, blocks) for _ in range(len(b) + 1)]
        p = warp_probs(torch.cat(logits), row_params)  # [T + B, V] on the target's device
        q = None  # [T, V]
        if any(b.probs is not None for b in blocks):
            vocab = p.shape[1]
            q = torch.cat([
                to_device(b.probs, p.device).float() if b.probs is not None
                else torch.nn.functional.one_hot(self._draft_ids([b]), vocab).float()
                for b in blocks
            ])
        return rejection_sample(p, self._draft_ids(blocks), q, [len(b) for b in blocks], [False] * len(seqs),
                                [s.generator for s in seqs])

    def _emit(self, s: _Sequence, tokens: list[int]) -> StepOutput:
        """The accepted tokens join the output up to EOS, the length limit or a stop string; a
        sequence that ends gets its result and frees its caches."""
        req, new, reason = s.request, [], None
        for t in tokens:
            if t == self.tokenizer.eos_token_id:
                reason = "eos"
                break
            s.output.append(t)
            new.append(t)
            if len(s.output) >= req.max_new_tokens or len(s.prompt_ids) + len(s.output) >= self.target.max_context:
                reason = "length"
                break
        ending = reason is not None or bool(req.stop) and self._stopped(s, new)
        text = self.tokenizer.decode(s.output) if ending else ""
        if req.stop and (cut := stop_at(text, req.stop)) is not None:  # where it is in the whole text
            text, reason = text[:cut], "stop"
        if reason is not None:
            s.result = GenerationResult(text, list(s.output), reason, s.stats, len(s.prompt_ids))
            self.abort(s.seq_id)
        return StepOutput(s.seq_id, new, s.result)

    def _stopped(self, s: _Sequence, new: list[int]) -> bool:
        """Whether a stop string now occurs in the output's text. No earlier round's text held one,
        so only a hit ending in text that changed can be new: the search starts a stop string's
        length before it (Detokenizer.changed), and the push decodes a bounded tail."""
        if s.text is None:
            s.text = Detokenizer(self.tokenizer.decode)
        d = s.text
        d.push(new)
        start = max(0, d.changed - max(map(len, s.request.stop)) + 1)
        d.forget(start)
        return stop_at(d.text_from(start), s.request.stop) is not None

    # -- costs for adaptive K ------------------------------------------------------------
    def prepare(self) -> None:
        """Takes (or loads) the one-time measurements adaptive K needs now rather than on the first request."""
        if self.drafter is not None and self.num_draft_tokens == "adaptive":
            _ = self.cost_model, self.prior_alpha

    @property
    def cost_model(self) -> CostModel:
        return self._cost_model or self._calibrated().cost

    @property
    def prior_alpha(self) -> float:
        """The acceptance rate new sequences start from (the drafter's, measured once)."""
        return self._prior_alpha if self._prior_alpha is not None else self._calibrated().prior_alpha

    def _calibrated(self) -> Calibration:
        if self._calibration is None:
            vocab = min(self.target.vocab_size, getattr(self.tokenizer, "vocab_size", self.target.vocab_size))

            def measure() -> Calibration:
                return Calibration(
                    measure_costs(self.target, self.drafter, vocab, self.max_draft_tokens, self.clock),
                    measure_agreement(self.target, self.drafter, self.tokenizer),
                )

            def recheck(cached: Calibration) -> Calibration | None:
                if self.drafter is None:
                    return None
                return recheck_draft_cost(cached, self.drafter, vocab, self.clock)

            self._calibration = load_or_measure(self.calibration_key, measure, recheck)
        return self._calibration
